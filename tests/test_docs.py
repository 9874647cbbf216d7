"""The README's commands and the recipe reference stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

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
    assert set(pages) == {kind.page for kind in KINDS.values()}
    for entry in registry:
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
