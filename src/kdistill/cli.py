"""The `kdistill` command line: the layer above the core.

Built-in commands run, validate and inspect recipes and installed components; plugins add their
own through the `kd_register_commands` hook (kdistill's `cache-teacher`, `analyze` and
`teacher-check` come that way, from the components they belong to).
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
import typer.core

from kdistill.__about__ import __version__
from kdistill.core.errors import KdistillError
from kdistill.toolkit import RECIPES_DIR, SET_HELP, fail, plan_recipe, recipe_path, track_side_run


def _plain_flags(params: list) -> list:
    """No placeholder after a flag in --help: recent typer shows `--resume <bool>`, yet no value follows."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Group(typer.core.TyperGroup):
    """kdistill's command group: flags show as plain flags in every command's --help, plugins' included."""

    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))

    def get_command(self, ctx, cmd_name):
        command = super().get_command(ctx, cmd_name)
        if command is not None:
            _plain_flags(command.get_params(ctx))
        return command


app = typer.Typer(cls=_Group, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="kdistill: knowledge distillation for large language models.")

__all__ = ["RECIPES_DIR", "add_plugin_commands", "app", "main", "recipe_path"]


def _version(value: bool) -> None:
    if value:
        print(f"kdistill {__version__}")
        raise typer.Exit(0)


@app.callback()
def main_callback(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version")) -> None:
    pass


VERBOSE_HELP = "keep the libraries' own progress bars and INFO lines (transformers, datasets, MLflow)"


def _verbose(verbose: bool) -> None:
    if verbose:
        from kdistill.core.summary import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"


@app.command()
def validate(recipe: Path = typer.Argument(..., help="recipe YAML, or the name of a shipped recipe"),
             set_: List[str] = typer.Option([], "--set", help=SET_HELP)) -> None:
    """Check a recipe against the schema and the installed components; writes nothing."""
    try:
        plan = plan_recipe(recipe, set_)
    except KdistillError as exc:
        fail(exc)
    names = ", ".join(f"{slot}: {', '.join(r.entry.name for r in items)}" for slot, items in plan.components.items() if items)
    print(f"{recipe}: valid ({names})")


@app.command()
def run(recipe: Path = typer.Argument(..., help="recipe YAML, or the name of a shipped recipe"),
        set_: List[str] = typer.Option([], "--set", help=SET_HELP),
        resume: bool = typer.Option(False, "--resume", help="continue from the latest complete checkpoint"),
        resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="continue from this checkpoint folder (no fallback)"),
        force: bool = typer.Option(False, "--force", help="resume even where the recipe or data differ from the checkpoint's"),
        overwrite: bool = typer.Option(False, "--overwrite", help="discard this output folder's checkpoints and models"),
        verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP)) -> None:
    """Distill as the recipe says. Results go to stdout, progress and warnings to stderr."""
    from kdistill.core.engine import run_recipe

    _verbose(verbose)
    try:
        run_recipe(recipe_path(recipe), overrides=set_, resume=resume, overwrite=overwrite, resume_from=resume_from,
                   force=force)
    except KdistillError as exc:
        fail(exc)


@app.command()
def generate(recipe: Path = typer.Argument(..., help="recipe YAML with a generator section"),
             set_: List[str] = typer.Option([], "--set", help=SET_HELP),
             overwrite: bool = typer.Option(False, "--overwrite", help="replace output written by another teacher, "
                                            "other options or other prompts"),
             verbose: bool = typer.Option(False, "--verbose", help=VERBOSE_HELP)) -> None:
    """Have the recipe's teacher write its generator's dataset (resumable); `kdistill run` does this first when needed."""
    _verbose(verbose)
    import torch

    from kdistill import TeacherProvider
    from kdistill.core.summary import quiet_libraries
    from kdistill.toolkit import pick_device, run_generator, seed_everything

    quiet_libraries()
    try:
        plan = plan_recipe(recipe, set_)
        train = plan.recipe.train
        seed_everything(train.seed)
        if train.num_threads:
            torch.set_num_threads(train.num_threads)
        run_generator(plan, plan.build("teacher", TeacherProvider), pick_device(train.device), print, overwrite=overwrite)
    except KdistillError as exc:
        fail(exc)


