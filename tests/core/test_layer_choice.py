"""Cuts chosen by measurement: student.from_teacher.keep_layers keeps the teacher layers that block influence
or removal KL rank highest on the recipe's data; a teacher built with one redundant layer loses that one."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import cli_result, engine_for, write_recipe
from kdistill.core import layer_choice

REDUNDANT = 2


@pytest.fixture
def redundant_teacher(tiny_assets, tmp_path):
    """The tiny teacher with layer 2 made an identity: its attention and MLP write nothing to the residual stream."""
    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"])
    layer = model.model.layers[REDUNDANT]
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    folder = tmp_path / "teacher"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_assets["teacher"]).save_pretrained(folder)
    return str(folder)


def cut_recipe(recipe_factory, teacher, **cut):
    raw = recipe_factory(steps=2)
    raw["teacher"]["options"]["model"] = teacher
    raw["student"] = {"from_teacher": {"keep_layers": 3, **cut}}
    return raw


@pytest.mark.parametrize("by", ["block-influence", "removal-kl"])
def test_the_redundant_layer_is_the_one_left_out(recipe_factory, redundant_teacher, tmp_path, by):
    raw = cut_recipe(recipe_factory, redundant_teacher, by=by, calibration_batches=2)
    engine_for(raw).run()
    choice = json.loads((tmp_path / "run" / "layer_choice.json").read_text())
    assert choice["layers"] == [0, 1, 3] and choice["by"] == by and choice["keep_layers"] == 3
    scores = choice["scores"]
    assert abs(scores[REDUNDANT]) < 1e-6 < min(s for i, s in enumerate(scores) if i != REDUNDANT)
    # the student is those teacher layers: its last block is the teacher's layer 3
    teacher = AutoModelForCausalLM.from_pretrained(redundant_teacher)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert student.config.num_hidden_layers == 3
    assert not torch.equal(student.model.layers[2].mlp.down_proj.weight, teacher.model.layers[2].mlp.down_proj.weight)


def test_block_influence_matches_a_float64_reference(tiny_assets):
    """1 - mean cosine between each layer's input and output, computed here independently."""
    from kdistill.core.components import Batch

    model = AutoModelForCausalLM.from_pretrained(tiny_assets["teacher"]).eval()
    ids = torch.randint(2, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding is not counted
    batch = Batch(input_ids=ids, labels=ids, attention_mask=mask)
    with torch.no_grad():
        states = [s.double() for s in model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states]
    expected = []
    for i in range(model.config.num_hidden_layers):
        a, b = states[i][mask.bool()], states[i + 1][mask.bool()]
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        expected.append(1 - cos.mean().item())
    got = layer_choice.layer_scores(model, [batch], "block-influence")
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_keep_layers_beyond_the_teacher_is_one_line_and_writes_nothing(recipe_factory, tiny_assets, tmp_path):
    raw = cut_recipe(recipe_factory, tiny_assets["teacher"])
    raw["student"]["from_teacher"]["keep_layers"] = 5
    code, _, err = cli_result("run", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 2
    assert err.strip().splitlines()[-1] == "error: student.from_teacher.keep_layers: 5 is not between 1 and the teacher's 4 layers"
    assert not (tmp_path / "run").exists()


def test_layers_and_keep_layers_exclude_each_other(recipe_factory, tiny_assets, tmp_path):
    raw = cut_recipe(recipe_factory, tiny_assets["teacher"])
    raw["student"]["from_teacher"]["layers"] = [0, 1]
    code, _, err = cli_result("validate", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 2
    assert "student.from_teacher: Value error, give exactly one of layers (a list) and keep_layers (a count)" in err
