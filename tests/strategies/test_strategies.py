"""Training strategies on tiny models: what trains, what stays frozen, exact resume, and each one's own rule."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

import kdistill
from conftest import cut_after, engine_for
from kdistill.strategies.mtp_self import MTPHeads
from kdistill.strategies.multi_view import augment

STRATEGIES = {
    "online": {"teacher_lr_scale": 0.5},
    "mutual": {"peer_layers": [[1, 2]]},
    "ema-self": {"decay": 0.9},
    "multi-view": {"view": "mask", "rate": 0.2},
    "mtp-self": {"n_future": 2},
}


def strategy_recipe(recipe_factory, name, **train):
    raw = recipe_factory(**{"steps": 4, "save_every": 2, "keep_checkpoints": 3, "eval_every": 0, **train})
    raw["strategy"] = {"name": name, "options": STRATEGIES[name]}
    raw["evaluators"] = []
    return raw


def checkpoint_modules(folder):
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_resume_is_exact(recipe_factory, tmp_path, name):
    raw = strategy_recipe(recipe_factory, name)
    engine_for(raw).run()
    run = tmp_path / "run"
    resumed = tmp_path / "resumed"
    again = cut_after(raw, resumed, "step-00000004")
    engine_for(again).run(resume=True)
    a, b = checkpoint_modules(run / "checkpoints" / "step-00000004"), checkpoint_modules(resumed / "checkpoints" / "step-00000004")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), name  # every trained module, EMA and heads included


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_online_trains_the_teacher_at_its_own_rate(recipe_factory):
    engine = engine_for(strategy_recipe(recipe_factory, "online", steps=2))
    engine.build()
    teacher, student = engine.teacher.model, engine.student
    t0, s0 = snapshot(teacher), snapshot(student)
    assert {g["name"]: g["lr"] for g in engine.optimizer.param_groups} == {"student": 1e-3, "teacher": 5e-4}
    for step in range(2):
        metrics = engine.train_step(step)
    assert teacher.training and all(p.requires_grad for p in teacher.parameters())
    assert len(changed(t0, teacher)) == len(t0) and len(changed(s0, student)) == len(s0)
    assert metrics["train/teacher_ce"] > 0 and metrics["train/forward-kl"] > 0


def test_online_student_gradient_does_not_reach_the_teacher(recipe_factory):
    engine = engine_for(strategy_recipe(recipe_factory, "online"))
    engine.build()
    engine.strategy.options = engine.strategy.Options(teacher_weight=0.0)
    batch = engine.micro_batch(0)
    total, _ = engine.strategy.loss(batch)
    total.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in engine.teacher.model.parameters())
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in engine.student.parameters())


def test_mutual_trains_every_peer_and_leaves_the_teacher_alone(recipe_factory):
    engine = engine_for(strategy_recipe(recipe_factory, "mutual"))
    engine.build()
    peer = engine.strategy.peers[1]
    p0, s0, t0 = snapshot(peer), snapshot(engine.student), snapshot(engine.teacher.model)
    metrics = engine.train_step(0)
    assert len(changed(p0, peer)) == len(p0) and len(changed(s0, engine.student)) == len(s0)
    assert not changed(t0, engine.teacher.model)
    assert {"train/forward-kl", "train/peer1_forward-kl", "train/cross-entropy", "train/peer1_cross-entropy"} <= set(metrics)


def test_ema_follows_the_student_by_the_closed_form(recipe_factory):
    engine = engine_for(strategy_recipe(recipe_factory, "ema-self"))
    engine.build()
    ema = engine.strategy.ema
    start = snapshot(ema)
    assert not any(p.requires_grad for p in ema.parameters())
    engine.train_step(0)
    after_student = snapshot(engine.student)
    for name, value in ema.named_parameters():
        assert torch.allclose(value, 0.9 * start[name] + 0.1 * after_student[name], atol=1e-7), name
    trained = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    assert not any(id(p) in trained for p in ema.parameters())


def test_views_keep_positions_and_labels_aligned():
    ids = torch.arange(2 * 64).reshape(2, 64) % 50 + 10
    masked = augment(ids, "mask", 0.25, 4, 4, 0, seed=0)
    share = (masked == 0).float().mean().item()
    assert 0.1 < share < 0.4 and torch.equal(masked[masked != 0], ids[masked != 0])
    assert torch.equal(masked, augment(ids, "mask", 0.25, 4, 4, 0, seed=0))  # a pure function of the ids
    assert not torch.equal(masked, augment(ids, "mask", 0.25, 4, 4, 0, seed=1))
    spans = augment(ids, "span", 0.3, 4, 4, 0, seed=0)
    assert (spans == 0).any()
    shuffled = augment(ids, "shuffle", 0.1, 4, 8, 0, seed=0)
    assert not torch.equal(shuffled, ids)
    for start in range(0, 64, 8):  # each window holds the same tokens, in another order
        assert torch.equal(shuffled[:, start:start + 8].sort().values, ids[:, start:start + 8].sort().values)


def test_multi_view_teacher_sees_the_view_and_the_student_trains(recipe_factory):
    engine = engine_for(strategy_recipe(recipe_factory, "multi-view"))
    engine.build()
    s0 = snapshot(engine.student)
    seen = []
    original = engine.strategy.view
    engine.strategy.view = lambda ids: seen.append(ids) or original(ids)
    metrics = engine.train_step(0)
    assert seen and len(changed(s0, engine.student)) == len(s0)
    assert metrics["train/forward-kl"] > 0


def test_mtp_heads_are_causal():
    torch.manual_seed(0)
    heads = MTPHeads(width=16, attention_heads=4, n_future=3).eval()
    hidden = torch.randn(2, 12, 16)
    later = hidden.clone()
    later[:, 7] += torch.randn(16) * 3  # change position 7 only (not by a constant: layer norm would remove it)
    with torch.no_grad():
        a, b = heads(hidden), heads(later)
    for x, y in zip(a, b):
        assert torch.allclose(x[:, :7], y[:, :7], atol=1e-6), "a head saw a later position"
        assert not torch.allclose(x[:, 7:], y[:, 7:])


def test_mtp_future_token_does_not_change_earlier_auxiliary_outputs(recipe_factory):
    """Through the whole model: changing input token j leaves every auxiliary head's output before j alone."""
    engine = engine_for(strategy_recipe(recipe_factory, "mtp-self"))
    engine.build()
    from kdistill.core.fused import final_hidden

    batch = engine.micro_batch(0)
    ids = batch.input_ids.clone()
    changed_ids = ids.clone()
    j = ids.shape[1] // 2
    changed_ids[:, j] = (changed_ids[:, j] + 7) % engine.student.config.vocab_size
    with torch.no_grad():
        outs = [engine.strategy.heads(final_hidden(engine.student, kdistill.Batch(x, x)).final_hidden) for x in (ids, changed_ids)]
    for x, y in zip(*outs):
        assert torch.allclose(x[:, :j], y[:, :j], atol=1e-5)
        assert not torch.allclose(x[:, j:], y[:, j:], atol=1e-5)


