"""Local paths in recipes: plain paths (relative to the working folder) or `pkg://PACKAGE/FILE`.

`pkg://` points into an installed Python package's folder (for models and text shipped on PyPI)
and is located with importlib's finder, which never runs the package's code.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic

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


@dataclass(frozen=True)
class MustExist:
    """Marks an option as a local input that must exist before a run starts (checked by `kdistill validate`):
    `what` is "file", "file or folder", or "pattern" (a file or folder, or a glob matching at least one)."""

    what: str = "file or folder"


LocalPath = Annotated[str, MustExist()]  # a model folder or file, pkg:// allowed
LocalFile = Annotated[str, MustExist("file")]
LocalPattern = Annotated[str, MustExist("pattern")]  # a file or a glob pattern


def _inside(path: Path, folders: typing.Sequence[str]) -> bool:
    here = Path(os.path.abspath(path))
    return any(here.is_relative_to(os.path.abspath(Path(folder).expanduser())) for folder in folders)


def missing_input(value: str, field: str, what: str, made: typing.Sequence[str] = ()) -> str | None:
    """Why the local input `value` (option `field`) is unusable, or None. Paths inside a folder of `made`
    (a generator's output, written before the data are read) need not exist yet."""
    try:
        path = resolve_path(value, field)
    except ConfigError as exc:
        return exc.problems[0]
    if _inside(path, made):
        return None
    if what == "pattern":  # a file, a glob matching one, or a folder (a dataset saved by save_to_disk)
        local = str(path)
        matches = glob.glob(local) if glob.has_magic(local) else [local]
        return None if any(os.path.exists(m) for m in matches) else f"{field}: no such file: {value}"
    if what == "file":
        return None if path.is_file() else f"{field}: no such file: {path}"
    return None if path.exists() else f"{field}: no such file or folder: {path}"


def _marker(annotation: Any, metadata: list[Any]) -> MustExist | None:
    for item in metadata:
        if isinstance(item, MustExist):
            return item
    if typing.get_origin(annotation) is Annotated:
        return _marker(None, list(typing.get_args(annotation)[1:])) or _marker(typing.get_args(annotation)[0], [])
    for arg in typing.get_args(annotation):  # list[...], X | None
        found = _marker(arg, [])
        if found is not None:
            return found
    return None


def missing_inputs(options: pydantic.BaseModel, where: str, made: typing.Sequence[str] = ()) -> list[str]:
    """Every marked local input of `options` (and of the models nested in it) that does not exist
    (inside the folders `made` excepted)."""
    problems = []
    for name, info in type(options).model_fields.items():
        value, field = getattr(options, name), f"{where}.{name}"
        marker = _marker(info.annotation, info.metadata)
        items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
        for index, item in items:
            at = field if index is None else f"{field}[{index}]"
            if isinstance(item, pydantic.BaseModel):
                problems += missing_inputs(item, at, made)
            elif marker is not None and isinstance(item, str):
                problem = missing_input(item, at, marker.what, made)
                if problem:
                    problems.append(problem)
    return problems


def output_dir_problem(value: str) -> str | None:
    """Why a run could not write into output folder `value`, or None; checked before anything is made."""
    out = Path(value).expanduser()
    if out.exists():
        if not out.is_dir():
            return f"output_dir: {out} is a file, not a folder"
        return None if os.access(out, os.W_OK | os.X_OK) else f"output_dir: {out} is not writable"
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"output_dir: {parent} is a file, so {out} cannot be created"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"output_dir: {parent} is not writable, so {out} cannot be created"