MAIN_RECIPES = ("quickstart-chat", "quickstart")  # listed first, in this order


def recipe_description(text: str) -> str:
    """A recipe's description: its leading comment lines up to the first that ends a sentence ('.'),
    joined (a sentence may run over several lines); the lines after it (steps, `Needs:`) are not part of it."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
        if lines[-1].endswith("."):
            break
    return " ".join(part for part in lines if part)


@app.command()
def recipes() -> None:
    """List the recipes shipped with kdistill (run one by name: kdistill run quickstart)."""
    import shutil
    import textwrap

    paths = sorted(RECIPES_DIR.glob("*.yaml"), key=lambda p: (MAIN_RECIPES.index(p.stem) if p.stem in MAIN_RECIPES
                                                              else len(MAIN_RECIPES), p.stem))
    width = max(len(p.stem) for p in paths) + 2
    columns = max(60, shutil.get_terminal_size((100, 24)).columns)
    for path in paths:
        lines = textwrap.wrap(recipe_description(path.read_text(encoding="utf-8")) or "(no description)",
                              width=columns - width - 1, break_on_hyphens=False) or [""]
        print(f"{path.stem:<{width}}{lines[0]}")
        for line in lines[1:]:
            print(f"{'':<{width}}{line}")
    print(f"\nRun one by name (kdistill run quickstart-chat); the files are in {RECIPES_DIR}.")


@app.command()
def plugins() -> None:
    """List the installed components: kind, name, plugin, distribution and version."""
    from rich.console import Console
    from rich.table import Table

    from kdistill.core.plugins import BLOCK_ENV, make_plugin_manager
    from kdistill.core.registry import Registry

    try:
        with warnings.catch_warnings():  # failed imports are listed below, once
            warnings.simplefilter("ignore")
            pm = make_plugin_manager()
        registry = Registry.from_plugins(pm)
    except KdistillError as exc:
        fail(exc)
    table = Table(title="kdistill components")
    for column in ("kind", "name", "plugin", "distribution", "version"):
        table.add_column(column)
    for e in registry:
        table.add_row(e.kind, e.name, e.plugin, e.distribution, e.version)
    Console(width=200).print(table)
    for why in registry.failures.values():
        print(f"warning: {why}", file=sys.stderr)
    for name, ep in registry.blocked.items():
        dist = f" ({ep.dist.name} {ep.dist.version})" if ep.dist is not None else ""
        print(f"note: plugin '{name}'{dist} is blocked by {BLOCK_ENV}; its components are not listed", file=sys.stderr)


@app.command()
def schema(output: Optional[Path] = typer.Option(None, "--output", "-o", help="write to a file instead of stdout")) -> None:
    """Print the JSON Schema of a recipe, with every installed component's options."""
    from kdistill.core.registry import Registry
    from kdistill.core.schema import recipe_json_schema

    try:
        text = json.dumps(recipe_json_schema(Registry.from_plugins()), indent=1)
    except KdistillError as exc:
        fail(exc)
    if output is None:
        print(text)
    else:
        output.write_text(text + "\n")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        fail(KdistillError(f"{what}: expected comma-separated numbers, got {text!r}"))
        raise


@app.command()
def temperatures(logits: str = typer.Option("5,3,1,0.5,-1", help="comma-separated logits"),
                 t: str = typer.Option("0.5,1,2,5,10", "--t", help="comma-separated temperatures")) -> None:
    """Softmax of LOGITS at each temperature, with its entropy (how T softens a distribution)."""
    from kdistill.analysis import temperature_table

    values, temps = _floats(logits, "--logits"), _floats(t, "--t")
    try:
        rows = temperature_table(values, temps)
    except ValueError as exc:
        fail(KdistillError(f"--t: {exc}"))
    print(f"logits: {values}")
    for temp, probs, h in rows:
        print(f"T={temp:g}: probs=[{', '.join(f'{p:.4f}' for p in probs)}]  entropy={h:.4f} nats ({h / 0.6931471805599453:.4f} bits)")


