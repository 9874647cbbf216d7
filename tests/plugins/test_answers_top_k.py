"""The teacher's top-k log-probabilities stored with its answers (`teacher-answers` option `top_k`) and the
teacher that trains from them (`answers-top-k`): what is stored, how it lines up with the batch, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import tiny_recipe

# like SmolLM2's: the end-of-turn token (here <eos>, a stop token) and then a newline after every turn
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
QUESTIONS = ["the king shall speak", "my lady will not stay", "good night sweet queen", "war and peace",
             "thou shalt not fly", "the crown of the house", "come and rest", "dream of love", "the sword is good",
             "peace for our day"]
EOS, TIED = 1, 221  # the tiny teacher says <eos> where it would say token 221: some answers stop, others run to the end
COLUMNS = ["prompt", "completion", "prompt_index", "sample", "completion_tokens", "completion_ids", "top_k_ids", "top_k_q",
           "top_k_hi", "top_k_lo", "top_k_log_tail"]


@pytest.fixture(scope="module")
def assets(tiny_assets, tmp_path_factory):
    """The tiny teacher with a chat template and an output row for <eos> that makes some answers stop, and a
    JSON Lines table of 10 prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("answers-top-k")
    teacher = root / "teacher"
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"])
    with torch.no_grad():
        model.lm_head.weight[EOS] = model.lm_head.weight[TIED] * 1.02
    model.save_pretrained(teacher, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(teacher)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"question": q}) + "\n" for q in QUESTIONS))
    return {"teacher": str(teacher), "prompts": str(prompts), "corpus": tiny_assets["corpus"]}


def recipe(assets, tmp_path: Path, output: Path, data: dict | None = None, teacher: dict | None = None,
           losses: list | None = None, **options) -> Path:
    raw = tiny_recipe({"teacher": assets["teacher"], "corpus": assets["corpus"]}, tmp_path / "run", steps=1)
    raw["generator"] = {"name": "teacher-answers", "options": {
        "prompts": [assets["prompts"]], "output": str(output), "max_new_tokens": 8, "batch_size": 3,
        "shard_prompts": 4, **options}}
    raw["evaluators"] = []
    if data is not None:
        raw["data"] = data
    if teacher is not None:
        raw["teacher"] = teacher
    if losses is not None:
        raw["losses"] = losses
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def cli(*args) -> tuple[int, str, str]:
    from kdistill.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.parquet"))}


def rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for name in shards(folder) for row in pq.read_table(folder / name).to_pylist()]


@pytest.fixture(scope="module")
def written(assets, tmp_path_factory):
    """Greedy answers with top-8 at T = 1, and the same answers without top-k."""
    root = tmp_path_factory.mktemp("written")
    with_k, without = root / "with-k", root / "without"
    for out, options in ((with_k, {"top_k": 8}), (without, {})):
        code, _, stderr = cli("generate", recipe(assets, root, out, **options))
        assert code == 0, stderr
    return {"root": root, "with_k": with_k, "without": without}


# ------------------------------------------------------------------------------------------------ the generator


def reference(assets, question: str, completion_ids: list[int], temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of a plain float64 forward of the teacher over prompt + answer, at the positions
    that predict the answer's tokens: [len(answer), V]."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.toolkit import prompt_ids

    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    model = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float64).eval()
    prompt = prompt_ids(tokenizer, question, "p")
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion_ids])).logits[0].double()
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion_ids))
    return torch.log_softmax(logits[positions] / temperature, dim=-1)


def check_stored(row: dict, ref: torch.Tensor, k: int) -> None:
    """The row's stored top-k are the reference's k largest log-probabilities, to the quantization error."""
    from kdistill.plugins.teachers.cache_store import dequantize

    n = len(row["completion_ids"])
    ids = torch.tensor(row["top_k_ids"]).view(n, k)
    q = torch.tensor(row["top_k_q"], dtype=torch.uint8).view(n, k)
    hi, lo = (torch.tensor(row[name], dtype=torch.float16) for name in ("top_k_hi", "top_k_lo"))
    stored = dequantize(q, hi, lo).double()
    assert all(len(set(position.tolist())) == k for position in ids)  # k different tokens at every position
    kth = ref.topk(k, dim=-1).values[:, -1:]
    assert (ref.gather(1, ids) >= kth - 1e-6).all()  # they are the k largest (up to exact ties)
    # half a quantization step, float16 rounding of hi and lo, float32 against float64
    bound = (hi.double() - lo.double()).unsqueeze(-1) / 510 + 2.0 ** -11 * lo.double().abs().unsqueeze(-1) + 1e-4
    assert ((stored - ref.gather(1, ids)).abs() <= bound).all()
    tail = torch.log(-torch.expm1(torch.logsumexp(ref.topk(k, dim=-1).values, dim=-1)))
    assert torch.allclose(torch.tensor(row["top_k_log_tail"], dtype=torch.float16).double(), tail, atol=2e-3, rtol=2e-3)


