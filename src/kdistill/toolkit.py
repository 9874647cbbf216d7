"""The toolkit for plugin authors: what components and commands need beyond the public API.

A plugin imports `kdistill` (component base classes, the data passed between them, `hookimpl`,
errors) and this module; nothing else inside kdistill. kdistill's own built-in plugins, strategies
and evaluators are held to the same rule (tests/core/test_layering.py checks it).

- The recipe's losses on a micro-batch, logit losses on the fused path (chunks from hidden states,
  no full logits): `LossStep` with `StepOptions` (a strategy composes one; `weighted_losses` for
  the plain sum), or `fused_logit_loss` and its helpers directly.
- Frozen models (a teacher, an EMA copy): `frozen_outputs`; `model_dtype` for `Batch.model_inputs`.
- Hidden states and attention maps of chosen layers: `capture`, `num_layers`, `check_pairs`.
- Models: `load_causal_lm`, `load_tokenizer`, `student_from_teacher`, `decoder_layers`,
  `choose_attention` (SDPA, or flash attention 2 on CUDA where installed); `layer_scores` (each teacher
  layer's importance: block influence or removal KL) and `keep_layers` (the highest-scoring ones).
- Conversations: `read_table` (local data through `datasets`), `prompt_ids` (a prompt in the chat
  template), `sample_completions` (batched generation with a KV cache; `sample_completions_with_logits`
  also gives the stop token and the raw logits of every generated token), `stop_ids`, `check_chat_template`.
- Runs: `pick_device`, `seed_everything`; `run_generator` (a recipe's generator, as `kdistill run` runs it first).
- Figures: `loss_curves`, `sweep_plot`, `histogram`, `bars` (headless PNG files).
- Commands (from `kd_register_commands`): `recipe_path`, `plan_recipe`, `fail`, `track_side_run`, `SET_HELP`.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any, Sequence

from kdistill.core.capture import attention_module, capture, num_layers
from kdistill.core.chat import (
    GENERATION_MANIFEST,
    ROLES,
    answer_batch,
    check_chat_template,
    prompt_ids,
    read_table,
    sample_completions,
    sample_completions_with_logits,
    stop_ids,
)
from kdistill.core.components import check_pairs
from kdistill.core.errors import ConfigError, KdistillError
from kdistill.core.fused import TeacherRows, final_hidden, frozen_outputs, fused_logit_loss, fused_supported, model_dtype
from kdistill.core.generation import run_generator
from kdistill.core.layer_choice import keep as keep_layers
from kdistill.core.layer_choice import layer_scores
from kdistill.core.models import choose_attention, decoder_layers, load_causal_lm, load_tokenizer, student_from_teacher
from kdistill.core.plots import bars, histogram, loss_curves, sweep_plot
from kdistill.core.runtime import pick_device, seed_everything
from kdistill.core.step import FeatureBridge, LossStep, StepOptions, use_eager_attention, weighted_losses

SET_HELP = ("override a recipe field (the value is YAML), e.g. --set train.steps=10 --set losses[0].options.temperature=2; "
            "a key ending in [+] appends to a list: --set 'losses[+]={name: tvd, weight: 0.1}'")

# the recipes shipped with kdistill (package data)
RECIPES_DIR = Path(__file__).resolve().parent / "strategies" / "recipes"


def recipe_path(value: Path) -> Path:
    """A recipe file, or the name of a recipe shipped with kdistill (`kdistill recipes` lists them).
    A bare name (no folder, no suffix) that is neither raises ConfigError naming the closest shipped recipes."""
    value = Path(value)
    if value.exists() or value.suffix != "" or len(value.parts) != 1:
        return value  # a file (load_recipe says if it is missing)
    if (RECIPES_DIR / f"{value}.yaml").is_file():
        return RECIPES_DIR / f"{value}.yaml"
    shipped = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    ratio = {name: difflib.SequenceMatcher(None, str(value), name).ratio() for name in shipped}
    close = [name for name in difflib.get_close_matches(str(value), shipped, n=3, cutoff=0.6)
             if ratio[name] >= max(ratio.values()) - 0.1]  # the names sharing "quickstart-" are all near one another
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"shipped: {', '.join(shipped)}"
    raise ConfigError(f"{value}: no such recipe file or shipped recipe; {hint} (kdistill recipes lists them)")


def plan_recipe(recipe: Path, overrides: Sequence[str] = ()):
    """The validated plan of a recipe file (or shipped recipe name) with `--set` overrides."""
    from kdistill.core.config import load_recipe, resolve
    from kdistill.core.registry import Registry

    return resolve(load_recipe(recipe_path(recipe), list(overrides)), Registry.from_plugins())


def fail(exc: KdistillError) -> None:
    """End a command on bad input: one line per problem on stderr, exit code 2 (1 for a component's
    fault, with its traceback, which its author needs)."""
    import typer

    exit_code = getattr(exc, "exit_code", 2)
    if exit_code != 2 and exc.__cause__ is not None:
        import traceback

        traceback.print_exception(exc.__cause__, file=sys.stderr)
    for problem in exc.problems:
        one_line = " ".join(problem.splitlines()) if problem.strip() else "(no message)"
        print(f"error: {one_line}", file=sys.stderr)
    raise typer.Exit(exit_code)


def track_side_run(plan, suffix: str, params: dict[str, Any], metrics: list[dict[str, float]], files: list[Path],
                   folder: Path) -> None:
    """Log an analysis (a sweep, a teacher report) as a tracker run of its own, beside training runs."""
    tracker = plan.one("tracker").build()
    tracker.start(f"{plan.recipe.run_name or Path(plan.recipe.output_dir).name}-{suffix}", params, str(folder))
    for step, values in enumerate(metrics):
        tracker.log_metrics(values, step=step)
    for path in files:
        tracker.log_artifact(str(path), suffix)
    tracker.finish()


__all__ = [
    "GENERATION_MANIFEST", "RECIPES_DIR", "ROLES", "SET_HELP", "answer_batch", "check_chat_template", "prompt_ids", "read_table",
    "sample_completions", "sample_completions_with_logits", "stop_ids", "FeatureBridge", "LossStep", "StepOptions",
    "TeacherRows", "use_eager_attention",
    "weighted_losses", "attention_module", "bars", "capture", "check_pairs", "choose_attention",
    "decoder_layers", "fail", "final_hidden", "frozen_outputs", "fused_logit_loss", "fused_supported", "histogram",
    "load_causal_lm", "load_tokenizer", "loss_curves", "model_dtype", "num_layers", "pick_device", "plan_recipe", "recipe_path",
    "run_generator", "seed_everything", "student_from_teacher", "keep_layers", "layer_scores", "sweep_plot", "track_side_run",
]