@app.command()
def kl(teacher_logits: str = typer.Option(..., help="comma-separated teacher logits"),
       student_logits: str = typer.Option(..., help="comma-separated student logits"),
       temperature: float = typer.Option(1.0, help="softening temperature T")) -> None:
    """The distillation loss between two logit vectors, step by step (KL at T, then times T^2)."""
    from kdistill.analysis import kl_steps, signed_sum

    try:
        steps = kl_steps(_floats(teacher_logits, "--teacher-logits"), _floats(student_logits, "--student-logits"), temperature)
    except ValueError as exc:
        fail(KdistillError(str(exc)))
    fmt = lambda xs: "[" + ", ".join(f"{x:.6f}" for x in xs) + "]"  # noqa: E731
    print(f"1. teacher probabilities at T={steps.temperature:g}: {fmt(steps.teacher_probs)}")
    print(f"2. student log-probabilities at T={steps.temperature:g}: {fmt(steps.student_log_probs)}")
    print(f"3. KL(teacher || student) = sum p_t (log p_t - log p_s) = {signed_sum(steps.terms)} = {steps.kl:.6f}")
    print(f"4. times T^2 = {steps.temperature ** 2:g}: loss = {steps.loss:.6f}")


@app.command()
def flops(teacher_params: float = typer.Option(..., help="teacher parameters, e.g. 70e9"),
          student_params: float = typer.Option(..., help="student parameters, e.g. 8e9"),
          tokens: float = typer.Option(..., help="distillation tokens, e.g. 20e9"),
          pretrain_tokens: float = typer.Option(2e12, help="tokens to pretrain the student from scratch")) -> None:
    """FLOPs of distillation (teacher forward 2P, student forward+backward 6P per token) vs pretraining."""
    from kdistill.analysis import distillation_flops

    if min(teacher_params, student_params, tokens, pretrain_tokens) <= 0:
        fail(KdistillError("flops: every count must be positive"))
    f = distillation_flops(teacher_params, student_params, tokens, pretrain_tokens)
    print(f"per token: teacher forward {f.teacher_per_token:.3e} + student forward and backward {f.student_per_token:.3e} "
          f"= {f.teacher_per_token + f.student_per_token:.3e} FLOP")
    print(f"distillation: {tokens:.3e} tokens -> {f.distill_total:.3e} FLOP")
    print(f"pretraining the student: {pretrain_tokens:.3e} tokens x {f.student_per_token:.3e} -> {f.pretrain_total:.3e} FLOP")
    print(f"distillation / pretraining: {f.ratio:.2%}")


@app.command("zero-memory")
def zero_memory(teacher_params: float = typer.Option(..., help="teacher parameters, e.g. 70e9"),
                student_params: float = typer.Option(..., help="student parameters, e.g. 8e9"),
                gpus: int = typer.Option(8, min=1, help="data-parallel GPUs")) -> None:
    """Model-state memory per GPU for ZeRO stages 0-3 (bf16 + Adam), teacher replicated or partitioned."""
    from kdistill.analysis import zero_memory as compute

    if min(teacher_params, student_params) <= 0:
        fail(KdistillError("zero-memory: parameter counts must be positive"))
    gib = 2 ** 30
    print(f"teacher {teacher_params:.3g} parameters, student {student_params:.3g}, {gpus} GPUs; GiB per GPU "
          "(model states only: bf16 weights and gradients, float32 Adam state; no activations)")
    print("| ZeRO stage | student | teacher replicated | total | teacher ZeRO-3 | total |")
    print("|---|---|---|---|---|---|")
    for rep, part in zip(compute(teacher_params, student_params, gpus, False), compute(teacher_params, student_params, gpus, True)):
        print(f"| {rep.stage} | {rep.student_bytes / gib:.1f} | {rep.teacher_bytes / gib:.1f} | {rep.total / gib:.1f} | "
              f"{part.teacher_bytes / gib:.1f} | {part.total / gib:.1f} |")


