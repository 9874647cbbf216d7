"""On-policy distillation: the student's own answers, the GKD mixture, the sampled-token loss, resume, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdistill
from conftest import CHAT_QA, chat_assets, cut_after, engine_for, tiny_recipe
from kdistill import IGNORE_INDEX, ConfigError, KdistillError
from kdistill.plugins.losses.sampled_reverse_kl import SampledReverseKL
from kdistill.toolkit import sample_completions

# --------------------------------------------------------------------------- the sampled-token loss

def test_sampled_reverse_kl_value_and_gradient_against_float64():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 6, (2, 3), generator=g)
    labels[1, 0] = IGNORE_INDEX
    x = student.clone().requires_grad_(True)
    batch = kdistill.Batch(input_ids=labels.clamp(min=0), labels=labels)
    value = SampledReverseKL()(kdistill.ModelOutputs(logits=x), kdistill.ModelOutputs(logits=teacher), batch)
    value.backward()
    expected_value, expected_grad = 0.0, torch.zeros_like(student)
    for b in range(2):
        for s in range(3):
            y = int(labels[b, s])
            if y == IGNORE_INDEX:
                continue
            zs, zt = student[b, s].tolist(), teacher[b, s].tolist()
            log_ps = [z - math.log(sum(math.exp(w) for w in zs)) for z in zs]
            log_pt = [z - math.log(sum(math.exp(w) for w in zt)) for z in zt]
            penalty = log_ps[y] - log_pt[y]
            expected_value += penalty
            for v in range(6):  # REINFORCE: penalty * d log p_s(y) / d z_v
                expected_grad[b, s, v] = penalty * ((v == y) - math.exp(log_ps[v]))
    assert value.item() == pytest.approx(expected_value, rel=1e-9)
    assert torch.allclose(x.grad, expected_grad, atol=1e-9)


def test_sampled_reverse_kl_gradient_is_the_full_reverse_kl_gradient_in_expectation():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    n = 40_000
    labels = torch.multinomial(torch.softmax(student, -1), n, replacement=True, generator=g)
    x = student.expand(n, 5).clone().requires_grad_(True)
    loss = SampledReverseKL()
    loss.rows(x, teacher.expand(n, 5), labels).sum().backward()
    estimate = x.grad.sum(0) / n
    exact = student.clone().requires_grad_(True)
    ps, log_ps, log_pt = torch.softmax(exact, -1), torch.log_softmax(exact, -1), torch.log_softmax(teacher, -1)
    (ps * (log_ps - log_pt)).sum().backward()
    assert torch.allclose(estimate, exact.grad, atol=0.03), (estimate, exact.grad)


def test_sampled_reverse_kl_reads_the_sampled_token_from_top_k_targets_at_temperature_one():
    student = torch.randn(4, 9, dtype=torch.float64)
    teacher = torch.randn(4, 9, dtype=torch.float64)
    labels = torch.tensor([0, 3, 8, 5])
    log_pt = torch.log_softmax(teacher, -1)
    top = log_pt.topk(4, -1)
    top_ids = torch.where((top.indices == labels[:, None]).any(-1, keepdim=True), top.indices,
                          torch.cat([top.indices[:, :3], labels[:, None]], -1))
    sparse = kdistill.SparseTargets(top_ids, log_pt.gather(-1, top_ids), torch.zeros(4, dtype=torch.float64), 1.0)
    loss = SampledReverseKL()
    assert torch.allclose(loss.rows(student, sparse, labels), loss.rows(student, teacher, labels))
    missing = kdistill.SparseTargets(top.indices[:, :1], top.values[:, :1], torch.zeros(4, dtype=torch.float64), 1.0)
    with pytest.raises(ConfigError, match="a sampled token is not among the teacher's top-k"):
        loss.rows(student, missing, torch.where(labels == top.indices[:, 0], (labels + 1) % 9, labels))


# --------------------------------------------------------------------------- the strategy

@pytest.fixture(scope="module")
def chat_teacher(tiny_assets, tmp_path_factory):
    return chat_assets(tiny_assets, tmp_path_factory.mktemp("chat"))[0]


def on_policy_recipe(tiny_assets, chat_teacher, tmp_path, **options):
    _, data = chat_assets(tiny_assets, tmp_path)
    raw = tiny_recipe({**tiny_assets, "teacher": str(chat_teacher)}, tmp_path / "run", steps=4, save_every=2, batch_size=3)
    raw["data"] = data
    raw["strategy"] = {"name": "on-policy", "options": {"max_new_tokens": 6, "temperature": 1.0, **options}}
    raw["losses"] = [{"name": "jsd", "weight": 1.0, "options": {"beta": 0.5}}]
    return raw


def test_the_student_learns_on_its_own_answers_to_the_batch_prompts(tiny_assets, chat_teacher, tmp_path):
    engine = engine_for(on_policy_recipe(tiny_assets, chat_teacher, tmp_path))
    engine.build()
    strategy, data = engine.strategy, engine.data.train_batch(0, 3)
    made = strategy.prepare_batch(data, 5)
    assert torch.equal(made.input_ids, strategy.prepare_batch(data, 5).input_ids)  # a function of the index: resumable
    assert not torch.equal(made.input_ids, strategy.prepare_batch(data, 6).input_ids)
    prompts = strategy._prompts(data)
    seed = __import__("kdistill.strategies.on_policy", fromlist=["_seed"])._seed(0, 5, 0)
    answers = sample_completions(engine.student, engine.tokenizer, prompts, max_new_tokens=6, temperature=1.0, seed=seed,
                                 keep_stop=True)
    eos = engine.tokenizer.eos_token_id
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        assert 1 <= len(answer) <= 6 and eos not in answer[:-1]
        n = len(prompt) + len(answer) - 1
        assert made.input_ids[row, :len(prompt)].tolist() == prompt  # the data's prompt, unchanged
        counted = made.labels[row][made.labels[row] != IGNORE_INDEX].tolist()
        assert counted == answer  # exactly the student's own answer (and its stop token) count
        assert made.labels[row, len(prompt) - 1:n].tolist() == answer and int(made.attention_mask[row].sum()) == n
    assert engine.student.training  # back in train mode after sampling
    metrics = strategy.step_metrics()
    assert metrics["on_policy/sampled_answers"] == 9 and metrics["on_policy/student_batches"] == 3


def test_lmbda_is_the_share_of_micro_batches_on_the_students_answers(tiny_assets, chat_teacher, tmp_path):
    engine = engine_for(on_policy_recipe(tiny_assets, chat_teacher, tmp_path, lmbda=0.3, max_new_tokens=1))
    engine.build()
    data = engine.data.train_batch(0, 3)
    changed = sum(not torch.equal(engine.strategy.prepare_batch(data, i).labels, data.labels) for i in range(200))
    assert 40 <= changed <= 80  # 200 draws at 0.3: 60 +- 6.5 (one standard deviation)
    engine.strategy.options = engine.strategy.Options(lmbda=0.0)
    assert all(engine.strategy.prepare_batch(data, i) is data for i in range(20))  # offline on the data's answers


def test_an_on_policy_run_trains_logs_its_samples_and_resumes_exactly(tiny_assets, chat_teacher, tmp_path):
    raw = on_policy_recipe(tiny_assets, chat_teacher, tmp_path, lmbda=0.5, refresh_every=2, generation_dtype="bfloat16")
    summary = kdistill.run(raw)
    rows = [json.loads(line) for line in (Path(raw["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    # lmbda 0.5: micro-batches 1 and 2 (steps 2 and 3) drew the student's answers, one of them after the resume point
    drawn = [r["metrics"]["on_policy/student_batches"] for r in rows if "on_policy/student_batches" in r.get("metrics", {})]
    assert drawn == [0, 1, 1, 0] and math.isfinite(summary["after"]["val/student_loss"])
    resumed = cut_after(raw, tmp_path / "resumed", "step-00000004")
    kdistill.run(resumed, resume=True)
    a = load_file(str(Path(raw["output_dir"]) / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change, message", [
    (lambda r: r["data"]["options"].update(layout="pack"),
     "data.options.layout: strategy on-policy samples an answer to each row's prompt, so it needs one example per row "
     "(layout: pad)"),
    (lambda r: r["data"]["options"].update(loss_on="all"),
     "data.options.loss_on: strategy on-policy finds each prompt where its counted answer begins (loss_on: completion)"),
    (lambda r: r["strategy"]["options"].update(max_new_tokens=64),
     "strategy.options.max_new_tokens: 64 leaves no room for a prompt in data.options.seq_len 64"),
    (lambda r: r["strategy"]["options"].update(refresh_every=3),
     "strategy.options.refresh_every: 3 must divide train.save_every (2), so that a resumed run samples with the same "
     "weights"),
    (lambda r: r.update(data={"name": "text-files", "options": {"paths": [r["teacher"]["options"]["model"] + "/../corpus.txt"]}}),
     "data.name: strategy on-policy samples answers to prompts; data source 'text-files' has none (use conversations: "
     "prompt + completion, or messages)"),
])
def test_what_on_policy_cannot_work_with_is_refused_before_anything_loads(tiny_assets, chat_teacher, tmp_path, change, message):
    raw = on_policy_recipe(tiny_assets, chat_teacher, tmp_path)
    change(raw)
    if raw["data"]["name"] == "text-files":
        raw["data"]["options"]["paths"] = [tiny_assets["corpus"]]
    with pytest.raises(KdistillError) as err:
        engine_for(raw)
    assert message in err.value.problems
    assert not (tmp_path / "run").exists()


def test_an_answer_that_cannot_fit_after_the_longest_prompt_is_refused_before_training(tiny_assets, chat_teacher, tmp_path):
    from transformers import AutoTokenizer

    long_prompt = "the king shall speak of love and war"
    rows = [{"prompt": q, "completion": a} for q, a in CHAT_QA] + [{"prompt": long_prompt, "completion": "no"}]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:3] + rows[-1:] + rows[3:-1]))  # the long one is row 3
    tokenizer = AutoTokenizer.from_pretrained(chat_teacher)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": long_prompt}], tokenize=False,
                                             add_generation_prompt=True)
    n = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])  # the prompt's tokens, counted apart
    room = 64 + 1 - n  # rows hold seq_len + 1 tokens; the answer's last token is only a label
    assert 0 < room < 64

    def recipe(max_new_tokens):
        raw = on_policy_recipe(tiny_assets, chat_teacher, tmp_path, max_new_tokens=max_new_tokens)
        raw["data"]["options"].update(paths=[str(path)], val_fraction=0)
        raw["evaluators"] = []
        return raw

    with pytest.raises(ConfigError) as err:
        engine_for(recipe(room + 1)).build()
    assert str(err.value) == (f"strategy.options.max_new_tokens: {room + 1} new tokens after the data's longest prompt "
                              f"({n} tokens, {path} row 3) exceed data.options.seq_len 64; at most {room} fit (or raise "
                              "seq_len)")
    engine = engine_for(recipe(room))
    engine.build()  # exactly room: the longest answer after the longest prompt fills a row of seq_len


def test_a_cached_teacher_cannot_score_the_students_answers(tiny_assets, chat_teacher, tmp_path):
    raw = on_policy_recipe(tiny_assets, chat_teacher, tmp_path)
    raw["teacher"] = {"name": "cached", "options": {"path": str(tmp_path / "cache"), "k": 8,
                                                    "source": {"model": str(chat_teacher)}}}
    with pytest.raises(KdistillError) as err:
        engine_for(raw)
    assert ("teacher.name: teacher 'cached' holds targets for the data's own text and cannot score the student's "
            "answers (strategy on-policy); use a teacher that runs (hf)") in err.value.problems


def test_prompts_alone_are_refused_to_a_strategy_that_does_not_write_answers(tiny_assets, chat_teacher, tmp_path):
    raw = on_policy_recipe(tiny_assets, chat_teacher, tmp_path)
    raw["data"]["options"]["format"] = "prompt"
    raw["strategy"] = {"name": "offline"}
    with pytest.raises(KdistillError) as err:
        engine_for(raw)
    assert ("data.options.format: prompts alone leave strategy 'offline' nothing to learn; give answers too, or use a "
            "strategy that writes them (on-policy)") in err.value.problems


def test_lmbda_zero_is_the_offline_strategy_bit_for_bit(tiny_assets, chat_teacher, tmp_path):
    raw = on_policy_recipe(tiny_assets, chat_teacher, tmp_path, lmbda=0.0)
    kdistill.run(raw)
    offline = json.loads(json.dumps(raw))
    offline["strategy"], offline["output_dir"] = {"name": "offline"}, str(tmp_path / "offline")
    kdistill.run(offline)
    a = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "offline" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_loss_on_the_students_answers_against_a_float64_reference(tiny_assets, chat_teacher, tmp_path):
    engine = engine_for(on_policy_recipe(tiny_assets, chat_teacher, tmp_path))
    engine.build()
    made = engine.strategy.prepare_batch(engine.data.train_batch(1, 3), 1)
    total, terms = engine.strategy.loss(made)
    with torch.no_grad():
        s = engine.student(input_ids=made.input_ids, attention_mask=made.attention_mask).logits.double()
        t = engine.teacher.model(input_ids=made.input_ids, attention_mask=made.attention_mask).logits.double()
    expected = 0.0
    for row, position in (made.labels != IGNORE_INDEX).nonzero().tolist():  # JSD, beta 0.5, T = 1, summed
        ps, pt = torch.softmax(s[row, position], -1), torch.softmax(t[row, position], -1)
        m = 0.5 * ps + 0.5 * pt
        expected += float(0.5 * (pt * (pt / m).log()).sum() + 0.5 * (ps * (ps / m).log()).sum())
    assert total.item() == pytest.approx(expected, rel=1e-4)


def test_on_policy_trains_on_prompts_alone_and_refuses_lmbda_below_one_there(tiny_assets, chat_teacher, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{q} {i}"}) + "\n" for i in range(3) for q, _ in CHAT_QA))
    raw = on_policy_recipe(tiny_assets, chat_teacher, tmp_path, lmbda=1.0)
    raw["data"]["options"].update(paths=[str(prompts)], format="prompt", val_fraction=0)
    raw["evaluators"] = []
    engine = engine_for(raw)
    engine.build()
    data = engine.data.train_batch(0, 3)
    made = engine.strategy.prepare_batch(data, 0)
    for row in range(3):  # the whole prompt, then the student's answer, which alone counts
        n = int(data.attention_mask[row].sum())
        assert made.input_ids[row, :n].tolist() == data.input_ids[row, :n].tolist()
        assert int((made.labels[row, :n - 1] != IGNORE_INDEX).sum()) == 0 and made.labels[row, n - 1] != IGNORE_INDEX
    summary = kdistill.run(raw)
    assert summary["after"] is not None
    raw["strategy"]["options"]["lmbda"] = 0.5
    with pytest.raises(KdistillError) as err:
        engine_for(raw)
    assert ("strategy.options.lmbda: 0.5 trains some batches on the data's answers, but data.options.format prompt has "
            "none; use lmbda: 1") in err.value.problems


def test_sampling_draws_from_the_whole_distribution_not_a_top_k_cut(tiny_assets):
    """transformers' default top-k of 50 (or a checkpoint's generation config) must not cut what the student
    samples: on-policy losses assume the answers are drawn from the student's distribution."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], torch_dtype=torch.float32)
    model.generation_config.top_k = 50
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    prompt = [5, 6, 7]
    drawn = {sample_completions(model, tokenizer, [prompt], max_new_tokens=1, temperature=1.0, seed=s, keep_stop=True)[0][0]
             for s in range(300)}
    with torch.no_grad():
        top50 = set(model(torch.tensor([prompt])).logits[0, -1].topk(50).indices.tolist())
    assert drawn - top50  # tokens outside the 50 most likely are drawn too