def test_mtp_trains_the_heads_and_the_student(recipe_factory):
    engine = engine_for(strategy_recipe(recipe_factory, "mtp-self"))
    engine.build()
    h0, s0, t0 = snapshot(engine.strategy.heads), snapshot(engine.student), snapshot(engine.teacher.model)
    metrics = engine.train_step(0)
    assert len(changed(h0, engine.strategy.heads)) == len(h0) and len(changed(s0, engine.student)) == len(s0)
    assert not changed(t0, engine.teacher.model)
    assert metrics["train/mtp_ce"] > 0 and metrics["train/mtp_distill"] > 0


def mixture_source(tiny_assets, tmp_path, weights=(0.3, 0.7), seed=0):
    from transformers import AutoTokenizer

    from kdistill.plugins.data.mixture import Mixture

    task = tmp_path / "task.txt"
    task.write_text("thou shalt not pass the bridge of the king.\n" * 4)  # a small task source
    options = Mixture.Options(seq_len=16, val_fraction=0.1, sources=[
        {"name": "task", "paths": [str(task)], "weight": weights[0]},
        {"name": "general", "paths": [tiny_assets["corpus"]], "weight": weights[1]}])
    source = Mixture(options)
    source.setup(AutoTokenizer.from_pretrained(tiny_assets["teacher"], local_files_only=True), seed)
    return source