@app.command()
def sweep(recipe: Path = typer.Argument(..., help="recipe YAML, or the name of a shipped recipe"),
          set_: List[str] = typer.Option([], "--set", help="overrides; exactly one with several values, "
                                         "e.g. --set losses[0].options.temperature=1,2,3,4,5"),
          train: bool = typer.Option(False, "--train", help="a short training run per value (default: one validation pass each)")) -> None:
    """Compare values of one recipe field: a table, a plot, and the best value named."""
    import json as _json

    from kdistill.analysis import split_sweep, sweep_training, sweep_validation
    from kdistill.toolkit import sweep_plot

    try:
        path = recipe_path(recipe)
        key, values, rest = split_sweep(set_)
        plan = plan_recipe(path, [*rest, f"{key}={values[0]}"])
        if train:
            scores, metric = sweep_training(path, key, values, rest, plan.recipe.output_dir)
        else:
            scores, metric = sweep_validation(path, key, values, rest), "val/distillation_loss"
    except KdistillError as exc:
        fail(exc)
    folder = Path(plan.recipe.output_dir) / "sweep"
    folder.mkdir(parents=True, exist_ok=True)
    best = min(range(len(values)), key=lambda i: scores[i] if scores[i] == scores[i] else float("inf"))
    print(f"| {key} | {metric} |")
    print("|---|---|")
    for value, score in zip(values, scores):
        print(f"| {value} | {score:.4f} |{'  <-- best' if value == values[best] else ''}")
    numeric = all(isinstance(v, (int, float)) for v in values)
    table = folder / "sweep.json"
    table.write_text(_json.dumps({"key": key, "metric": metric, "values": values, "scores": scores, "best": values[best]}, indent=1))
    print(f"best: {key}={values[best]}  (table {table}", end="")
    if numeric:
        plot = sweep_plot(key, [float(v) for v in values], scores, metric, folder / "sweep.png")
        print(f", plot {plot}", end="")
    print(")")
    track_side_run(plan, "sweep", {"sweep.key": key, "sweep.metric": metric},
                    [{f"sweep/{metric}": score, "sweep/value": float(v) if numeric else i} for i, (v, score) in enumerate(zip(values, scores))],
                    sorted(folder.glob("sweep.*")), folder)


def _take_local_rank(argv: list[str]) -> list[str]:
    """The `deepspeed` launcher appends --local_rank=N to the command; torchrun sets LOCAL_RANK instead."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def add_plugin_commands(target: typer.Typer, pm=None) -> None:
    """Commands from plugins (`kd_register_commands`); a plugin whose hook fails is named in a warning
    and the rest of the command line still works."""
    from kdistill.core.plugins import PluginWarning, make_plugin_manager

    if pm is None:
        try:
            with warnings.catch_warnings():  # a plugin that fails to import is named by the command that needs it
                warnings.simplefilter("ignore")
                pm = make_plugin_manager()
        except KdistillError as exc:  # reported again by the command that needs the plugins
            warnings.warn(f"plugins not loaded: {exc}", PluginWarning, stacklevel=2)
            return
    for impl in pm.hook.kd_register_commands.get_hookimpls():
        try:
            impl.function(app=target)
        except Exception as exc:  # a broken third-party plugin must not take the command line down
            first = (str(exc).strip().splitlines() or [""])[0]
            warnings.warn(f"plugin '{impl.plugin_name}': kd_register_commands failed: {type(exc).__name__}: {first}",
                          PluginWarning, stacklevel=2)


def _one_line_plugin_warnings() -> None:
    """A plugin that cannot be used is one `warning: ...` line on stderr, not Python's warning with its
    file, line number and source line; other warnings are shown as before."""
    from kdistill.core.plugins import PluginWarning

    show = warnings.showwarning
    if getattr(show, "kdistill_plugin_warnings", False):
        return

    def show_plugin_warning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, PluginWarning):
            print(f"warning: {' '.join(str(message).split())}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    show_plugin_warning.kdistill_plugin_warnings = True  # type: ignore[attr-defined]
    warnings.showwarning = show_plugin_warning


_one_line_plugin_warnings()  # before plugins' commands are added: their failures are warnings too
add_plugin_commands(app)


def main() -> None:
    sys.argv = _take_local_rank(sys.argv)
    app()


if __name__ == "__main__":
    main()
