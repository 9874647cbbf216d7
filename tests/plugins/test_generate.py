"""Teacher-written answers (`teacher-answers`, `kdistill generate`): the dataset, greedy answers, exact resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import cli_result as cli
from conftest import shard_bytes, tiny_recipe

TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
QUESTIONS = ["the king shall speak", "my lady will not stay", "good night sweet queen", "war and peace",
             "thou shalt not fly", "the crown of the house", "come and rest", "dream of love", "the sword is good",
             "peace for our day"]


@pytest.fixture(scope="module")
def chat_assets(tiny_assets, tmp_path_factory):
    """The tiny teacher with a chat template, and a JSON Lines table of 10 prompts (and a messages one)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("chat")
    teacher = root / "teacher"
    shutil.copytree(tiny_assets["teacher"], teacher)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(teacher)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q, "answer": "x"}) + "\n" for q in QUESTIONS))
    return {"teacher": str(teacher), "plain_teacher": tiny_assets["teacher"], "prompts": str(prompts),
            "corpus": tiny_assets["corpus"]}


def recipe(assets, tmp_path: Path, output: Path, **options) -> Path:
    raw = tiny_recipe({"teacher": assets["teacher"], "corpus": assets["corpus"]}, tmp_path / "run", steps=1)
    raw["generator"] = {"name": "teacher-answers", "options": {
        "prompts": [assets["prompts"]], "output": str(output), "max_new_tokens": 6, "batch_size": 3,
        "shard_prompts": 4, **options}}
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_generate_writes_a_dataset_of_greedy_answers_that_reads_back(chat_assets, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.toolkit import GENERATION_MANIFEST, prompt_ids, read_table, stop_ids

    out = tmp_path / "answers"
    path = recipe(chat_assets, tmp_path, out, first=2, count=7)
    code, stdout, stderr = cli("generate", path)
    assert code == 0, stderr
    assert "teacher answers: 7 prompts, 7 answers" in stdout
    manifest = json.loads((out / GENERATION_MANIFEST).read_text())
    assert manifest["complete"] is True and [s["name"] for s in manifest["shards"]] == ["shard-00000.parquet", "shard-00001.parquet"]
    assert manifest["teacher"]["weights"] and manifest["sampling"]["temperature"] == 0.0 and manifest["n_prompts"] == 7

    table = read_table([str(out)], "data.options.paths")
    assert table.column_names == ["prompt", "completion", "prompt_index", "sample", "completion_tokens"]
    assert table["prompt_index"] == list(range(2, 9)) and table["prompt"] == QUESTIONS[2:9] and set(table["sample"]) == {0}
    assert sum(table["completion_tokens"]) == manifest["tokens"] > 0

    # the answer in the batch (left-padded beside longer prompts) is what the teacher says to the prompt alone
    tokenizer = AutoTokenizer.from_pretrained(chat_assets["teacher"])
    model = AutoModelForCausalLM.from_pretrained(chat_assets["teacher"]).eval()
    row = 3  # "thou shalt not fly", batched with two other prompts
    ids = torch.tensor([prompt_ids(tokenizer, QUESTIONS[2 + row], "p")])
    with torch.no_grad():
        direct = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=stop_ids(tokenizer))
    answer = direct[0, ids.shape[1]:].tolist()
    answer = answer[:next((i for i, t in enumerate(answer) if t in stop_ids(tokenizer)), len(answer))]
    assert table["completion"][row] == tokenizer.decode(answer, skip_special_tokens=True)
    assert table["completion_tokens"][row] == len(answer)

    before = shard_bytes(out)
    code, stdout, _ = cli("generate", path)
    assert code == 0 and f"{out}: complete; nothing to do" in stdout and shard_bytes(out) == before


