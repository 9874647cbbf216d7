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
    width = {"COLUMNS": "100"}  # `recipes` wraps to the terminal's width
    old = subprocess.run([sys.executable, "-m", "kdistill.core.cli", "recipes"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **width})
    assert old.returncode == 0 and old.stdout == kdistill("recipes", env=width).stdout and "quickstart " in old.stdout


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
    assert refused.stderr == ("error: losses[2].name: loss 'example-logit-cosine' is provided by plugin 'example' "
                              "(kdistill-example-plugin 0.1.0), blocked by KDISTILL_BLOCK_PLUGINS=example\n")


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


# --------------------------------------------------------------------------- issue #22: the small commands


def test_recipes_lists_the_main_recipes_first_with_whole_wrapped_descriptions():
    from kdistill.cli import recipe_description

    result = kdistill("recipes", env={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    width = len("quickstart-progressive") + 2  # the longest name and two spaces
    assert lines[:4] == [
        "quickstart-chat".ljust(width) + "Chat quickstart: SmolLM2-135M-Instruct -> a 24-layer student that answers",
        " " * width + "questions (CPU, minutes).",
        "quickstart".ljust(width) + "Quickstart: SmolLM2-135M-Instruct -> a 6-layer student, on tiny-shakespeare",
        " " * width + "(CPU, minutes).",
    ]
    listed: dict[str, list[str]] = {}
    for line in lines:
        if not line.strip():
            break
        assert len(line) <= 100 and line[width - 2:width] == "  " and line[width] != " ", line  # one column
        if line[0] != " ":
            listed[line[:width].strip()] = []
        listed[list(listed)[-1]].append(line[width:])
    assert list(listed)[:2] == ["quickstart-chat", "quickstart"]
    assert list(listed)[2:] == sorted(list(listed)[2:]) and set(listed) == {p.stem for p in RECIPES}
    for recipe in RECIPES:
        description = recipe_description(recipe.read_text())
        assert " ".join(listed[recipe.stem]) == description and description.endswith("."), recipe.name  # whole sentences
    assert lines[-1].startswith("Run one by name (kdistill run quickstart-chat); the files are in ")


def test_recipe_description_runs_to_the_end_of_its_first_sentence():
    from kdistill.cli import recipe_description

    text = "# Progressive distillation: one student teaches\n# the next.\n# Needs: pip install x\nstudent: {}\n"
    assert recipe_description(text) == "Progressive distillation: one student teaches the next."
    assert recipe_description("# No full stop\n#\nstudent: {}\n") == "No full stop"
    assert recipe_description("student: {}\n") == ""


def test_help_shows_flags_as_plain_flags():
    import re

    for args in (["run", "--help"], ["--help"], ["analyze", "--help"]):  # a built-in command, the group, a plugin's command
        result = kdistill(*args, env={"COLUMNS": "120"})
        assert result.returncode == 0, result.stderr
        assert "<bool>" not in result.stdout, args
    run_help = kdistill("run", "--help", env={"COLUMNS": "120"}).stdout
    assert re.search(r"│ --resume +continue from the latest complete checkpoint", run_help)
    assert re.search(r"│ --resume-from +<path> +continue from this checkpoint folder", run_help)  # options with values keep theirs


def test_kl_prints_each_terms_own_sign():
    result = kdistill("kl", "--teacher-logits", "2,1,0.1", "--student-logits", "1.5,1.2,0.3", "--temperature", "2")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2] == ("3. KL(teacher || student) = sum p_t (log p_t - log p_s) = "
                                             "0.095145 - 0.048793 - 0.031112 = 0.015241")


def test_an_unknown_recipe_name_suggests_the_closest_shipped_one(tmp_path):
    result = kdistill("validate", "quickstrt", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("error: quickstrt: no such recipe file or shipped recipe; did you mean 'quickstart'? "
                             "(kdistill recipes lists them)\n")
    result = kdistill("sweep", "quickstart-chta", "--set", "losses[0].options.temperature=1,2", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr == ("error: quickstart-chta: no such recipe file or shipped recipe; did you mean 'quickstart-chat'? "
                             "(kdistill recipes lists them)\n")
    nothing_close = kdistill("run", "nope", cwd=tmp_path)
    assert nothing_close.returncode == 2
    assert nothing_close.stderr.startswith("error: nope: no such recipe file or shipped recipe; shipped: quickstart, ")


def test_set_appends_to_a_list(tiny_assets, tmp_path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_assets, tmp_path / "out"))
    result = kdistill("validate", path, "--set", "losses[+]={name: tvd, weight: 0.1}", "--set", "evaluators[+]={name: agreement}")
    assert result.returncode == 0, result.stderr
    assert "losses: forward-kl, cross-entropy, tvd," in result.stdout and "evaluators: perplexity, agreement," in result.stdout
    bad = kdistill("validate", path, "--set", "train[+]=1")
    assert bad.returncode == 2
    assert bad.stderr == "error: --set train[+]: [+] appends to a list, and train is a mapping, not a list\n"
    bad = kdistill("validate", path, "--set", "losses[+].weight=1")
    assert bad.returncode == 2
    assert bad.stderr == ("error: --set losses[+].weight: [+] appends to a list and must end the key "
                          "(give the whole item: --set 'losses[+]={...}')\n")


def test_set_help_and_the_recipe_reference_show_how_to_append():
    from kdistill.toolkit import SET_HELP

    assert "--set 'losses[+]={name: tvd, weight: 0.1}'" in SET_HELP
    assert "A key ending in `[+]` appends" in (ROOT / "docs" / "recipes.md").read_text()
    assert "[+] appends to a list" in " ".join(kdistill("validate", "--help", env={"COLUMNS": "200"}).stdout.split())


def fake_distribution(site: Path, name: str, module: str, code: str) -> None:
    """An installed distribution `name` 0.3 whose entry point `module` (group kdistill) is `module.py` holding `code`."""
    info = site / f"{name.replace('-', '_')}-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[kdistill]\n{module} = {module}\n")
    (site / f"{module}.py").write_text(code)


SITE_LOSS = '''
import kdistill


class SiteLoss(kdistill.Loss):
    """Zero."""

    name = "site-loss"
    needs_teacher = False

    def __call__(self, student, teacher, batch):
        return student.logits.sum() * 0


@kdistill.hookimpl
def kd_register_losses():
    return [SiteLoss]
'''


def test_a_blocked_plugins_component_is_named_as_blocked(tiny_assets, tmp_path):
    site = tmp_path / "site"
    fake_distribution(site, "kd-site-plugin", "site_plugin", SITE_LOSS)
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    recipe = tiny_recipe(tiny_assets, tmp_path / "out")
    recipe["losses"].append({"name": "site-loss"})
    path = write_recipe(tmp_path / "r.yaml", recipe)
    assert kdistill("validate", path, env=env).returncode == 0
    blocked = {**env, "KDISTILL_BLOCK_PLUGINS": "site_plugin"}
    refused = kdistill("validate", path, env=blocked)
    assert refused.returncode == 2
    assert refused.stderr == ("error: losses[2].name: loss 'site-loss' is provided by plugin 'site_plugin' "
                              "(kd-site-plugin 0.3), blocked by KDISTILL_BLOCK_PLUGINS=site_plugin\n")
    recipe["losses"][2]["name"] = "site-los"  # not a blocked plugin's: unknown, and the blocked plugins are named
    refused = kdistill("validate", write_recipe(tmp_path / "r.yaml", recipe), env=blocked)
    assert refused.returncode == 2
    assert refused.stderr.startswith("error: losses[2].name: unknown loss 'site-los'. Installed: ")
    assert refused.stderr.endswith("; plugins blocked by KDISTILL_BLOCK_PLUGINS: site_plugin\n")
    listed = kdistill("plugins", env=blocked)
    assert listed.returncode == 0 and "site-loss" not in listed.stdout
    assert listed.stderr == ("note: plugin 'site_plugin' (kd-site-plugin 0.3) is blocked by KDISTILL_BLOCK_PLUGINS; "
                             "its components are not listed\n")


def test_a_plugin_that_fails_to_import_is_one_warning_line(tiny_assets, tmp_path):
    site = tmp_path / "site"
    fake_distribution(site, "kd-broken-plugin", "broken_plugin", "raise RuntimeError('first line\\nsecond line')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_assets, tmp_path / "out"))
    result = kdistill("validate", path, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ("warning: entry point 'broken_plugin' (broken_plugin) of distribution kd-broken-plugin 0.3 "
                             "failed to import: RuntimeError: first line\n")