def test_mixture_share_of_task_draws_matches_the_weight(tiny_assets, tmp_path):
    source = mixture_source(tiny_assets, tmp_path, weights=(0.3, 0.7))
    drawn = source.sources_of(range(2000))
    share = drawn.count(0) / 2000
    assert abs(share - 0.3) <= 0.03, share


def test_mixture_restarts_an_exhausted_source_with_each_block_once_per_epoch(tiny_assets, tmp_path):
    source = mixture_source(tiny_assets, tmp_path, weights=(0.5, 0.5))
    task = source.parts[0]
    n = task.n_train
    assert n < 20  # a small task source, drawn many times over
    rows = [row for s, row in zip(*source._rows(range(400))) if s == 0]
    assert len(rows) > 3 * n
    for epoch in range(len(rows) // n):
        assert sorted(rows[epoch * n:(epoch + 1) * n]) == sorted(task._train.tolist()), epoch
    assert rows[:n] != rows[n:2 * n]  # a new order each epoch


def test_mixture_is_deterministic_and_order_free(tiny_assets, tmp_path):
    a = mixture_source(tiny_assets, tmp_path)
    b = mixture_source(tiny_assets, tmp_path)
    late = b.train_batch(37, 4)  # b reads batch 37 first, as a resumed run would
    assert torch.equal(a.train_batch(37, 4).input_ids, late.input_ids)
    for i in range(5):
        x, y = a.train_batch(i, 4), b.train_batch(i, 4)
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.keys, y.keys)
        assert torch.equal(b.batch_for_keys(y.keys).input_ids, y.input_ids)
    c = mixture_source(tiny_assets, tmp_path, seed=1)
    assert not torch.equal(c.train_batch(0, 8).input_ids, a.train_batch(0, 8).input_ids)
    assert c.fingerprint() != a.fingerprint()


