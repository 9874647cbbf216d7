"""Recipes that are small on disk and huge in memory, and values the schema must refuse (issue: hardening)."""

from __future__ import annotations

import json
import math
import time

import pytest

from kdistill.core.config import parse_yaml, resolve
from kdistill.core.errors import ConfigError
from kdistill.core.registry import Registry
from kdistill.core.summary import json_safe


def laughs(depth: int = 9, width: int = 9) -> str:
    """The billion laughs: each level an alias list of the previous one, `width` times."""
    text = "a0: &a0 [" + ", ".join(['"lol"'] * width) + "]\n"
    for level in range(1, depth):
        text += f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]\n"
    return text


def problems(raw):
    with pytest.raises(ConfigError) as info:
        resolve(raw, Registry.from_plugins())
    return info.value.problems


def test_an_alias_bomb_is_refused_in_a_second_without_expanding_it():
    began = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        parse_yaml(laughs(), "bomb.yaml")
    assert time.perf_counter() - began < 1.0
    assert info.value.problems == ["bomb.yaml: YAML aliases expand to more than 100,000 values; refusing a recipe this large"]
    assert len(laughs()) < 1100  # about 1 KB on disk


def test_ordinary_aliases_still_work():
    assert parse_yaml("base: &b {lr: 1e-4}\ntrain: *b\nother: *b\n") == {"base": {"lr": 1e-4}, "train": {"lr": 1e-4},
                                                                          "other": {"lr": 1e-4}}


def test_a_bomb_inside_student_config_or_a_set_value_is_refused(tiny_assets, tmp_path):
    from kdistill.core.config import load_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(laughs() + "student: {config: {model_type: llama, extra: *a8}}\n")
    with pytest.raises(ConfigError, match="expand to more than"):
        load_recipe(recipe)
    plain = tmp_path / "p.yaml"
    plain.write_text("student: {config: {model_type: llama}}\n")
    flow = "[" + ", ".join(["[" + ", ".join(['"lol"'] * 9) + "]"] * 2) + "]"
    assert load_recipe(plain, [f"student.config.extra={flow}"])["student"]["config"]["extra"][1][8] == "lol"


def test_an_error_line_never_renders_a_huge_value(recipe_factory):
    raw = recipe_factory()
    raw["train"]["steps"] = list(range(50_000))
    found = problems(raw)
    assert any(p.startswith("train.steps: Input should be a valid integer") for p in found)
    assert max(len(p) for p in found) < 400


@pytest.mark.parametrize(("change", "expected"), [
    (lambda r: r["train"].update(lr=math.inf), "train.lr: Input should be a finite number"),
    (lambda r: r["losses"][0]["options"].update(temperature=math.inf), "losses[0].options.temperature: Input should be a finite number"),
    (lambda r: r["train"].update(steps=True), "train.steps: Input should be a valid integer"),
    (lambda r: r.update(output_dir=""), "output_dir: String should have at least 1 character"),
    (lambda r: [loss.update(weight=0) for loss in r["losses"]], "losses: every loss has weight 0; nothing would train"),
    (lambda r: r["data"]["options"].update(val_fraction=0),
     "data.options.val_fraction: 0 leaves no validation split, which evaluator 'perplexity' needs"),
])
def test_values_that_would_run_wrongly_are_refused(recipe_factory, change, expected):
    raw = recipe_factory()
    change(raw)
    found = problems(raw)
    assert any(p.startswith(expected) for p in found), found


def test_val_fraction_0_is_fine_without_evaluators(recipe_factory):
    raw = recipe_factory()
    raw["data"]["options"]["val_fraction"] = 0
    raw["evaluators"] = []
    resolve(raw, Registry.from_plugins())


def test_summary_json_has_no_bare_nan():
    text = json.dumps(json_safe({"after": {"val/x": float("nan"), "ok": 1.5, "l": [float("inf")]}}), allow_nan=False)
    assert json.loads(text) == {"after": {"val/x": None, "ok": 1.5, "l": [None]}}
