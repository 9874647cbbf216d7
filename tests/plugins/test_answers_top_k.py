"""The teacher's top-k log-probabilities stored with its answers (`teacher-answers` option `top_k`) and the
teacher that trains from them (`answers-top-k`): what is stored, how it lines up with the batch, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import cli_result as cli
from conftest import shard_bytes, tiny_recipe

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
    return {"teacher": str(teacher), "prompts": str(prompts), "corpus": tiny_assets["corpus"],
            "plain_teacher": tiny_assets["teacher"]}


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


def rows(folder: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return [row for name in shard_bytes(folder) for row in pq.read_table(folder / name).to_pylist()]


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


def test_a_killed_write_with_top_k_resumes_to_the_same_shard_bytes(assets, tmp_path, monkeypatch):
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
    assert list(shard_bytes(killed)) == ["shard-00000.parquet"]
    monkeypatch.setattr(teacher_answers, "_write_shard", write)
    code, stdout, stderr = cli("generate", path)
    assert code == 0, stderr
    assert "writing answers to 6 prompts" in stdout
    assert shard_bytes(killed) == shard_bytes(whole) and len(shard_bytes(whole)) == 3


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


# ------------------------------------------------------------------------------------------------ the data source


def conversations(folder: Path, tokenizer, **options):
    from kdistill.plugins.data.conversations import Conversations

    data = Conversations(Conversations.Options(paths=[str(folder)], **{"val_fraction": 0, "seq_len": 64, **options}))
    data.setup(tokenizer, seed=0)
    return data


@pytest.mark.parametrize("layout", ["pack", "pad"])
def test_the_answers_token_ids_are_taken_as_they_are_and_only_they_count(assets, written, layout):
    from transformers import AutoTokenizer

    from kdistill import IGNORE_INDEX

    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    stored = rows(written["with_k"])
    # decoding and re-encoding does not give the teacher's tokens back (why completion_ids are kept)
    assert any(tokenizer(r["completion"], add_special_tokens=False)["input_ids"] != r["completion_ids"][:r["completion_tokens"]]
               for r in stored)
    data = conversations(written["with_k"], tokenizer, layout=layout)
    everything = conversations(written["with_k"], tokenizer, layout=layout, loss_on="all")
    keys = data.train_keys()
    batch, spans, labels_all = data.batch_for_keys(keys), data.answer_spans(keys), everything.batch_for_keys(keys).labels
    assert spans == everything.answer_spans(keys)
    seen = []
    for unit, unit_spans in enumerate(spans):
        counted = torch.zeros(batch.labels.shape[1], dtype=torch.bool)
        for row, at, n in unit_spans:
            ids = stored[row]["completion_ids"]
            assert n == len(ids) and batch.labels[unit, at:at + n].tolist() == ids  # every id, exactly, in place
            assert batch.input_ids[unit, at + 1:at + 1 + n].tolist() == ids
            # before them the prompt in the chat template; after them the template's "\n" (and its <eos> before it
            # when the answer ran to max_new_tokens), rendered but not counted
            start = at - int(batch.position_ids[unit, at]) if layout == "pack" else 0
            head = tokenizer.apply_chat_template([{"role": "user", "content": stored[row]["prompt"]}], tokenize=False,
                                                 add_generation_prompt=True)
            assert batch.input_ids[unit, start:at + 1].tolist() == tokenizer(head, add_special_tokens=False)["input_ids"]
            after = ([] if ids[-1] == EOS else [EOS]) + newline
            assert labels_all[unit, at + n:at + n + len(after)].tolist() == after
            assert (batch.labels[unit, at + n:at + n + len(after)] == IGNORE_INDEX).all()
            end = at + n + len(after)
            assert end == batch.labels.shape[1] or not batch.attention_mask[unit, end] or (
                layout == "pack" and int(batch.position_ids[unit, end]) == 0)
            counted[at:at + n] = True
            seen.append(row)
        assert torch.equal(batch.labels[unit] != IGNORE_INDEX, counted)  # nothing else counts
    assert sorted(seen) == list(range(len(stored)))


def test_a_student_with_another_vocabulary_reads_the_answers_text_not_the_teachers_ids(assets, written):
    """completion_ids are the teacher's token ids: only a student with the teacher's vocabulary may take them."""
    from transformers import AutoTokenizer

    from kdistill import IGNORE_INDEX

    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    tokenizer.add_tokens(["<extra>"])  # another vocabulary (its digest differs), the same text tokenization
    stored = rows(written["with_k"])
    data = conversations(written["with_k"], tokenizer, layout="pad")
    batch = data.batch_for_keys(data.train_keys())
    counted = sorted(tuple(row[row != IGNORE_INDEX].tolist()) for row in batch.labels)
    eos_newline = tokenizer("<eos>\n", add_special_tokens=False)["input_ids"]
    expected = sorted(tuple(tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + eos_newline) for r in stored)
    assert counted == expected  # the answers' text re-encoded, as without completion_ids


# ------------------------------------------------------------------------------------------------ the teacher

STUDENT = {"model_type": "llama", "vocab_size": 258, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256, "tie_word_embeddings": False}


def training(assets, tmp_path: Path, folder: Path, teacher: dict | None = None, data: dict | None = None,
             losses: list | None = None, generator: dict | None = None, name: str = "run") -> dict:
    """A recipe that trains a small student from config on the answers in `folder` with the answers-top-k teacher."""
    raw = tiny_recipe({"teacher": assets["teacher"], "corpus": assets["corpus"]}, tmp_path / name, steps=2)
    raw["student"] = {"config": STUDENT, "tokenizer": assets["teacher"]}
    raw["teacher"] = {"name": "answers-top-k", "options": {"source": {"model": assets["teacher"]}, **(teacher or {})}}
    raw["data"] = {"name": "conversations", "options": {"paths": [str(folder)], "seq_len": 64, "val_fraction": 0.2,
                                                        **(data or {})}}
    raw["losses"] = losses or [{"name": "forward-kl", "weight": 0.5, "options": {"temperature": 1.0}},
                               {"name": "cross-entropy", "weight": 0.5}]
    raw["evaluators"] = []
    raw["train"]["batch_size"] = 3
    if generator is not None:
        raw["generator"] = {"name": "teacher-answers", "options": {
            "prompts": [assets["prompts"]], "output": str(folder), "max_new_tokens": 8, "batch_size": 3, "shard_prompts": 4,
            **generator}}
    return raw


def run_cli(raw: dict, tmp_path: Path, *args) -> tuple[int, str, str]:
    path = tmp_path / f"train-{len(list(tmp_path.glob('train-*')))}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return cli("run", path, *args)


@pytest.mark.parametrize("data", [{"layout": "pack"}, {"layout": "pad"}, {"layout": "pack", "seq_len": 38}],
                         ids=["pack", "pad", "answers-cut-at-seq_len"])
def test_a_steps_kd_loss_from_stored_top_k_is_the_cached_teachers(assets, written, tmp_path, data):
    """The same batches, the same student: forward KL to the targets stored while the teacher wrote its answers
    equals forward KL to a teacher cache written by running the teacher over the rows (`cached`'s store); also
    when seq_len cuts answers short (their first tokens keep their targets)."""
    from conftest import engine_for
    from kdistill import ModelOutputs, Needs, SparseTargets
    from kdistill.plugins.teachers.cache_store import TeacherCache, write_cache
    from kdistill.plugins.teachers.hf import HFTeacher

    engine = engine_for(training(assets, tmp_path, written["with_k"], data=data))
    engine.build()
    assert (engine.data.counts["cut"] > 0) == ("seq_len" in data)
    assert engine.teacher.model is None and engine.flops_per_token == 6 * sum(p.numel() for p in engine.student.parameters())
    live = HFTeacher(HFTeacher.Options(model=assets["teacher"]))
    live.load(torch.device("cpu"))
    write_cache(live, engine.data, tmp_path / "cache", k=8, temperature=1.0, shard_sequences=4, batch_size=4,
                device=torch.device("cpu"), teacher_identity={}, progress=False)
    cache = TeacherCache(tmp_path / "cache")

    def cached(batch, needs) -> ModelOutputs:
        t, width = cache.lookup(batch.keys), batch.input_ids.shape[1]  # cached rows are seq_len wide
        return ModelOutputs(sparse=SparseTargets(t.ids[:, :width], t.logprobs[:, :width], t.log_tail[:, :width], t.temperature))

    step = engine.strategy.step
    stored_outputs = step.teacher_outputs
    for index in range(3):
        batch = engine.data.train_batch(index, 3)
        _, terms = engine.strategy.loss(batch)
        step.teacher_outputs = cached
        _, reference = engine.strategy.loss(batch)
        step.teacher_outputs = stored_outputs
        mask, stored, other = batch.mask, stored_outputs(batch, Needs()).sparse, cached(batch, Needs()).sparse
        assert int(mask.sum()) > 0
        # at every counted position the same 8 tokens with the same log-probabilities (written from logits of a
        # KV-cached generate, here from a forward over the packed or padded row: equal to float rounding)
        order, other_order = stored.logprobs[mask].argsort(-1), other.logprobs[mask].argsort(-1)
        assert torch.equal(stored.ids[mask].gather(1, order), other.ids[mask].gather(1, other_order))
        assert torch.allclose(stored.logprobs[mask], other.logprobs[mask], atol=1e-6)
        assert torch.allclose(terms["forward-kl"], reference["forward-kl"], rtol=1e-5)
        assert torch.equal(terms["cross-entropy"], reference["cross-entropy"])


def test_run_writes_the_answers_with_the_source_then_trains_without_a_teacher_forward(assets, tmp_path):
    folder = tmp_path / "answers"
    raw = training(assets, tmp_path, folder, teacher={"load_source": True}, generator={"top_k": 8})
    code, _, stderr = run_cli(raw, tmp_path)
    assert code == 0, stderr
    assert "the teacher is writing answers to 10 prompts first" in stderr
    assert json.loads((folder / "generation.json").read_text())["top_k"]["k"] == 8
    before = shard_bytes(folder)
    raw["teacher"]["options"]["load_source"] = False  # the answers are complete: no teacher weights at all
    code, _, stderr = run_cli(raw, tmp_path, "--overwrite")
    assert code == 0, stderr
    assert "writing answers" not in stderr and shard_bytes(folder) == before
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"train/forward-kl"') == 2  # 2 steps


def test_bad_input_is_one_line(assets, written, tmp_path):
    with_k, without = written["with_k"], written["without"]

    def refused(raw) -> str:
        code, _, stderr = run_cli(raw, tmp_path)
        assert code == 2, stderr
        return stderr.strip()

    raw = training(assets, tmp_path, with_k)
    raw["data"] = {"name": "text-files", "options": {"paths": [assets["corpus"]], "seq_len": 32}}
    assert refused(raw) == ("error: data: the answers-top-k teacher reads the answers' stored top-k through the "
                            "conversations data source, not 'text-files'")
    assert refused(training(assets, tmp_path, without)) == (
        f"error: data.options.paths: {without} holds answers without the teacher's top-k log-probabilities; write them "
        "with generator.options.top_k (kdistill generate RECIPE --overwrite)")
    table = tmp_path / "qa.jsonl"
    table.write_text("".join(json.dumps({"prompt": q, "completion": "the king"}) + "\n" for q in QUESTIONS))
    assert refused(training(assets, tmp_path, table)) == (
        "error: data.options.paths: the answers-top-k teacher needs one folder written by kdistill generate with "
        f"generator.options.top_k, not {table}")
    assert refused(training(assets, tmp_path, with_k, data={"loss_on": "all"})) == (
        "error: data.options.loss_on: 'all' counts the prompts' tokens too, and only the tokens the teacher generated "
        "have stored top-k; the answers-top-k teacher needs loss_on: completion")
    assert refused(training(assets, tmp_path, with_k, data={"chat_template": False})) == (
        "error: data.options.chat_template: the stored top-k are the teacher's in its chat template; the answers-top-k "
        "teacher needs chat_template: true")
    assert refused(training(assets, tmp_path, with_k, data={"streaming": True, "max_val_examples": 2})) == (
        "error: data.options.streaming: the answers-top-k teacher finds a batch's answers by its keys, which a streamed "
        "source does not give; use streaming: false")
    hot = [{"name": "forward-kl", "options": {"temperature": 2.0}}]
    assert refused(training(assets, tmp_path, with_k, losses=hot)) == (
        "error: losses: 'forward-kl' uses temperature 2.0 but the stored top-k are at 1.0 "
        "(generator.options.top_k_temperature)")
    assert refused(training(assets, tmp_path, with_k, losses=[{"name": "tvd"}])) == (
        "error: losses: 'tvd' is not defined on top-k targets; with the answers-top-k teacher use forward-kl, "
        "reverse-kl, jsd or skew-kl")
    raw = training(assets, tmp_path, with_k, generator={"top_k": 8})
    del raw["teacher"]["options"]["source"]
    assert refused(raw) == (
        "error: teacher.options.source: the generator's answers are the live teacher's; teacher 'answers-top-k' runs "
        "none, so name it there ({model: ...}, as for the hf teacher)")
    other = assets["plain_teacher"]  # the tiny teacher before its <eos> row was changed
    raw = training(assets, tmp_path, with_k, teacher={"source": {"model": other}})
    assert refused(raw) == (f"error: teacher.options.source.model: the teacher at {other} has other weights than the one "
                            f"that wrote the answers in {with_k}")
    raw = training(assets, tmp_path, with_k, data={"layout": "pad"})
    raw["strategy"] = {"name": "on-policy"}  # the student's own answers have no stored targets
    code, _, stderr = run_cli(raw, tmp_path)
    assert code == 2 and "teacher.name: teacher 'answers-top-k' holds targets for the data's own text" in stderr
    missing = tmp_path / "not-written"
    assert refused(training(assets, tmp_path, missing, generator={"top_k": 8})) == (
        "error: teacher.options.load_source: 10 prompts still need answers, which the live teacher writes; teacher "
        "'answers-top-k' loads its source's weights only with load_source: true")
    assert not missing.exists()
