"""An immutable name -> class mapping per component kind, each entry tied to its plugin."""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterator, Mapping

from kdistill.core.components import KINDS
from kdistill.core.errors import RegistryError
from kdistill.core.plugins import BLOCK_ENV, KdPluginManager, make_plugin_manager


def _provides(ep: importlib.metadata.EntryPoint) -> dict[str, list[str]]:
    """kind -> the component names a (blocked) entry point's plugin registers; {} where it cannot be imported
    or its hooks fail (a blocked plugin may be blocked for being broken)."""
    out: dict[str, list[str]] = {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = KdPluginManager()
            probe.register(ep.load(), name=ep.name)
            for kind, declared in KINDS.items():
                for impl in getattr(probe.hook, declared.hook).get_hookimpls():
                    out.setdefault(kind, []).extend(str(getattr(c, "name", "")) for c in impl.function() or ())
    except Exception:  # noqa: BLE001 - only the message loses the plugin's name
        return {}
    return out


@dataclass(frozen=True)
class Entry:
    kind: str
    name: str
    cls: Any  # a subclass of the kind's base class (its class attributes are read: needs_teacher, provides, ...)
    plugin: str
    distribution: str
    version: str

    @property
    def source(self) -> str:
        return f"plugin '{self.plugin}' ({self.distribution} {self.version})".replace(" )", ")")


class Registry:
    """Read-only view of the installed components. Build it with `Registry.from_plugins`."""

    def __init__(self, entries: Mapping[str, Mapping[str, Entry]], failures: Mapping[str, str] | None = None,
                 blocked: Mapping[str, importlib.metadata.EntryPoint] | None = None):
        self._entries = MappingProxyType({k: MappingProxyType(dict(v)) for k, v in entries.items()})
        self.failures = MappingProxyType(dict(failures or {}))
        self.blocked = MappingProxyType(dict(blocked or {}))  # entry point name -> entry point, per $KDISTILL_BLOCK_PLUGINS
        self._blocked_provides: dict[str, dict[str, list[str]]] = {}

    @classmethod
    def from_plugins(cls, pm: KdPluginManager | None = None) -> "Registry":
        pm = pm if pm is not None else make_plugin_manager()
        entries: dict[str, dict[str, Entry]] = {kind: {} for kind in KINDS}
        problems: list[str] = []
        for kind, declared in KINDS.items():
            hook_name, base = declared.hook, declared.base
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                dist, version = pm.distributions.get(impl.plugin_name, ("(in-process)", ""))
                for component in impl.function() or ():
                    where = f"plugin '{impl.plugin_name}'"
                    if not (isinstance(component, type) and issubclass(component, base)):
                        problems.append(f"{where}: {hook_name} returned {component!r}, not a subclass of {base.__name__}")
                        continue
                    name = getattr(component, "name", None)
                    if not isinstance(name, str) or not name:
                        problems.append(f"{where}: {component.__qualname__} declares no `name`")
                        continue
                    entry = Entry(kind, name, component, impl.plugin_name, dist, version)
                    if name in entries[kind]:
                        other = entries[kind][name]
                        problems.append(f"{kind} '{name}' is provided twice: by {other.source} and by {entry.source}")
                        continue
                    entries[kind][name] = entry
        for kind, named in entries.items():
            defaults = [e for e in named.values() if e.cls.is_default]
            if len(defaults) > 1:
                problems.append(f"{kind.replace('_', ' ')}: {' and '.join(repr(e.name) for e in defaults)} are each marked "
                                f"as the default ({', '.join(e.source for e in defaults)})")
        if problems:
            raise RegistryError(problems)
        return cls(entries, pm.failures, pm.blocked)

    def names(self, kind: str) -> list[str]:
        return sorted(self._entries[kind])

    def __iter__(self) -> Iterator[Entry]:
        for kind in KINDS:
            for name in sorted(self._entries[kind]):
                yield self._entries[kind][name]

    @property
    def by_kind(self) -> Mapping[str, Mapping[str, Entry]]:
        """kind -> name -> Entry, read-only."""
        return self._entries

    def find(self, kind: str, name: str) -> Entry | None:
        return self._entries[kind].get(name)

    def default(self, kind: str) -> Entry | None:
        """The component of `kind` marked `is_default`, if one is installed."""
        return next((e for e in self._entries[kind].values() if e.cls.is_default), None)

    def blocked_provider(self, kind: str, name: str) -> str | None:
        """The blocked entry point that would provide component `name` of `kind`, if one does. Blocked
        plugins are imported here only, on the way to an error message, each in a manager of its own."""
        for ep_name, ep in self.blocked.items():
            if ep_name not in self._blocked_provides:
                self._blocked_provides[ep_name] = _provides(ep)
            if name in self._blocked_provides[ep_name].get(kind, ()):
                return ep_name
        return None

    def unknown_message(self, kind: str, name: str) -> str:
        ep_name = self.blocked_provider(kind, name) if self.blocked else None
        if ep_name is not None:
            ep = self.blocked[ep_name]
            dist = f" ({ep.dist.name} {ep.dist.version})" if ep.dist is not None else ""
            return (f"{kind.replace('_', ' ')} '{name}' is provided by plugin '{ep_name}'{dist}, blocked by "
                    f"{BLOCK_ENV}={os.environ.get(BLOCK_ENV, ep_name).strip()}")
        installed = self.names(kind)
        close = difflib.get_close_matches(name, installed, n=3, cutoff=0.6)
        msg = f"unknown {kind.replace('_', ' ')} '{name}'"
        msg += f"; did you mean {', '.join(repr(c) for c in close)}?" if close else "."
        msg += f" Installed: {', '.join(installed) if installed else '(none)'}"
        if self.failures:
            msg += "; plugins that failed to import: " + "; ".join(self.failures.values())
        if self.blocked:
            msg += f"; plugins blocked by {BLOCK_ENV}: {', '.join(self.blocked)}"
        return msg

    def get(self, kind: str, name: str) -> Entry:
        entry = self.find(kind, name)
        if entry is None:
            raise RegistryError(self.unknown_message(kind, name))
        return entry
