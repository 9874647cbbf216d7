"""The `kdistill` command line: run, validate, plugins, schema."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kdistill.__about__ import __version__
from kdistill.core.errors import KdistillError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdistill: knowledge distillation for large language models.")

SET_HELP = "override a recipe field, e.g. --set train.steps=10 --set losses[0].options.temperature=2"


def _fail(exc: KdistillError) -> None:
    for problem in exc.problems:
        print(f"error: {problem}", file=sys.stderr)
    raise typer.Exit(2)


def _version(value: bool) -> None:
    if value:
        print(f"kdistill {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version")) -> None:
    pass


RECIPES_DIR = Path(__file__).resolve().parent.parent / "strategies" / "recipes"


def recipe_path(value: Path) -> Path:
    """A recipe file, or the name of a recipe shipped with kdistill (`kdistill recipes` lists them)."""
    if not value.exists() and value.suffix == "" and len(value.parts) == 1 and (RECIPES_DIR / f"{value}.yaml").is_file():
        return RECIPES_DIR / f"{value}.yaml"
    return value


def _plan(recipe: Path, overrides: list[str]):
    from kdistill.core.config import load_recipe, resolve
    from kdistill.core.registry import Registry

    registry = Registry.from_plugins()
    return resolve(load_recipe(recipe, overrides), registry)


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML, or the name of a shipped recipe"),
             set_: List[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Check a recipe against the schema and the installed components; writes nothing."""
    try:
        plan = _plan(recipe_path(recipe), set_)
    except KdistillError as exc:
        _fail(exc)
    names = ", ".join(f"{slot}: {', '.join(r.entry.name for r in items)}" for slot, items in plan.components.items() if items)
    print(f"{recipe}: valid ({names})")


@app.command()
def run(recipe: Path = typer.Argument(..., help="recipe YAML, or the name of a shipped recipe"),
        set_: List[str] = typer.Option([], "--set", help=SET_HELP),
        resume: bool = typer.Option(False, "--resume", help="continue from the latest complete checkpoint"),
        overwrite: bool = typer.Option(False, "--overwrite", help="discard this output folder's checkpoints and models")) -> None:
    """Distill as the recipe says."""
    from kdistill.core.engine import run_recipe

    try:
        run_recipe(recipe_path(recipe), overrides=set_, resume=resume, overwrite=overwrite)
    except KdistillError as exc:
        _fail(exc)


@app.command()
def recipes() -> None:
    """List the recipes shipped with kdistill (run one by name: kdistill run quickstart)."""
    for path in sorted(RECIPES_DIR.glob("*.yaml")):
        first = next((line[1:].strip() for line in path.read_text().splitlines() if line.startswith("#")), "")
        print(f"{path.stem:20s} {first}   ({path})")


@app.command()
def plugins() -> None:
    """List the installed components: kind, name, plugin, distribution and version."""
    from rich.console import Console
    from rich.table import Table

    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry

    try:
        pm = make_plugin_manager()
        registry = Registry.from_plugins(pm)
    except KdistillError as exc:
        _fail(exc)
    table = Table(title="kdistill components")
    for column in ("kind", "name", "plugin", "distribution", "version"):
        table.add_column(column)
    for e in registry:
        table.add_row(e.kind, e.name, e.plugin, e.distribution, e.version)
    Console(width=200).print(table)
    for why in registry.failures.values():
        print(f"warning: {why}", file=sys.stderr)


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "--output", "-o", help="write to a file instead of stdout")) -> None:
    """Print the JSON Schema of a recipe, with every installed component's options."""
    from kdistill.core.registry import Registry
    from kdistill.core.schema import recipe_json_schema

    try:
        text = json.dumps(recipe_json_schema(Registry.from_plugins()), indent=1)
    except KdistillError as exc:
        _fail(exc)
    if output is None:
        print(text)
    else:
        output.write_text(text + "\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
