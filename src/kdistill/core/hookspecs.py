"""The hooks kdistill calls on plugins.

Registration hooks return component classes (not instances); each class declares its `name`.
Lifecycle hooks are called once per event for callbacks (logging, alerts); they never run per
micro-batch. Every hook is documented in docs/hooks.md and exercised in tests/test_hooks.py.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pluggy

PROJECT = "kdistill"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kd_register_teachers() -> Sequence[type]:
    """Return teacher provider classes (subclasses of `kdistill.TeacherProvider`)."""


@hookspec
def kd_register_losses() -> Sequence[type]:
    """Return loss classes (subclasses of `kdistill.Loss`)."""


@hookspec
def kd_register_layer_mappers() -> Sequence[type]:
    """Return layer mapper classes (subclasses of `kdistill.LayerMapper`)."""


@hookspec
def kd_register_schedulers() -> Sequence[type]:
    """Return scheduler classes (subclasses of `kdistill.Scheduler`)."""


@hookspec
def kd_register_evaluators() -> Sequence[type]:
    """Return evaluator classes (subclasses of `kdistill.Evaluator`)."""


@hookspec
def kd_register_strategies() -> Sequence[type]:
    """Return training strategy classes (subclasses of `kdistill.Strategy`)."""


@hookspec
def kd_register_data_sources() -> Sequence[type]:
    """Return data source classes (subclasses of `kdistill.DataSource`)."""


@hookspec
def kd_register_trackers() -> Sequence[type]:
    """Return tracker classes (subclasses of `kdistill.Tracker`)."""


@hookspec
def kd_run_started(recipe: Mapping[str, Any], output_dir: str) -> None:
    """Called once when a run starts (after resume, before the first step)."""


@hookspec
def kd_step_finished(step: int, metrics: Mapping[str, float]) -> None:
    """Called after each optimizer step with that step's metrics (step counts from 1)."""


@hookspec
def kd_run_finished(output_dir: str, metrics: Mapping[str, float], status: str) -> None:
    """Called once when a run ends; `status` is "FINISHED" or "FAILED"."""
