"""The hooks kdistill calls on plugins.

Registration hooks return component classes (not instances); each class declares its `name`. There
is one per kind of component, made from `components.KINDS`; `kd_register_commands` adds commands
to the command line.
Lifecycle hooks are called once per event for callbacks (logging, alerts); they never run per
micro-batch. Every hook is documented in docs/hooks.md and exercised in tests/core/test_hooks.py.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pluggy

from kdistill.core.components import KINDS, Kind

PROJECT = "kdistill"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


def _registration_spec(kind: Kind):
    def spec() -> Sequence[type]:  # type: ignore[empty-body]  # a spec: plugins implement it
        ...
    spec.__name__ = spec.__qualname__ = kind.hook
    spec.__doc__ = f"Return {kind.title.lower()} classes (subclasses of `kdistill.{kind.base.__name__}`)."
    return hookspec(spec)


# one registration hook per kind (kd_register_teachers, kd_register_losses, ...), from KINDS
for _kind in KINDS.values():
    globals()[_kind.hook] = _registration_spec(_kind)


@hookspec
def kd_register_commands(app: Any) -> None:
    """Add commands to the `kdistill` command line: `app` is its typer.Typer; use `@app.command()`."""


@hookspec
def kd_run_started(recipe: Mapping[str, Any], output_dir: str) -> None:
    """Called once when a run starts (after resume, before the first step)."""


@hookspec
def kd_step_finished(step: int, metrics: Mapping[str, float]) -> None:
    """Called after each optimizer step with that step's metrics (step counts from 1)."""


@hookspec
def kd_run_finished(output_dir: str, metrics: Mapping[str, float], status: str) -> None:
    """Called once when a run ends; `status` is "FINISHED" or "FAILED"."""