def test_mixture_in_a_run_resumes_exactly(recipe_factory, tiny_assets, tmp_path):
    task = tmp_path / "task.txt"
    task.write_text("thou shalt not pass the bridge of the king.\n" * 50)
    raw = recipe_factory(steps=4, save_every=2, keep_checkpoints=3, eval_every=0)
    raw["data"] = {"name": "mixture", "options": {"seq_len": 32, "val_fraction": 0.1, "max_val_blocks": 4, "sources": [
        {"name": "task", "paths": [str(task)], "weight": 0.5}, {"name": "general", "paths": [tiny_assets["corpus"]], "weight": 0.5}]}}
    engine_for(raw).run()
    resumed = tmp_path / "resumed"
    again = cut_after(raw, resumed, "step-00000004")
    engine_for(again).run(resume=True)
    a = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    b = load_file(str(resumed / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def chain_recipe(recipe_factory):
    raw = recipe_factory(steps=2, save_every=1, keep_checkpoints=3, eval_every=0)
    raw["student"] = {"from_teacher": {"layers": [0, 2]}}  # cut from the intermediate student (3 layers)
    raw["strategy"] = {"name": "progressive", "options": {"stages": [
        {"name": "mid", "student": {"from_teacher": {"layers": [0, 2, 3]}}, "steps": 2}]}}
    return raw


def test_progressive_chain_nested_runs_and_resume_skipping_finished_stages(recipe_factory, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    import kdistill
    from kdistill.core.config import resolve
    from kdistill.core.engine import Engine
    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = chain_recipe(recipe_factory)
    raw["tracker"] = {"name": "mlflow", "options": {"experiment": "chain"}}
    started = []

    class Count:
        @kdistill.hookimpl
        def kd_run_started(self, recipe, output_dir):
            started.append(output_dir)

    def engine(recipe):
        pm = make_plugin_manager(extra_plugins=[("count", Count())])
        registry = Registry.from_plugins(pm)
        return Engine(resolve(recipe, registry), pm, registry)

    summary = engine(raw).run()
    run = tmp_path / "run"
    assert started == [str(run / "stages" / "mid"), str(run / "stages" / "final")]
    import yaml

    final_recipe = yaml.safe_load((run / "stages" / "final" / "recipe.yaml").read_text())
    assert final_recipe["teacher"]["options"]["model"] == str(run / "stages" / "mid" / "final")
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(run / "stages" / "mid" / "final").num_hidden_layers == 3
    assert AutoConfig.from_pretrained(run / "final").num_hidden_layers == 2
    assert set(summary["stages"]) == {"mid", "final"}

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("chain").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "run")
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == {"run-mid", "run-final"} and parent.info.status == "FINISHED"

    # the last stage dies after its first checkpoint: --resume skips "mid" and resumes "final" exactly
    reference = load_file(str(run / "final" / "model.safetensors"))
    stage = run / "stages" / "final"
    (stage / "summary.json").unlink()
    shutil.rmtree(stage / "final")
    shutil.rmtree(stage / "checkpoints" / "step-00000002")
    shutil.rmtree(run / "final")
    mid_mtime = (run / "stages" / "mid" / "final" / "model.safetensors").stat().st_mtime_ns
    started.clear()
    engine(raw).run(resume=True)
    assert started == [str(stage)]
    assert (run / "stages" / "mid" / "final" / "model.safetensors").stat().st_mtime_ns == mid_mtime
    again = load_file(str(run / "final" / "model.safetensors"))
    assert all(torch.equal(reference[k], again[k]) for k in reference)


def test_progressive_validates_every_stage_before_running(recipe_factory, tmp_path):
    from kdistill.core.errors import KdistillError

    raw = chain_recipe(recipe_factory)
    raw["strategy"]["options"]["stages"][0]["student"] = {"from_teacher": {"layers": [0]}, "dtype": "float8"}
    with pytest.raises(KdistillError) as err:
        engine_for(raw).run()
    assert str(err.value).startswith("strategy.options.stages[0] (mid): student.dtype: ")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("bitsandbytes") is None,
                    reason="needs bitsandbytes: pip install 'kdistill[quant]' (.ci/run does)")
def test_online_refuses_a_quantized_teacher_it_could_not_train(recipe_factory):
    from kdistill.core.errors import KdistillError

    raw = strategy_recipe(recipe_factory, "online")
    raw["teacher"]["options"]["quantization"] = "nf4"
    with pytest.raises(KdistillError) as err:
        engine_for(raw).run()
    assert str(err.value) == "teacher.options.quantization: an online teacher trains, so it cannot be quantized"


def test_the_fused_paths_options_reach_it_and_change_only_the_chunk(recipe_factory, monkeypatch):
    import kdistill.core.step as step_module

    seen = []
    original = step_module.fused_logit_loss

    def spy(*args, **kwargs):
        seen.append((args[5], kwargs))
        return original(*args, **kwargs)
    monkeypatch.setattr(step_module, "fused_logit_loss", spy)
    results = []
    for options in ({}, {"memory_budget_mib": 0.01}, {"chunk_tokens": 3}):
        raw = recipe_factory(steps=1, eval_every=0)
        raw["evaluators"] = []
        raw["strategy"] = {"name": "offline", "options": options}
        engine = engine_for(raw)
        engine.build()
        results.append(engine.train_step(0)["train/loss"])
    assert [(chunk, kw["memory_budget_mib"]) for chunk, kw in seen] == [(None, None), (None, 0.01), (3, None)]
    assert results[1] == pytest.approx(results[0], rel=1e-5) and results[2] == pytest.approx(results[0], rel=1e-5)
