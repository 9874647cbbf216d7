"""Width cuts (student.from_teacher.heads / mlp): the heads and MLP channels that add least to the residual
stream on the recipe's data are cut; a teacher built with useless heads and channels loses exactly those."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import cli_result, engine_for, write_recipe
from kdistill.core import width_cut
from kdistill.core.components import Batch

USELESS_HEADS = [1, 3]  # one in each key-value group of the tiny teacher (4 heads, 2 key-value heads, dim 8)
USELESS_CHANNELS = list(range(0, 64, 4))  # 16 of its 64


@pytest.fixture
def narrow_teacher(tiny_assets, tmp_path):
    """The tiny teacher with heads 1 and 3 and every fourth MLP channel writing nothing (zero output weights)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"])
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    with torch.no_grad():
        for layer in model.model.layers:
            for h in USELESS_HEADS:
                layer.self_attn.o_proj.weight[:, h * head_dim:(h + 1) * head_dim] = 0
            layer.mlp.down_proj.weight[:, USELESS_CHANNELS] = 0
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_assets["teacher"]).save_pretrained(folder)
    return str(folder)


def width_recipe(recipe_factory, teacher, **cut):
    raw = recipe_factory(steps=2)
    raw["teacher"]["options"]["model"] = teacher
    raw["student"] = {"from_teacher": {"layers": [0, 1, 2, 3], **cut}}
    return raw


def test_the_useless_heads_and_channels_are_the_ones_cut(recipe_factory, narrow_teacher, tmp_path):
    """Cut to the teacher's useful heads and channels, the student computes what the teacher computes; it
    trains, and final/ loads with transformers at the narrower width."""
    raw = width_recipe(recipe_factory, narrow_teacher, heads=2, mlp=48, calibration_batches=2)
    engine = engine_for(raw)
    engine.build()
    ids = torch.randint(2, engine.student.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        student, teacher = engine.student.eval()(input_ids=ids).logits, engine.teacher.model(input_ids=ids).logits
    assert torch.allclose(student, teacher, atol=1e-5)
    engine.run()
    choice = json.loads((tmp_path / "run" / "layer_choice.json").read_text())
    kept = choice["width"]["kept"]
    assert kept["heads"] == [[0, 2]] * 4
    assert kept["mlp"] == [[c for c in range(64) if c not in USELESS_CHANNELS]] * 4
    assert all(choice["width"]["scores"]["heads"][layer][h] == 0.0 for layer in range(4) for h in USELESS_HEADS)
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert (final.config.num_attention_heads, final.config.head_dim, final.config.intermediate_size) == (2, 8, 48)
    assert final.model.layers[0].self_attn.q_proj.weight.shape == (16, 32)


def test_importance_matches_a_float64_reference(tiny_assets):
    """A head's score: the mean norm of the o_proj output of that head's slice of its input alone; a channel's:
    the mean |activation| times its down_proj column's norm; padding not counted. Computed here through the
    modules themselves, in float64."""
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]).eval()
    ids = torch.randint(2, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    inputs: dict[str, list[torch.Tensor]] = {"o": [], "down": []}
    layer = model.model.layers[1]
    handles = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: inputs["o"].append(a[0])),
               layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: inputs["down"].append(a[0]))]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for handle in handles:
        handle.remove()
    real = mask.bool()
    a_o, a_down = inputs["o"][0][real].double(), inputs["down"][0][real].double()
    o_proj = torch.nn.Linear(32, 32, bias=False).double()
    o_proj.weight.data = layer.self_attn.o_proj.weight.double()
    expected_heads = []
    for h in range(4):
        alone = torch.zeros_like(a_o)
        alone[:, h * 8:(h + 1) * 8] = a_o[:, h * 8:(h + 1) * 8]
        expected_heads.append(o_proj(alone).norm(dim=-1).mean().item())
    down = layer.mlp.down_proj.weight.double()
    expected_channels = [(a_down[:, c].abs() * down[:, c].norm()).mean().item() for c in range(64)]
    got = width_cut.width_scores(model, [Batch(input_ids=ids, labels=ids, attention_mask=mask)])
    assert got["heads"][1] == pytest.approx(expected_heads, rel=1e-6)
    assert got["mlp"][1] == pytest.approx(expected_channels, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("cut,message", [
    ({"heads": 3}, "student.from_teacher.heads: 3 is not a multiple of the teacher's 2 key-value heads up to its 4 heads (2, 4)"),
    ({"heads": 6}, "student.from_teacher.heads: 6 is not a multiple of the teacher's 2 key-value heads up to its 4 heads (2, 4)"),
    ({"mlp": 65}, "student.from_teacher.mlp: 65 is more than the teacher's 64 MLP channels"),
])
def test_a_width_the_teacher_cannot_give_is_one_line_and_writes_nothing(recipe_factory, tiny_assets, tmp_path, cut, message):
    raw = width_recipe(recipe_factory, tiny_assets["teacher"], **cut)
    code, _, err = cli_result("run", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 2
    assert err.strip().splitlines()[-1] == f"error: {message}"
    assert not (tmp_path / "run").exists()
