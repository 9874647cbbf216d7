"""The README's commands and the recipe reference stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from kdistill.core.config import DistributedSpec, Recipe, StudentSpec, TrainSpec

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_recipe_reference_lists_every_field():
    text = (ROOT / "docs" / "recipes.md").read_text()
    for heading, model in (("## Top level", Recipe), ("## `student`", StudentSpec), ("## `train`", TrainSpec),
                           ("## `distributed`", DistributedSpec)):
        section = text.split(heading, 1)[1].split("\n## ", 1)[0]
        documented = set(re.findall(r"^\| `([a-z_]+)` \|", section, re.M))
        assert documented == set(model.model_fields), heading


DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]


def blocks(language: str):
    for path in DOCS:
        for match in re.finditer(rf"```{language}\n(.*?)```", path.read_text(), re.S):
            yield path.name, match.group(1)


def test_yaml_in_the_docs_validates_as_part_of_a_recipe(tiny_assets, tmp_path):
    """Every YAML block that sets recipe sections validates when it replaces them in a working recipe."""
    import yaml

    from conftest import tiny_recipe
    from kdistill.core.config import resolve
    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry

    registry = Registry.from_plugins(make_plugin_manager(extra_plugins=[("how-to", how_to_plugin()[1])]))
    checked = 0
    for _name, text in blocks("yaml"):
        raw = yaml.safe_load(text)
        if not isinstance(raw, dict) or not set(raw) & set(Recipe.model_fields):
            continue
        recipe = tiny_recipe(tiny_assets, tmp_path / "out")
        recipe.update(raw)
        resolve(recipe, registry, check_inputs=False)  # raises ConfigError naming the field (paths are examples)
        checked += 1
    assert checked >= 7


def test_kdistill_commands_in_the_docs_exist_with_their_options():
    import typer.main

    from kdistill.cli import app

    group = typer.main.get_command(app)
    seen = 0
    for name, text in blocks("bash"):
        for line in text.splitlines():
            words = line.split("#")[0].split()
            if len(words) < 2 or words[0] != "kdistill" or words[1].startswith("-"):
                continue
            command = group.commands.get(words[1])
            assert command is not None, f"{name}: `kdistill {words[1]}` is not a command"
            known = {opt for param in command.params if getattr(param, "param_type_name", "") == "option" for opt in param.opts}
            for word in words[2:]:
                option = word.split("=")[0].strip("[]|")
                if option.startswith("--"):
                    assert option in known, f"{name}: `kdistill {words[1]}` has no option {option}"
            seen += 1
    assert seen >= 15


def how_to_plugin():
    """The plugin written out in docs/plugins.md, executed: (its namespace, a plugin object)."""
    code = next(text for name, text in blocks("python") if name == "plugins.md")
    namespace: dict = {}
    exec(compile(code, "docs/plugins.md", "exec"), namespace)  # noqa: S102 - our own documentation
    return namespace, type("HowTo", (), {"kd_register_losses": staticmethod(namespace["kd_register_losses"])})()


def test_the_plugin_how_to_code_is_a_working_plugin():
    from kdistill.testing import check_component

    namespace, plugin = how_to_plugin()
    check_component(namespace["ScaledCE"], plugin=plugin)
    for name, text in blocks("python"):
        compile(text, name, "exec")


def test_generated_component_pages_list_every_component_and_option():
    from kdistill.core.components import KINDS
    from kdistill.core.registry import Registry
    from kdistill.docgen import component_pages, recipe_schema_page, strategy_pages

    registry = Registry.from_plugins()
    pages = component_pages(registry)
    assert set(pages) == {kind.page for kind in KINDS.values()} | {"installed-extras.md"}
    for entry in (e for e in registry if e.distribution == "kdistill"):
        page = pages[KINDS[entry.kind].page]
        assert f"## `{entry.name}`" in page
        for option in entry.cls.Options.model_fields:
            assert f"| `{option}` |" in page, (entry.name, option)
    fields = recipe_schema_page()
    for model in (Recipe, StudentSpec, TrainSpec, DistributedSpec):
        for field in model.model_fields:
            assert f"| `{field}` |" in fields
    assert "kdistill run quickstart" in strategy_pages(registry)["offline.md"]


def test_mkdocs_nav_points_at_pages_that_exist_or_are_generated():
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text().replace("!!python", "#"))
    generated_dirs = ("components/", "strategies/", "reference/recipe-fields.md")

    def pages(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, list):
            for item in node:
                yield from pages(item)
        elif isinstance(node, dict):
            for value in node.values():
                yield from pages(value)

    listed = list(pages(config["nav"]))
    for page in listed:
        assert (ROOT / "docs" / page).is_file() or page.startswith(generated_dirs), page
    hand_written = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert hand_written <= set(listed), hand_written - set(listed)


def test_the_reference_pages_hold_kdistills_own_components_only():
    """Built where another plugin is installed, the reference is the same; the extras get a page of their own."""
    import types

    import kdistill
    from kdistill.core.components import KINDS
    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry
    from kdistill.docgen import component_pages, strategy_pages

    class ExtraLoss(kdistill.Loss):
        """A loss from another plugin."""

        name = "extra-loss"

        def __call__(self, student, teacher, batch):
            return student.logits.sum() * 0

    class ExtraStrategy(kdistill.Strategy):
        """A strategy from another plugin."""

        name = "extra-strategy"

    module = types.ModuleType("extra_plugin")
    module.kd_register_losses = kdistill.hookimpl(lambda: [ExtraLoss])  # type: ignore[attr-defined]
    module.kd_register_strategies = kdistill.hookimpl(lambda: [ExtraStrategy])  # type: ignore[attr-defined]
    plain = Registry.from_plugins(make_plugin_manager(load_entry_points=True))
    with_extra = Registry.from_plugins(make_plugin_manager(extra_plugins=[("extra_plugin", module)]))
    pages, before = component_pages(with_extra), component_pages(plain)
    own = {kind.page for kind in KINDS.values()}
    assert {name: pages[name] for name in own} == {name: before[name] for name in own}
    assert "extra-loss" not in " ".join(pages[name] for name in own) and "extra-strategy.md" not in strategy_pages(with_extra)
    extras = pages["installed-extras.md"]
    assert extras.startswith("# Other installed plugins (this build only)\n\n!!! note\n    Not part of kdistill")
    assert "### `extra-loss`" in extras and "### `extra-strategy`" in extras
    assert "From plugin 'extra_plugin' ((in-process))" in extras
    if any(e.name == "example-logit-cosine" for e in plain):  # the example plugin, installed in the test environment
        assert "example-logit-cosine" not in " ".join(before[name] for name in own)
        assert "### `example-logit-cosine`" in before["installed-extras.md"]
    nav = (ROOT / "mkdocs.yml").read_text()
    assert "      - Other installed plugins (this build only): components/installed-extras.md\n" in nav


def readme_plugin_files() -> tuple[str, str]:
    """The README's plugin module and its whole pyproject.toml, as written there."""
    section = (ROOT / "README.md").read_text().split("## Writing a plugin", 1)[1].split("\n## ", 1)[0]
    module = re.search(r"```python\n(# my_plugin/__init__.py\n.*?)```", section, re.S).group(1)
    pyproject = re.search(r"```toml\n(.*?)```", section, re.S).group(1)
    return module, pyproject


