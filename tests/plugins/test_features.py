"""Feature and attention distillation: mappers, projectors, losses against float64 references, resume."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

import kdistill
from conftest import engine_for
from kdistill.core.capture import capture
from kdistill.core.errors import KdistillError
from kdistill.plugins.losses.attention import AttentionKL
from kdistill.plugins.losses.hidden import HiddenCosine, HiddenCosineMSE, HiddenMSE
from kdistill.plugins.mappers.explicit import Explicit
from kdistill.plugins.mappers.last_k import LastK
from kdistill.plugins.mappers.learned import Learned
from kdistill.plugins.mappers.uniform import UniformMapper

# --------------------------------------------------------------------------- mappers


def test_mapper_pairs_for_several_depths():
    assert UniformMapper().build(6, 30).teacher_layers == (0, 5, 10, 15, 20, 25)
    assert dict(UniformMapper().pairs(32, 80))[15] == 38 and dict(UniformMapper().pairs(32, 80))[31] == 78
    assert UniformMapper().pairs(3, 12) == [(0, 0), (1, 4), (2, 8)]
    assert LastK(LastK.Options(k=2)).pairs(6, 30) == [(4, 28), (5, 29)]
    assert LastK(LastK.Options(k=9)).pairs(6, 30) == [(i, 24 + i) for i in range(6)]
    built = Explicit(Explicit.Options(pairs=[[1, 6], [4, 24]])).build(6, 30)
    assert built.student_layers == (1, 4) and built.teacher_layers == (6, 24) and built.mixer is None


@pytest.mark.parametrize("pairs,message", [
    ([[6, 3]], "layer_mapper: student layer 6 is out of range (the student has layers 0-5)"),
    ([[1, 30]], "layer_mapper: teacher layer 30 is out of range (the teacher has layers 0-29)"),
    ([[1, 3], [1, 4]], "layer_mapper: student layer 1 is paired twice"),
])
def test_mapping_is_validated_against_both_models(pairs, message):
    with pytest.raises(KdistillError) as err:
        Explicit(Explicit.Options(pairs=pairs)).build(6, 30)
    assert str(err.value) == message


def test_learned_mapping_starts_as_an_even_mix_and_learns():
    built = Learned(Learned.Options(student_layers=[0, 1], teacher_layers=[2, 5, 7])).build(2, 8)
    states = {t: torch.full((1, 2, 3), float(t)) for t in (2, 5, 7)}
    targets = built.targets(states)
    assert len(targets) == 2 and torch.allclose(targets[0], torch.full((1, 2, 3), 14 / 3))
    with torch.no_grad():
        built.mixer.logits[1] = torch.tensor([0.0, 0.0, 50.0])
    assert torch.allclose(built.targets(states)[1], torch.full((1, 2, 3), 7.0), atol=1e-5)


# --------------------------------------------------------------------------- losses vs float64 references


def batch_with_padding(b=2, s=5):
    labels = torch.arange(b * s).view(b, s) % 7
    labels[0, 3:] = -100
    attention = torch.ones(b, s, dtype=torch.long)
    attention[0, 4:] = 0
    return kdistill.Batch(input_ids=labels.clamp(min=0), labels=labels, attention_mask=attention)


def ref_hidden(kind, s_states, t_states, labels):
    total = 0.0
    for layer in s_states:
        for b in range(len(labels)):
            for p in range(len(labels[b])):
                if labels[b][p] == -100:
                    continue
                s, t = s_states[layer][b][p], t_states[layer][b][p]
                if kind == "hidden-mse":
                    total += sum((x - y) ** 2 for x, y in zip(s, t)) / len(s)
                else:
                    ns, nt = math.sqrt(sum(x * x for x in s)), math.sqrt(sum(y * y for y in t))
                    if kind == "hidden-cosine":
                        total += 1 - sum(x * y for x, y in zip(s, t)) / (ns * nt)
                    else:
                        total += sum((x / ns - y / nt) ** 2 for x, y in zip(s, t)) / len(s)
    return total / len(s_states)


@pytest.mark.parametrize("cls", [HiddenMSE, HiddenCosine, HiddenCosineMSE])
def test_hidden_losses_match_float64_reference(cls):
    g = torch.Generator().manual_seed(0)
    batch = batch_with_padding()
    s = {1: torch.randn(2, 5, 4, generator=g, dtype=torch.float64), 3: torch.randn(2, 5, 4, generator=g, dtype=torch.float64)}
    t = {k: torch.randn(2, 5, 4, generator=g, dtype=torch.float64) for k in s}
    leaf = {k: v.clone().requires_grad_(True) for k, v in s.items()}
    value = cls()(kdistill.ModelOutputs(hidden_states=leaf), kdistill.ModelOutputs(hidden_states=t), batch)
    ref = ref_hidden(cls.name, {k: v.tolist() for k, v in s.items()}, {k: v.tolist() for k, v in t.items()}, batch.labels.tolist())
    assert value.item() == pytest.approx(ref, rel=1e-10)
    value.backward()
    eps = 1e-6
    for layer in s:
        for idx in [(0, 0, 0), (1, 4, 3), (0, 2, 1)]:
            bumped = {k: v.clone() for k, v in s.items()}
            bumped[layer][idx] += eps
            hi = ref_hidden(cls.name, {k: v.tolist() for k, v in bumped.items()}, {k: v.tolist() for k, v in t.items()}, batch.labels.tolist())
            bumped[layer][idx] -= 2 * eps
            lo = ref_hidden(cls.name, {k: v.tolist() for k, v in bumped.items()}, {k: v.tolist() for k, v in t.items()}, batch.labels.tolist())
            assert leaf[layer].grad[idx].item() == pytest.approx((hi - lo) / (2 * eps), abs=1e-6)
        assert leaf[layer].grad[0, 3:].abs().max() == 0  # padded positions get nothing


def causal_attention(g, b, h, s):
    scores = torch.randn(b, h, s, s, generator=g, dtype=torch.float64)
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(scores, dim=-1)


def test_attention_kl_matches_float64_reference_with_grouped_heads_and_padding():
    g = torch.Generator().manual_seed(1)
    batch = batch_with_padding()
    student = {0: causal_attention(g, 2, 2, 5)}
    teacher = {0: causal_attention(g, 2, 4, 5)}
    value = AttentionKL()(kdistill.ModelOutputs(attentions=student), kdistill.ModelOutputs(attentions=teacher), batch)
    keys = batch.attention_mask.tolist()
    total = 0.0
    for b in range(2):
        for q in range(5):
            if batch.labels[b, q] == -100:
                continue
            per_head = []
            for h in range(2):
                t_row = [(teacher[0][b, 2 * h, q, k].item() + teacher[0][b, 2 * h + 1, q, k].item()) / 2 * keys[b][k] for k in range(5)]
                s_row = [student[0][b, h, q, k].item() * keys[b][k] for k in range(5)]
                ts, ss = sum(t_row), sum(s_row)
                per_head.append(sum((x / ts) * math.log((x / ts) / (y / ss)) for x, y in zip(t_row, s_row) if x > 0))
            total += sum(per_head) / 2
    assert value.item() == pytest.approx(total, rel=1e-10)


def test_attention_heads_that_do_not_divide_are_a_clear_error():
    g = torch.Generator().manual_seed(2)
    batch = batch_with_padding()
    with pytest.raises(KdistillError) as err:
        AttentionKL()(kdistill.ModelOutputs(attentions={0: causal_attention(g, 2, 3, 5)}),
                      kdistill.ModelOutputs(attentions={0: causal_attention(g, 2, 4, 5)}), batch)
    assert str(err.value) == "attention-kl: the teacher's 4 attention heads do not split evenly into the student's 3"


# --------------------------------------------------------------------------- in the engine


def test_capture_keeps_only_the_mapped_layers(tiny_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"], local_files_only=True, attn_implementation="eager")
    ids = torch.randint(0, 100, (2, 6))
    with capture(model, hidden_layers=(1, 3), attention_layers=(2,)) as found:
        out = model(input_ids=ids, output_hidden_states=True)
    assert sorted(found["hidden"]) == [1, 3] and sorted(found["attention"]) == [2]
    assert torch.equal(found["hidden"][1], out.hidden_states[2])  # hidden_states[0] is the embeddings
    assert found["attention"][2].shape == (2, 4, 6, 6)
    remaining = [h for layer in model.model.layers for h in layer._forward_hooks.values()]
    assert not any("capture" in getattr(h, "__qualname__", "") for h in remaining)  # ours are removed afterwards


def feature_recipe(recipe_factory, **train):
    raw = recipe_factory(**train)
    raw["layer_mapper"] = {"name": "learned", "options": {"student_layers": [0, 1], "teacher_layers": [1, 2, 3]}}
    raw["losses"].append({"name": "hidden-cosine-mse", "weight": 1.0})
    return raw


def test_feature_distillation_trains_projectors_and_mix_and_resumes_exactly(recipe_factory, tmp_path):
    raw = feature_recipe(recipe_factory, steps=4, save_every=2, keep_checkpoints=3)
    engine = engine_for(raw)
    engine.run()
    assert engine.strategy.step.bridge is not None and "bridge" in engine.modules
    ckpt = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.safetensors"))
    bridge = {k: v for k, v in ckpt.items() if k.startswith("bridge.")}
    assert set(bridge) == {"bridge.projectors.0.weight", "bridge.projectors.1.weight", "bridge.mixer.logits"}
    assert not torch.equal(bridge["bridge.projectors.0.weight"], torch.eye(32))  # trained
    assert bridge["bridge.mixer.logits"].abs().max() > 0
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert not any("projector" in k or "mixer" in k for k in final)  # dropped from the saved student
    # resume from step 2 in a copy and compare step 4 exactly
    shutil.copytree(tmp_path / "run", tmp_path / "again")
    shutil.rmtree(tmp_path / "again" / "checkpoints" / "step-00000004")
    raw["output_dir"] = str(tmp_path / "again")
    engine_for(raw).run(resume=True)
    again = load_file(str(tmp_path / "again" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert all(torch.equal(again[k], ckpt[k]) for k in ckpt)


def test_attention_distillation_runs_with_eager_attention(recipe_factory):
    raw = recipe_factory(steps=2)
    raw["layer_mapper"] = {"name": "explicit", "options": {"pairs": [[0, 0], [1, 3]]}}
    raw["losses"].append({"name": "attention-kl", "weight": 1.0})
    engine = engine_for(raw)
    summary = engine.run()
    assert engine.student.config._attn_implementation == "eager"
    assert summary["after"]["train/attention-kl"] > 0


def fresh_student(tiny_assets, hidden: int, layers: int, heads: int) -> dict:
    from transformers import AutoTokenizer

    n_tokens = len(AutoTokenizer.from_pretrained(tiny_assets["teacher"], local_files_only=True))
    return {"config": {"model_type": "llama", "vocab_size": n_tokens, "hidden_size": hidden, "intermediate_size": 32,
                       "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": 1,
                       "max_position_embeddings": 64}}


def test_attention_head_mismatch_in_a_recipe_is_refused(recipe_factory, tiny_assets):
    raw = recipe_factory(steps=1)
    raw["student"] = fresh_student(tiny_assets, hidden=24, layers=2, heads=3)
    raw["layer_mapper"] = {"name": "uniform"}
    raw["losses"].append({"name": "attention-kl"})
    with pytest.raises(KdistillError) as err:
        engine_for(raw).run()
    assert str(err.value) == "attention-kl: the teacher's 4 attention heads do not split evenly into the student's 3"


def test_feature_loss_without_a_mapper_is_a_recipe_error(recipe_factory):
    raw = recipe_factory(steps=1)
    raw["losses"].append({"name": "hidden-mse"})
    with pytest.raises(kdistill.ConfigError) as err:
        engine_for(raw)
    assert str(err.value) == "layer_mapper: loss 'hidden-mse' needs a layer_mapper (installed: see `kdistill plugins`, e.g. {name: uniform})"


def test_projectors_map_between_different_widths(recipe_factory, tiny_assets):
    raw = recipe_factory(steps=2)
    raw["student"] = fresh_student(tiny_assets, hidden=16, layers=3, heads=2)
    raw["layer_mapper"] = {"name": "uniform"}
    raw["losses"].append({"name": "hidden-mse"})
    raw["losses"].append({"name": "attention-kl"})
    engine = engine_for(raw)
    engine.run()
    assert [tuple(p.weight.shape) for p in engine.strategy.step.bridge.projectors] == [(32, 16)] * 3
