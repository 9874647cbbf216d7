"""The command line as a user meets it: real entry points, exit codes, stderr word for word."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "src" / "kdistill" / "strategies" / "recipes").glob("*.yaml"))


def kdistill(*args, env=None, cwd=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "kdistill.cli", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def example_installed() -> bool:
    try:
        importlib.metadata.distribution("kdistill-example-plugin")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_version():
    result = kdistill("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kdistill {importlib.metadata.version('kdistill')}"


def test_the_old_module_path_still_runs_the_command_line_until_0_2():
    old = subprocess.run([sys.executable, "-m", "kdistill.core.cli", "recipes"], capture_output=True, text=True, timeout=300)
    assert old.returncode == 0 and old.stdout == kdistill("recipes").stdout and "quickstart " in old.stdout


def test_plugins_lists_builtins():
    result = kdistill("plugins")
    assert result.returncode == 0, result.stderr
    for name in ("hf", "forward-kl", "cross-entropy", "uniform", "cosine-warmup", "perplexity", "offline",
                 "text-files", "mlflow", "jsonl"):
        assert f" {name} " in result.stdout


@pytest.mark.skipif(not example_installed(), reason="needs the example plugin: pip install ./examples/kdistill-example-plugin (.ci/run does)")
def test_example_plugin_is_listed_used_and_blocked(tiny_assets, tmp_path):
    listed = kdistill("plugins")
    row = next(line for line in listed.stdout.splitlines() if "example-logit-cosine" in line)
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["loss", "example-logit-cosine", "example", "kdistill-example-plugin", "0.1.0"]
    recipe = tiny_recipe(tiny_assets, tmp_path / "out")
    recipe["losses"].append({"name": "example-logit-cosine", "weight": 0.1})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert kdistill("validate", path).returncode == 0
    blocked = kdistill("plugins", env={"KDISTILL_BLOCK_PLUGINS": "example"})
    assert "example-logit-cosine" not in blocked.stdout and " forward-kl " in blocked.stdout
    refused = kdistill("validate", path, env={"KDISTILL_BLOCK_PLUGINS": "example"})
    assert refused.returncode == 2
    assert "error: losses[2].name: unknown loss 'example-logit-cosine'" in refused.stderr


def test_three_mistakes_one_run_exit_2_nothing_written(tiny_assets, tmp_path):
    recipe = tiny_recipe(tiny_assets, tmp_path / "out")
    recipe["losses"][0]["name"] = "forward-kll"             # unknown component
    recipe["losses"][0]["options"] = {}
    recipe["losses"][1]["options"] = {"smothing": 0.1}        # misspelled option
    recipe["scheduler"]["options"] = {"warmup_steps": "ten"}  # wrong type
    path = write_recipe(tmp_path / "r.yaml", recipe)
    result = kdistill("run", path, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: losses[0].name: unknown loss 'forward-kll'; did you mean 'forward-kl'?")
    assert lines[1:] == [
        "error: losses[1].options.smothing: unknown field [loss 'cross-entropy' from plugin 'kdistill.losses.cross_entropy' (kdistill 0.1.0)]",
        "error: scheduler.options.warmup_steps: Input should be a valid integer, unable to parse string as an integer (got 'ten') "
        "[scheduler 'cosine-warmup' from plugin 'kdistill.schedulers.cosine_warmup' (kdistill 0.1.0)]",
    ]
    assert len(lines) == 3
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no mlflow.db, no folders


def test_set_override_is_validated(tiny_assets, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_assets, tmp_path / "out"))
    result = kdistill("validate", path, "--set", "train.batch_size=0", "--set", "losses[0].options.temperature=3")
    assert result.returncode == 2
    assert result.stderr == "error: train.batch_size: Input should be greater than 0 (got 0)\n"


def test_missing_recipe_file(tmp_path):
    result = kdistill("validate", tmp_path / "nope.yaml")
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'nope.yaml'}: no such recipe file\n"


@pytest.fixture(scope="module")
def schema():
    result = kdistill("schema")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipe_validates_and_matches_the_schema(recipe, schema):
    result = kdistill("validate", recipe)
    assert result.returncode == 0, result.stderr
    jsonschema.validate(yaml.safe_load(recipe.read_text()), schema)


def test_schema_rejects_broken_recipes(schema, tiny_assets, tmp_path):
    good = tiny_recipe(tiny_assets, tmp_path / "out")
    jsonschema.validate(json.loads(json.dumps(good)), schema)
    for mutate in (lambda r: r["losses"][0].update(name="forward-kll"),
                   lambda r: r["losses"][0]["options"].update(temprature=2),
                   lambda r: r["scheduler"]["options"].update(warmup_steps="ten"),
                   lambda r: r["train"].update(steps=0),
                   lambda r: r.pop("output_dir")):
        broken = json.loads(json.dumps(good))
        mutate(broken)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema)


def test_shipped_recipes_exist():
    assert any(p.name == "quickstart.yaml" for p in RECIPES)
