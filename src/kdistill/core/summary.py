"""What a run shows and leaves behind besides the model: the console, the progress bar, the
before/after table, summary.json, the loss curves, and a tracker that records nothing (ranks
other than 0)."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings and lists as one level of dotted keys (tracker parameters, result fields)."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in value):
        out = {}
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}"))
        return out
    return {prefix: value}


VERBOSE_ENV = "KDISTILL_VERBOSE"  # set (by `--verbose`): libraries keep their own progress bars and INFO lines


def quiet_libraries() -> None:
    """transformers', datasets' and MLflow's own progress bars and INFO lines would drown ours (and, without
    a terminal, end up in the log as lines of carriage returns): off unless $KDISTILL_VERBOSE is set."""
    if os.environ.get(VERBOSE_ENV):
        return
    try:
        from functools import partialmethod

        import tqdm.std

        if not getattr(tqdm.std.tqdm, "_kdistill_quiet", False):  # libraries that call tqdm directly (GGUF conversion)
            tqdm.std.tqdm.__init__ = partialmethod(tqdm.std.tqdm.__init__, disable=True)
            tqdm.std.tqdm._kdistill_quiet = True
    except ImportError:  # pragma: no cover
        pass
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def console():
    from rich.console import Console

    return Console(stderr=True)


def results_console():
    """Results (the before/after table, where the model went, the MLflow hint) go to stdout, so that
    `kdistill run ... > log` keeps them; progress and warnings go to stderr (`console`)."""
    from rich.console import Console

    return Console()


def progress_bar(console, transient: bool = False):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn(), TimeElapsedColumn(), console=console, transient=transient)


@contextmanager
def eval_progress(console, active):
    """Where evaluations show their progress: lines added to the training bar while it shows (one live
    display at a time), else a bar of their own that disappears when they are done."""
    if active is not None:
        yield active
        return
    with progress_bar(console, transient=True) as progress:
        yield progress


class EvalLine:
    """One evaluator's line of progress: the validation batches it reads, or what it reports itself."""

    def __init__(self, progress, task, val_batches):
        self.progress, self.task, self.val_batches = progress, task, val_batches

    def report(self, done: int, total: int | None = None, what: str = "batches") -> None:
        self.progress.update(self.task, completed=done, total=total, info=what)

    def batches(self) -> Iterator:
        """The validation batches, counted as the evaluator reads them."""
        for n, batch in enumerate(self.val_batches(), 1):
            yield batch
            self.report(n)


def plot_losses(history, out: Path) -> Path | None:
    """loss_curves.png: each loss term over this process's steps (a figure is not worth failing a run)."""
    try:
        from kdistill.core.plots import loss_curves

        return loss_curves(history, out / "loss_curves.png")
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"could not draw the loss curves: {type(exc).__name__}: {exc}", stacklevel=2)
        return None


def write_summary(out: Path, summary: dict[str, Any], tracker) -> dict[str, Any]:
    for name in ("run_id", "tracking_uri", "run_url"):
        if getattr(tracker, name, None):
            summary[f"mlflow_{name}"] = getattr(tracker, name)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    return summary


def disk_usage(out: Path, checkpoints: Path, saved: int, keep: int) -> dict[str, Any]:
    """What the run folder holds when the run ends, in bytes: the whole, the models, each kept checkpoint
    (one walk over the folder)."""
    total, final, best = 0, 0, 0
    kept: dict[str, int] = {}
    for f in out.rglob("*"):
        if not f.is_file() or f.is_symlink():
            continue
        size, parts = f.stat().st_size, f.relative_to(out).parts
        total += size
        final += size if parts[0] == "final" else 0
        best += size if parts[0] == "best" else 0
        if checkpoints in f.parents and (step := f.relative_to(checkpoints).parts[0]).startswith("step-"):
            kept[step] = kept.get(step, 0) + size
    return {"total_bytes": total, "final_bytes": final, "best_bytes": best, "checkpoints": dict(sorted(kept.items())),
            "checkpoints_saved": saved, "keep_checkpoints": keep}


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def disk_line(output_dir: str, disk: Mapping[str, Any]) -> str:
    """One line: how much the run folder holds and what `keep_checkpoints` left of the checkpoints."""
    parts = [f"final/ {human_bytes(disk['final_bytes'])}"]
    if disk["best_bytes"]:
        parts.append(f"best/ {human_bytes(disk['best_bytes'])}")
    kept = disk["checkpoints"]
    if kept:
        listed = ", ".join(f"{name} {human_bytes(size)}" for name, size in kept.items())
        removed = f"; {disk['checkpoints_saved'] - len(kept)} older removed" if disk["checkpoints_saved"] > len(kept) else ""
        parts.append(f"{len(kept)} checkpoint{'s' if len(kept) != 1 else ''} kept (train.keep_checkpoints {disk['keep_checkpoints']}"
                     f"{removed}): {listed}")
    return f"run folder {output_dir}: {human_bytes(disk['total_bytes'])} ({'; '.join(parts)})"


def json_safe(value: Any) -> Any:
    """NaN and infinities as null: JSON has no token for them (Python's json would write bare NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def print_summary(console, summary: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title="kdistill run")
    table.add_column("metric")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    after = summary["after"]
    keys = [k for k in after if k.startswith(("val/", "retention/"))] or [k for k in after if k.startswith("train/")]
    for key in keys:
        b = summary["before"].get(key)
        table.add_row(key, "" if b is None else f"{b:.4g}", f"{after[key]:.4g}")
    console.print(table)
    console.print(f"final student: {summary['final_model']}  (AutoModelForCausalLM.from_pretrained loads it)", soft_wrap=True)
    if "disk" in summary:
        console.print(disk_line(summary["output_dir"], summary["disk"]), soft_wrap=True)
    if "mlflow_tracking_uri" in summary:
        console.print(f"MLflow run {summary['mlflow_run_id']} in {summary['mlflow_tracking_uri']}; "
                      f"see it with: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}, then open "
                      f"{summary.get('mlflow_run_url', 'the experiment (Model training, in the sidebar)')}", soft_wrap=True)


class NoTracker:
    """Ranks other than 0 track nothing."""

    def start(self, *args, **kwargs):
        pass

    def log_metrics(self, *args, **kwargs):
        pass

    def log_artifact(self, *args, **kwargs):
        pass

    def log_model(self, *args, **kwargs):
        pass

    def log_summary(self, *args, **kwargs):
        pass

    def finish(self, *args, **kwargs):
        pass