def test_a_killed_write_resumes_to_the_same_shards(chat_assets, tmp_path, monkeypatch):
    from kdistill.plugins.generators import teacher_answers

    options = {"temperature": 0.9, "answers_per_prompt": 2, "seed": 7}
    whole = tmp_path / "whole"
    assert cli("generate", recipe(chat_assets, tmp_path, whole, **options))[0] == 0

    killed = tmp_path / "killed"
    path = recipe(chat_assets, tmp_path, killed, **options)
    write, calls = teacher_answers._write_shard, []

    def dies_after_one(*args):
        if calls:
            raise KeyboardInterrupt  # killed while writing the second shard
        calls.append(args)
        return write(*args)

    monkeypatch.setattr(teacher_answers, "_write_shard", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        from kdistill.core.config import load_recipe, resolve
        from kdistill.core.registry import Registry
        from kdistill.toolkit import run_generator

        plan = resolve(load_recipe(path), Registry.from_plugins())
        import torch

        teacher = plan.build("teacher", teacher_answers.kdistill.TeacherProvider)
        run_generator(plan, teacher, torch.device("cpu"), print, progress=False)
    assert list(shard_bytes(killed)) == ["shard-00000.parquet"]
    assert json.loads((killed / "generation.json").read_text())["complete"] is False
    monkeypatch.setattr(teacher_answers, "_write_shard", write)

    code, stdout, stderr = cli("generate", path)
    assert code == 0, stderr
    assert "writing answers to 6 prompts" in stdout  # shard 0's 4 prompts kept
    assert shard_bytes(killed) == shard_bytes(whole) and len(shard_bytes(whole)) == 3

    # the last shard lost and the folder marked unfinished: that shard again, byte for byte
    (killed / "shard-00002.parquet").unlink()
    manifest = json.loads((killed / "generation.json").read_text())
    (killed / "generation.json").write_text(json.dumps({**manifest, "complete": False}))
    assert cli("generate", path)[0] == 0
    assert shard_bytes(killed) == shard_bytes(whole)


def test_other_sampling_options_are_refused_unless_overwrite(chat_assets, tmp_path):
    out = tmp_path / "answers"
    path = recipe(chat_assets, tmp_path, out)
    assert cli("generate", path)[0] == 0
    code, _, stderr = cli("generate", path, "--set", "generator.options.temperature=0.5")
    assert code == 2
    assert stderr.strip() == (f"error: generator.options.output: {out} holds answers of something else: "
                              "sampling.temperature (folder 0.0, now 0.5); pass --overwrite to replace them")
    code, stdout, stderr = cli("generate", path, "--set", "generator.options.temperature=0.5", "--overwrite")
    assert code == 0, stderr
    assert json.loads((out / "generation.json").read_text())["sampling"]["temperature"] == 0.5


def test_a_missing_column_or_chat_template_is_one_line(chat_assets, tmp_path):
    code, _, stderr = cli("generate", recipe(chat_assets, tmp_path, tmp_path / "a", column="prompt"))
    assert code == 2
    assert stderr.strip() == (f"error: generator.options.column: {chat_assets['prompts']} has no column 'prompt' "
                              "(it has: question, answer)")
    path = recipe({**chat_assets, "teacher": chat_assets["plain_teacher"]}, tmp_path, tmp_path / "b")
    code, _, stderr = cli("generate", path)
    assert code == 2 and len(stderr.strip().splitlines()) == 1 and "has no chat template" in stderr
    code, _, stderr = cli("generate", recipe(chat_assets, tmp_path, tmp_path / "c", answers_per_prompt=2))
    assert code == 2 and "answers_per_prompt > 1 needs temperature > 0" in stderr


def test_data_inside_the_output_is_made_earlier_and_run_writes_it_first(chat_assets, tmp_path):
    from kdistill.core.config import load_recipe, resolve
    from kdistill.core.errors import ConfigError
    from kdistill.core.registry import Registry

    out = tmp_path / "answers"
    path = recipe(chat_assets, tmp_path, out)
    raw = load_recipe(path)
    raw["data"]["options"]["paths"] = [str(out / "shard-*.parquet")]
    resolve(raw, Registry.from_plugins())  # not there yet: the generator writes it
    without = {k: v for k, v in raw.items() if k != "generator"}
    with pytest.raises(ConfigError, match="no such file"):
        resolve(without, Registry.from_plugins())

    code, _, stderr = cli("run", path)  # text-files data; the generator's answers are written first
    assert code == 0, stderr
    assert "the teacher is writing answers to 10 prompts first" in stderr
    assert json.loads((out / "generation.json").read_text())["complete"] is True
    code, _, stderr = cli("run", path, "--overwrite")
    assert code == 0 and "writing answers" not in stderr


def test_a_repetition_penalty_changes_the_answers_and_is_recorded(chat_assets, tmp_path):
    """Greedy answers of the tiny teacher repeat tokens; with a penalty that divides a used token's logit by
    10^6, no answer repeats a token (ids as generated, stored with top_k), the sampling record says so, and a
    folder written without it is refused."""
    from kdistill.toolkit import GENERATION_MANIFEST, read_table

    plain, penalized = tmp_path / "plain", tmp_path / "penalized"
    assert cli("generate", recipe(chat_assets, tmp_path, plain, max_new_tokens=12, top_k=2))[0] == 0
    code, _, stderr = cli("generate", recipe(chat_assets, tmp_path, penalized, max_new_tokens=12, top_k=2,
                                             repetition_penalty=1e6))
    assert code == 0, stderr

    def ids(folder):
        return read_table([str(folder)], "data.options.paths")["completion_ids"]

    assert any(len(set(t)) < len(t) for t in ids(plain))  # the plain greedy answers do repeat
    assert all(len(set(t)) == len(t) for t in ids(penalized)) and ids(penalized) != ids(plain)
    assert json.loads((penalized / GENERATION_MANIFEST).read_text())["sampling"]["repetition_penalty"] == 1e6
    assert "repetition_penalty" not in json.loads((plain / GENERATION_MANIFEST).read_text())["sampling"]
    code, _, stderr = cli("generate", recipe(chat_assets, tmp_path, plain, max_new_tokens=12, top_k=2,
                                             repetition_penalty=1.2))
    assert code == 2 and "sampling" in stderr