def test_stored_top_k_are_the_teachers_at_every_generated_token(assets, written):
    from kdistill.toolkit import GENERATION_MANIFEST

    manifest = json.loads((written["with_k"] / GENERATION_MANIFEST).read_text())
    assert manifest["top_k"] == {"k": 8, "temperature": 1.0, "encoding": "kdistill-top-k/1"}
    assert manifest["vocabulary"]["size"] == 258 and manifest["vocabulary"]["ids_dtype"] == "uint16"
    stored, plain = rows(written["with_k"]), rows(written["without"])
    assert list(stored[0]) == COLUMNS
    # the same answers as without top_k; completion_ids are the answer's tokens and the stop token that ended it
    assert [{k: r[k] for k in COLUMNS[:5]} for r in stored] == plain
    ended = [r for r in stored if r["completion_ids"][-1] == EOS]
    assert 0 < len(ended) < len(stored)  # some answers stopped, the others ran to max_new_tokens
    for row in stored:
        n = row["completion_tokens"] + (row["completion_ids"][-1] == EOS)
        assert len(row["completion_ids"]) == n and EOS not in row["completion_ids"][:-1]
        assert len(row["top_k_ids"]) == len(row["top_k_q"]) == 8 * n and len(row["top_k_hi"]) == n
        check_stored(row, reference(assets, row["prompt"], row["completion_ids"], 1.0), 8)


def test_sampled_answers_store_the_raw_logits_at_top_k_temperature(assets, tmp_path):
    """Sampling at T = 0.7 with top-p 0.5 changes which tokens are drawn, never what is stored: softmax of the
    raw logits at top_k_temperature (a top-p cut would leave -inf, a sampling temperature other values)."""
    out = tmp_path / "sampled"
    path = recipe(assets, tmp_path, out, top_k=16, top_k_temperature=2.0, temperature=0.7, top_p=0.5,
                  answers_per_prompt=2, seed=3, count=4)
    code, _, stderr = cli("generate", path)
    assert code == 0, stderr
    stored = rows(out)
    assert len(stored) == 8 and {r["sample"] for r in stored} == {0, 1}
    for row in stored:
        check_stored(row, reference(assets, row["prompt"], row["completion_ids"], 2.0), 16)


def test_a_killed_write_with_top_k_resumes_to_the_same_shards(assets, tmp_path, monkeypatch):
    from kdistill.core.config import load_recipe, resolve
    from kdistill.core.registry import Registry
    from kdistill.plugins.generators import teacher_answers
    from kdistill.toolkit import run_generator

    options = {"temperature": 0.9, "answers_per_prompt": 2, "seed": 7, "top_k": 4}
    whole = tmp_path / "whole"
    assert cli("generate", recipe(assets, tmp_path, whole, **options))[0] == 0
    killed = tmp_path / "killed"
    path = recipe(assets, tmp_path, killed, **options)
    write, calls = teacher_answers._write_shard, []

    def dies_after_one(*args):
        if calls:
            raise KeyboardInterrupt  # killed while writing the second shard
        calls.append(args)
        return write(*args)

    monkeypatch.setattr(teacher_answers, "_write_shard", dies_after_one)
    plan = resolve(load_recipe(path), Registry.from_plugins())
    with pytest.raises(KeyboardInterrupt):
        run_generator(plan, plan.build("teacher", teacher_answers.kdistill.TeacherProvider), torch.device("cpu"), print,
                      progress=False)
    assert list(shards(killed)) == ["shard-00000.parquet"]
    monkeypatch.setattr(teacher_answers, "_write_shard", write)
    code, stdout, stderr = cli("generate", path)
    assert code == 0, stderr
    assert "writing answers to 6 prompts" in stdout
    assert shards(killed) == shards(whole) and len(shards(whole)) == 3


def test_top_k_bad_input_is_one_line(assets, written, tmp_path):
    code, _, stderr = cli("generate", recipe(assets, tmp_path, tmp_path / "a", top_k=259))
    assert code == 2
    assert stderr.strip() == "error: generator.options.top_k: 259 is more than the teacher's 258 tokens"
    assert not (tmp_path / "a").exists()  # refused before anything is written
    code, _, stderr = cli("generate", recipe(assets, tmp_path, tmp_path / "b", top_k_temperature=2.0))
    assert code == 2 and len(stderr.strip().splitlines()) == 1
    assert "top_k_temperature needs top_k (no log-probabilities are stored without it)" in stderr
    # another k, or top-k where there was none, is another folder's content
    out = written["with_k"]
    code, _, stderr = cli("generate", recipe(assets, tmp_path, out, top_k=4))
    assert code == 2
    assert stderr.strip() == (f"error: generator.options.output: {out} holds answers of something else: top_k.k (folder 8, "
                              "now 4); pass --overwrite to replace them")
    out = written["without"]
    code, _, stderr = cli("generate", recipe(assets, tmp_path, out, top_k=8))
    assert code == 2
    assert stderr.strip() == (f"error: generator.options.output: {out} holds answers of something else: top_k (folder None, "
                              "now {'k': 8, 'temperature': 1.0, 'encoding': 'kdistill-top-k/1'}); pass --overwrite to "
                              "replace them")
