"""The plugin manager: every component, built-in or third-party, comes from entry points.

Built-in components are declared in kdistill's own `[project.entry-points.kdistill]`, so the core
imports none of them by name and a user can block any of them like a third-party plugin.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from types import ModuleType
from typing import Iterable

import pluggy

from kdistill.core import hookspecs

ENTRY_POINT_GROUP = "kdistill"
BLOCK_ENV = "KDISTILL_BLOCK_PLUGINS"


class PluginWarning(UserWarning):
    """A plugin that cannot be used (it failed to import, or its hook failed); the command line shows it as
    one `warning: ...` line."""


class KdPluginManager(pluggy.PluginManager):
    """A pluggy manager that also remembers each plugin's distribution, failed imports and blocked entry points."""

    def __init__(self) -> None:
        super().__init__(hookspecs.PROJECT)
        self.add_hookspecs(hookspecs)
        self.distributions: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self.failures: dict[str, str] = {}  # entry point name -> why it failed to import
        self.blocked: dict[str, importlib.metadata.EntryPoint] = {}  # entry points skipped for $KDISTILL_BLOCK_PLUGINS


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def blocked_names(environ: dict[str, str] | None = None) -> set[str]:
    raw = (environ if environ is not None else os.environ).get(BLOCK_ENV, "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def make_plugin_manager(
    extra_plugins: Iterable[tuple[str, ModuleType | object]] = (),
    load_entry_points: bool = True,
) -> KdPluginManager:
    """Build a fresh manager (no global state): entry points of group "kdistill", then extras.

    A plugin named in $KDISTILL_BLOCK_PLUGINS (comma-separated entry point names) is skipped.
    A plugin whose import fails is recorded in `failures` with a warning; it only becomes an
    error when a recipe names a component that is not installed (see registry).
    """
    pm = KdPluginManager()
    for name in blocked_names():
        pm.set_blocked(name)
    if load_entry_points:
        for ep in sorted(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if pm.is_blocked(ep.name):
                pm.blocked.setdefault(ep.name, ep)
                continue
            if pm.has_plugin(ep.name):
                continue
            dist = (ep.dist.name, ep.dist.version) if ep.dist is not None else ("unknown", "")
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not take the CLI down
                why = f"entry point '{ep.name}' ({ep.value}) of distribution {dist[0]} {dist[1]} failed to import: {_first_line(exc)}"
                pm.failures[ep.name] = why
                warnings.warn(why, PluginWarning, stacklevel=2)
                continue
            pm.register(plugin, name=ep.name)
            pm.distributions[ep.name] = dist
    for name, plugin in extra_plugins:
        if not pm.is_blocked(name):
            pm.register(plugin, name=name)
            pm.distributions[name] = ("(in-process)", "")
    pm.check_pending()  # a hookimpl without a matching hookspec is an error
    return pm