def test_the_readme_plugin_pyproject_is_a_whole_file_that_installs(tmp_path):
    import importlib.metadata
    import os
    import subprocess
    import sys

    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")

    module, pyproject = readme_plugin_files()
    parsed = tomllib.loads(pyproject)
    assert parsed["project"]["name"] and parsed["project"]["version"] and parsed["build-system"]["build-backend"]
    assert parsed["project"]["entry-points"]["kdistill"] == {"my_plugin": "my_plugin"}
    (tmp_path / "src" / "my_plugin").mkdir(parents=True)
    (tmp_path / "src" / "pyproject.toml").write_text(pyproject)
    (tmp_path / "src" / "my_plugin" / "__init__.py").write_text(module)
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--disable-pip-version-check", "--quiet", "--target", str(target), str(tmp_path / "src")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    dist = next(importlib.metadata.distributions(path=[str(target)]))
    assert dist.metadata["Name"] == parsed["project"]["name"]
    assert [(ep.group, ep.name, ep.value) for ep in dist.entry_points] == [("kdistill", "my_plugin", "my_plugin")]
    listed = subprocess.run([sys.executable, "-m", "kdistill.cli", "plugins"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])})
    assert listed.returncode == 0, listed.stderr
    row = next(line for line in listed.stdout.splitlines() if "scaled-ce" in line)
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["loss", "scaled-ce", "my_plugin", "my-kdistill-plugin", "0.1.0"]
