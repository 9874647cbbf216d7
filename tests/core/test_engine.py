"""The engine on tiny models: frozen teacher, accumulation, output-folder rules, saved student."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import kdistill
from conftest import engine_for, nan_at
from kdistill.core.errors import KdistillError
from kdistill.plugins.mappers.uniform import UniformMapper
from kdistill.plugins.schedulers.constant import Constant
from kdistill.plugins.schedulers.cosine_warmup import CosineWarmup
from kdistill.plugins.schedulers.linear import Linear


def test_teacher_is_frozen_in_eval_mode_and_gets_no_gradients(recipe_factory):
    engine = engine_for(recipe_factory(steps=3))
    seen = []

    def spy(module, args, kwargs):
        seen.append((module.training, torch.is_grad_enabled()))

    original_build = engine.build

    def build_and_spy():
        original_build()
        # the base model runs on both paths (the fused one skips the head)
        engine.teacher.model.base_model.register_forward_pre_hook(spy, with_kwargs=True)
        engine.before_weights = {k: v.clone() for k, v in engine.teacher.model.state_dict().items()}

    engine.build = build_and_spy
    engine.run()
    assert len(seen) >= 3  # one teacher forward per step, plus evaluation
    assert all(training is False and grad is False for training, grad in seen)
    teacher = engine.teacher.model
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, engine.before_weights[k]) for k, v in teacher.state_dict().items())
    assert engine.student.training  # the student was trained
    assert not any(p is q for p in engine.student.parameters() for q in teacher.parameters())


def test_accumulation_equals_one_larger_batch(recipe_factory, tmp_path):
    one = recipe_factory(steps=3, batch_size=4, grad_accum=1)
    two = recipe_factory(steps=3, batch_size=2, grad_accum=2)
    one["output_dir"], two["output_dir"] = str(tmp_path / "one"), str(tmp_path / "two")
    engine_for(one).run()
    engine_for(two).run()
    a = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-6, rtol=1e-5), key


def test_final_and_best_students_load_with_transformers(recipe_factory, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = recipe_factory(steps=4, eval_every=2)
    summary = engine_for(raw).run()
    out = tmp_path / "run"
    for name in ("final", "best"):
        model = AutoModelForCausalLM.from_pretrained(out / name, local_files_only=True)
        assert model.config.num_hidden_layers == 2
        AutoTokenizer.from_pretrained(out / name, local_files_only=True)
        assert not list((out / name).glob("*.bin"))  # safetensors only
    assert summary["after"]["val/student_loss"] < summary["before"]["val/student_loss"]
    assert summary["best"] == min(r["metrics"]["val/student_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                                  if "metrics" in r and "val/student_loss" in r["metrics"] and r["step"] > 0)


def test_existing_checkpoints_refused_without_resume_or_overwrite(recipe_factory, tmp_path):
    raw = recipe_factory(steps=2, save_every=1)
    with pytest.raises(KdistillError) as err:
        engine_for(raw).run(resume=True)
    assert str(err.value) == f"--resume: no complete checkpoint under {tmp_path / 'run' / 'checkpoints'}"
    engine_for(raw).run()
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert before == ["step-00000001", "step-00000002"]
    with pytest.raises(KdistillError) as err:
        engine_for(raw).run()
    assert str(err.value) == (f"output_dir: {tmp_path / 'run'} already holds checkpoints; "
                              "pass --resume to continue or --overwrite to start over")
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    engine_for(raw).run(overwrite=True)


def test_resume_refuses_a_changed_recipe(recipe_factory):
    raw = recipe_factory(steps=2, save_every=1)
    engine_for(raw).run()
    raw["train"]["steps"] = 3
    raw["train"]["lr"] = 0.5
    with pytest.raises(KdistillError) as err:
        engine_for(raw).run(resume=True)
    assert "the recipe differs" in str(err.value) and "train.lr, train.steps" in str(err.value)


def test_checkpoint_pruning_keeps_the_newest(recipe_factory, tmp_path):
    engine_for(recipe_factory(steps=5, save_every=1, keep_checkpoints=2)).run()
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-00000004", "step-00000005"]
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-00000005" / "state.json").read_text())
    assert state["step"] == 5


def test_nan_loss_stops_the_run_naming_the_step(recipe_factory, tmp_path):
    raw = recipe_factory(steps=3, save_every=1)
    with pytest.raises(KdistillError) as err:
        nan_at(engine_for(raw), 2).run()
    assert str(err.value) == "step 2: the loss is nan; stopping before it reaches the weights (last checkpoint kept)"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000001"]


def test_schedulers_against_hand_computed_values():
    cos = CosineWarmup(CosineWarmup.Options(warmup_steps=4, min_ratio=0.0))
    assert [cos(s, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cos(4, 12) == 1.0
    assert cos(8, 12) == pytest.approx(0.5)  # halfway through the 8 decay steps
    assert cos(12, 12) == pytest.approx(0.0, abs=1e-12)
    floor = CosineWarmup(CosineWarmup.Options(warmup_steps=0, min_ratio=0.1))
    assert floor(5, 10) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    lin = Linear(Linear.Options(warmup_steps=2, min_ratio=0.2))
    assert [lin(s, 10) for s in (0, 1, 2, 6, 10)] == pytest.approx([0.5, 1.0, 1.0, 0.6, 0.2])
    assert [Constant(Constant.Options(warmup_steps=2))(s, 5) for s in range(3)] == [0.5, 1.0, 1.0]


def test_uniform_mapper_matches_the_design_examples():
    pairs = dict(UniformMapper().pairs(32, 80))
    assert (pairs[0], pairs[15], pairs[31]) == (0, 38, 78)
    assert UniformMapper().pairs(6, 30) == [(0, 0), (1, 5), (2, 10), (3, 15), (4, 20), (5, 25)]
    assert UniformMapper().pairs(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_text_files_are_deterministic_and_split_without_overlap(tiny_assets):
    from transformers import AutoTokenizer

    from kdistill.plugins.data.text_files import TextFiles

    tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"], local_files_only=True)
    a = TextFiles(TextFiles.Options(paths=[tiny_assets["corpus"]], seq_len=16, val_fraction=0.1))
    b = TextFiles(TextFiles.Options(paths=[tiny_assets["corpus"]], seq_len=16, val_fraction=0.1))
    a.setup(tok, seed=3)
    b.setup(tok, seed=3)
    assert a.fingerprint() == b.fingerprint()
    for i in (0, 5, a.n_train):  # the last one wraps into the second epoch
        x, y = a.train_batch(i, 4), b.train_batch(i, 4)
        assert torch.equal(x.input_ids, y.input_ids)
        assert torch.equal(x.labels[:, :-1], x.input_ids[:, 1:])  # labels are the next tokens
    assert not set(a._val.tolist()) & set(a._train.tolist())
    epoch = torch.cat([a.train_batch(i, 1).input_ids for i in range(a.n_train)])
    assert len({tuple(r) for r in epoch.tolist()}) == len({tuple(a._blocks[i, :-1].tolist()) for i in a._train.tolist()})
    c = TextFiles(TextFiles.Options(paths=[tiny_assets["corpus"]], seq_len=16, val_fraction=0.1))
    c.setup(tok, seed=4)
    assert c.fingerprint() != a.fingerprint()


def test_missing_teacher_path_is_a_clear_error(recipe_factory, tmp_path):
    raw = recipe_factory(steps=1)
    raw["teacher"]["options"]["model"] = str(tmp_path / "nowhere")
    with pytest.raises(kdistill.ConfigError) as err:
        engine_for(raw).run()
    assert str(err.value) == f"teacher.options.model: no such file or folder: {tmp_path / 'nowhere'}"
    assert not (tmp_path / "run").exists()


def test_student_built_fresh_from_a_config_with_the_teachers_tokenizer(recipe_factory, tmp_path, tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    n_tokens = len(AutoTokenizer.from_pretrained(tiny_assets["teacher"], local_files_only=True))
    raw = recipe_factory(steps=2)
    raw["student"] = {"config": {"model_type": "llama", "vocab_size": n_tokens - 1, "hidden_size": 16, "intermediate_size": 32,
                                 "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                                 "max_position_embeddings": 64}}
    with pytest.raises(kdistill.ConfigError) as err:
        engine_for(raw).run()
    assert str(err.value) == (f"student.config.vocab_size: the model has {n_tokens - 1} token embeddings "
                              f"but the tokenizer has {n_tokens} tokens")
    raw["student"]["config"]["vocab_size"] = n_tokens + 6  # a padded vocabulary is fine
    engine_for(raw).run()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final", local_files_only=True)
    assert model.config.hidden_size == 16 and model.config.vocab_size == n_tokens + 6
    assert (tmp_path / "run" / "final" / "tokenizer.json").exists()


def test_fused_and_full_logit_paths_train_the_same_student(recipe_factory, tmp_path):
    fused = recipe_factory(steps=3, batch_size=2, grad_accum=2)
    plain = recipe_factory(steps=3, batch_size=2, grad_accum=2)
    fused["output_dir"], plain["output_dir"] = str(tmp_path / "fused"), str(tmp_path / "plain")
    fused["strategy"] = {"name": "offline", "options": {"fused": True, "chunk_tokens": 5}}
    plain["strategy"] = {"name": "offline", "options": {"fused": False}}
    a_engine, b_engine = engine_for(fused), engine_for(plain)
    a_engine.run()
    b_engine.run()
    assert a_engine.strategy.step.use_fused and not b_engine.strategy.step.use_fused
    a = load_file(str(tmp_path / "fused" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


def test_student_from_a_local_folder(recipe_factory, tiny_assets, tmp_path):
    raw = recipe_factory(steps=1)
    raw["student"] = {"model": tiny_assets["teacher"]}
    engine = engine_for(raw)
    engine.run()
    assert engine.student.config.num_hidden_layers == 4
    missing = recipe_factory(steps=1)
    missing["student"] = {"model": str(tmp_path / "absent")}
    missing["output_dir"] = str(tmp_path / "other")  # the first run's folder is taken
    with pytest.raises(kdistill.ConfigError) as err:
        engine_for(missing).run()
    assert str(err.value) == f"student.model: no such file or folder: {tmp_path / 'absent'}"


def test_achieved_flops_per_second_is_logged(recipe_factory, tmp_path):
    engine = engine_for(recipe_factory(steps=2, batch_size=3))
    engine.run()
    p_teacher = sum(p.numel() for p in engine.teacher.model.parameters())
    p_student = sum(p.numel() for p in engine.student.parameters())
    rows = [json.loads(line)["metrics"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
            if '"train/flops_per_s"' in line]
    assert len(rows) == 2
    for m in rows:
        assert m["train/flops_per_s"] == pytest.approx(3 * 32 * (2 * p_teacher + 6 * p_student) / m["train/step_s"], rel=1e-6)


def test_overwrite_with_bad_input_loses_nothing(recipe_factory, tmp_path):
    raw = recipe_factory(steps=1, save_every=1)
    engine_for(raw).run()
    before = sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*"))
    raw["data"]["options"]["paths"] = [str(tmp_path / "missing.txt")]
    with pytest.raises(kdistill.ConfigError):
        engine_for(raw).run(overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in (tmp_path / "run").rglob("*")) == before


def test_a_different_tokenizer_of_the_same_size_is_refused(recipe_factory, tiny_assets, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from conftest import make_text

    teacher_tok = AutoTokenizer.from_pretrained(tiny_assets["teacher"], local_files_only=True)
    other = Tokenizer(models.BPE())
    other.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    other.decoder = decoders.ByteLevel()
    # same size, but the special tokens take other ids and other text gives other merges
    trainer = trainers.BpeTrainer(vocab_size=len(teacher_tok), special_tokens=["<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    other.train_from_iterator([make_text(seed=7).upper()], trainer=trainer)
    folder = tmp_path / "other-tokenizer"
    PreTrainedTokenizerFast(tokenizer_object=other, pad_token="<pad>", eos_token="<eos>").save_pretrained(folder)
    assert len(AutoTokenizer.from_pretrained(folder)) == len(teacher_tok)
    raw = recipe_factory(steps=1)
    raw["student"] = {"model": tiny_assets["teacher"], "tokenizer": str(folder)}
    with pytest.raises(KdistillError) as err:
        engine_for(raw).run()
    assert str(err.value).startswith(f"student.tokenizer: the student's tokenizer ({len(teacher_tok)} tokens) is not the teacher's")
    assert not (tmp_path / "run").exists()
    raw["losses"] = [{"name": "cross-entropy"}]  # no teacher logits compared: allowed
    engine_for(raw).run()


def test_autocast_runs_the_forwards_in_bfloat16_and_the_loss_in_float32(recipe_factory, tmp_path):
    import copy

    losses = []
    for autocast in ("none", "bfloat16"):
        raw = recipe_factory(steps=1, eval_every=0, autocast=autocast)
        raw["evaluators"] = []
        raw["output_dir"] = str(tmp_path / autocast)
        engine = engine_for(copy.deepcopy(raw))
        engine.build()
        seen = []

        def record(module, args, out, seen=seen):
            seen.append(out[0].dtype if isinstance(out, tuple) else out.dtype)
        engine.student.model.layers[0].mlp.down_proj.register_forward_hook(record)  # a product: bfloat16 under autocast
        engine.teacher.model.model.layers[0].mlp.down_proj.register_forward_hook(record)
        metrics = engine.train_step(0)
        assert set(seen) == {torch.bfloat16 if autocast == "bfloat16" else torch.float32}, autocast
        assert all(p.dtype == torch.float32 for p in engine.student.parameters())  # weights stay float32
        losses.append(metrics["train/loss"])
    assert math.isfinite(losses[1]) and losses[1] == pytest.approx(losses[0], rel=2e-2)


def test_attention_is_sdpa_on_cpu_and_flash_attention_on_cuda_where_installed(recipe_factory, monkeypatch):
    import importlib.util

    from kdistill.core.models import choose_attention

    engine = engine_for(recipe_factory(steps=1))
    engine.build()
    assert engine.student.config._attn_implementation == "sdpa" and engine.teacher.model.config._attn_implementation == "sdpa"
    asked = []
    model = engine.student.to(torch.bfloat16)
    monkeypatch.setattr(model, "set_attn_implementation", lambda choice: asked.append(choice))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert choose_attention(model, torch.device("cuda")) == "flash_attention_2" and asked == ["flash_attention_2"]
    assert choose_attention(model, torch.device("cpu")) == "sdpa"
