"""Documentation pages generated from the code, so they cannot drift from it.

`component_pages` writes one page per component kind from the `Options` models of kdistill's own
components (other installed plugins' components go on a page of their own, marked as such, so the
reference does not depend on where it is built); `recipe_schema_page` the recipe's fields from the static pydantic models; `strategy_pages`
one page per strategy with the shipped recipes that use it. The MkDocs hook in
`tools/mkdocs_hooks.py` adds them to the site at build time.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

import pydantic
import yaml

from kdistill.core.components import KINDS
from kdistill.core.config import DistributedSpec, FromTeacher, Recipe, StudentSpec, TrainSpec
from kdistill.core.registry import Entry, Registry
from kdistill.core.schedule import Scheduled

RECIPES_DIR = Path(__file__).resolve().parent / "strategies" / "recipes"


def _type_name(annotation: Any) -> str:
    if annotation in (Scheduled, typing.get_args(Scheduled)[0]):  # pydantic keeps the union, not its Annotated
        return "float | Schedule"
    text = getattr(annotation, "__name__", None) if not getattr(annotation, "__args__", None) else None
    text = text or repr(annotation)
    text = re.sub(r"\b(typing|pydantic\.types|kdistill\.[\w.]+|annotated_types)\.", "", text)
    text = text.replace("NoneType", "None").replace("<class '", "").replace("'>", "")
    return text


def _default(field: pydantic.fields.FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, pydantic.BaseModel):
        value = value.model_dump(mode="json")
    return f"`{yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def options_table(model: type[pydantic.BaseModel]) -> str:
    if not model.model_fields:
        return "No options.\n"
    rows = ["| option | type | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        rows.append(f"| `{name}` | `{_cell(_type_name(field.annotation))}` | {_cell(_default(field))} | {_cell(field.description or '')} |")
    return "\n".join(rows) + "\n"


OWN_DISTRIBUTION = "kdistill"
EXTRAS_PAGE = "installed-extras.md"


def is_own(entry: Entry) -> bool:
    """A component kdistill ships (declared in its own entry points), not one from another installed plugin."""
    return entry.distribution == OWN_DISTRIBUTION


def _component_section(entry: Entry, heading: str = "##") -> list[str]:
    doc = (entry.cls.__doc__ or "").strip()
    lines = [f"{heading} `{entry.name}`", "", f"From {entry.source}, class `{entry.cls.__module__}.{entry.cls.__qualname__}`.", ""]
    if doc:
        lines += [" ".join(doc.split()), ""]
    return lines + [options_table(entry.cls.Options)]


def component_pages(registry: Registry) -> dict[str, str]:
    """{file name: markdown}: one page per component kind with kdistill's own components only, so the
    reference is the same wherever the docs are built; and `installed-extras.md`, the components of the
    other plugins installed where they are built, on a page of its own that says so."""
    pages = {}
    for kind, declared in KINDS.items():
        lines = [f"# {declared.title}", "",
                 f"Generated from the code: every `{kind}` component kdistill ships, with its options "
                 f"(recipe slot `{declared.slot}{'[]' if declared.many else ''}`, as `{{name: NAME, options: {{...}}}}`). "
                 f"`kdistill plugins` lists the components installed where you run it, other plugins' included.", ""]
        for entry in (e for e in registry if e.kind == kind and is_own(e)):
            lines += _component_section(entry)
        pages[declared.page] = "\n".join(lines)
    pages[EXTRAS_PAGE] = extras_page(registry)
    return pages


def extras_page(registry: Registry) -> str:
    """The components of plugins other than kdistill installed where the docs were built."""
    extras = [e for e in registry if not is_own(e)]
    lines = ["# Other installed plugins (this build only)", "",
             "!!! note", "    Not part of kdistill: the components of other plugins that happened to be installed where this "
             "site was built. They differ from one build to another; `kdistill plugins` lists what is installed where "
             "you run it. [Writing a plugin](../plugins.md) says how to add your own.", ""]
    if not extras:
        return "\n".join(lines + ["None were installed.", ""])
    for kind, declared in KINDS.items():
        named = [e for e in extras if e.kind == kind]
        if named:
            lines += [f"## {declared.title}", ""]
            for entry in named:
                lines += _component_section(entry, "###")
    return "\n".join(lines)


def recipe_schema_page() -> str:
    sections = [("Top level", Recipe), ("`student`", StudentSpec), ("`student.from_teacher`", FromTeacher),
                ("`train`", TrainSpec), ("`distributed`", DistributedSpec)]
    lines = ["# Recipe fields (generated)", "",
             "Every field of a recipe with its type and default, read from the pydantic models that validate it. "
             "[Recipe reference](../recipes.md) explains them; `kdistill schema` prints the JSON Schema with every "
             "installed component's options.", ""]
    for title, model in sections:
        lines += [f"## {title}", "", options_table(model).replace("| option |", "| field |")]
    return "\n".join(lines)


def shipped_recipes() -> dict[str, dict[str, Any]]:
    return {path.stem: yaml.safe_load(path.read_text()) for path in sorted(RECIPES_DIR.glob("*.yaml"))}


def strategy_pages(registry: Registry) -> dict[str, str]:
    """{file name: markdown}: per strategy, what it does, its options, and the shipped recipes using it."""
    recipes = shipped_recipes()
    pages = {}
    for entry in (e for e in registry if e.kind == "strategy" and is_own(e)):
        lines = [f"# Strategy `{entry.name}`", "", " ".join((entry.cls.__doc__ or "").split()), "", "## Options", "",
                 options_table(entry.cls.Options), "## Shipped recipes", ""]
        using = [name for name, raw in recipes.items() if (raw.get("strategy") or {"name": "offline"})["name"] == entry.name]
        for name in using:
            text = (RECIPES_DIR / f"{name}.yaml").read_text()
            lines += [f"### `{name}`", "", f"`kdistill run {name}`; what it measured: [strategies](../strategies.md#measured-on-the-quickstart).", "",
                      "```yaml", text.rstrip(), "```", ""]
        if not using:
            lines += ["None yet.", ""]
        pages[f"{entry.name}.md"] = "\n".join(lines)
    return pages
