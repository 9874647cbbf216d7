"""What a run shows and leaves behind besides the model: the console, the progress bar, the
before/after table, summary.json, the loss curves, and a tracker that records nothing (ranks
other than 0)."""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any, Mapping


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


def quiet_libraries() -> None:
    """transformers' and MLflow's own progress bars and INFO lines would drown ours."""
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


def progress_bar(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold]distilling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                    TimeRemainingColumn(), console=console, transient=False)


def plot_losses(history, out: Path) -> Path | None:
    """loss_curves.png: each loss term over this process's steps (a figure is not worth failing a run)."""
    try:
        from kdistill.core.plots import loss_curves

        return loss_curves(history, out / "loss_curves.png")
    except Exception as exc:  # noqa: BLE001
        warnings.warn(f"could not draw the loss curves: {type(exc).__name__}: {exc}", stacklevel=2)
        return None


def write_summary(out: Path, summary: dict[str, Any], tracker) -> dict[str, Any]:
    for name in ("run_id", "tracking_uri"):
        if getattr(tracker, name, None):
            summary[f"mlflow_{name}"] = getattr(tracker, name)
    (out / "summary.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    return summary


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
    if "mlflow_tracking_uri" in summary:
        console.print(f"MLflow run {summary['mlflow_run_id']} in {summary['mlflow_tracking_uri']}; "
                      f"see it with: mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']}", soft_wrap=True)


class NoTracker:
    """Ranks other than 0 track nothing."""

    def start(self, *args, **kwargs):
        pass

    def log_metrics(self, *args, **kwargs):
        pass

    def log_artifact(self, *args, **kwargs):
        pass

    def finish(self, *args, **kwargs):
        pass
