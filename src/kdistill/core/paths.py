"""Local paths in recipes: plain paths (relative to the working folder) or `pkg://PACKAGE/FILE`.

`pkg://` points into an installed Python package's folder (for models and text shipped on PyPI)
and is located with importlib's finder, which never runs the package's code.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kdistill.core.errors import ConfigError

PKG_SCHEME = "pkg://"


def resolve_path(value: str, field: str = "path") -> Path:
    """Return a local Path for `value`; a `pkg://` whose package is not installed is an error."""
    if not value.startswith(PKG_SCHEME):
        return Path(value).expanduser()
    package, _, rest = value[len(PKG_SCHEME):].partition("/")
    top, *inner = package.split(".")
    try:  # a top-level name only: finding `a.b` would import (run) package `a`
        spec = importlib.util.find_spec(top) if top.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{field}: package '{package}' of {value} is not installed (pip install --no-deps {top.replace('_', '-')})")
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*inner)
    if inner and not base.is_dir():
        raise ConfigError(f"{field}: package '{package}' of {value} is not installed (no folder {base})")
    target = base / rest
    if not target.resolve().is_relative_to(base.resolve()):
        raise ConfigError(f"{field}: {value} leaves the package's folder ({base}); pkg:// paths stay inside it")
    return target
