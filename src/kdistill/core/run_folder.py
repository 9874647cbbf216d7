"""The output folder's rules: when a run may start, resume or overwrite, what it writes first, and
which checkpoint a resumed run restores (the newest that loads, or exactly the one asked for)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Mapping

import yaml

from kdistill.core import checkpoint as ckpt
from kdistill.core.errors import KdistillError


def start_point(out: Path, resume: bool, overwrite: bool, resume_from: Path | None = None) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), or an error before anything is touched."""
    root = out / "checkpoints"
    if (resume or resume_from is not None) and overwrite:
        raise KdistillError("--resume and --overwrite exclude each other")
    if resume_from is not None:
        reason = ckpt.check_complete(resume_from) if resume_from.is_dir() else "no such folder"
        if reason is not None:
            raise KdistillError(f"--resume-from: {resume_from} is not a complete checkpoint ({reason})")
        return resume_from
    existing = ckpt.list_checkpoints(root)
    if resume:
        latest, skipped = ckpt.latest_complete(root)
        for path, reason in skipped:
            warnings.warn(f"skipping incomplete checkpoint {path}: {reason}", stacklevel=3)
        if latest is None:
            raise KdistillError(f"--resume: no complete checkpoint under {root}")
        return latest
    if existing and not overwrite:
        raise KdistillError(f"output_dir: {out} already holds checkpoints; pass --resume to continue or --overwrite to start over")
    return None


def clear(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote (only once the new run has been built)."""
    for name in ("checkpoints", "best", "final"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("mlflow_run.json", "metrics.jsonl", "summary.json"):
        (out / name).unlink(missing_ok=True)


def restore(backend, out: Path, start_from: Path, exact: bool, modules, optimizer) -> tuple[Path, dict[str, Any]]:
    """Load `start_from`; unless `exact`, a corrupt one is named in a warning and older complete ones
    are tried in turn (one process only: DeepSpeed's shards load as one checkpoint or not at all)."""
    if exact or not backend.falls_back:
        return start_from, backend.load_checkpoint(start_from, modules, optimizer)
    root = out / "checkpoints"
    candidates = [p for p in reversed(ckpt.list_checkpoints(root)) if p.name <= start_from.name and ckpt.check_complete(p) is None]
    failures = []
    for path in candidates:
        try:
            return path, backend.load_checkpoint(path, modules, optimizer)
        except KdistillError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=3)
            failures.append(str(exc))
    raise KdistillError([f"--resume: no checkpoint under {root} could be restored"] + failures)


def check_resume_state(state: Mapping[str, Any], now: Mapping[str, Any], fingerprint: str, path: Path, force: bool) -> None:
    """A checkpoint resumes only the run it came from: same results-relevant recipe fields, same data."""
    saved = state.get("result_fields", {})
    differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    problems = []
    if differ:
        problems.append(f"--resume: the recipe differs from {path} in {', '.join(differ)}")
    if state.get("data_fingerprint") != fingerprint:
        problems.append(f"--resume: the data differs from the data of {path} "
                        f"(fingerprint {state.get('data_fingerprint')} != {fingerprint})")
    if problems and not force:
        raise KdistillError([p + " (pass --force to resume anyway)" for p in problems])
    for problem in problems:
        warnings.warn(f"{problem}; resuming anyway (--force)", stacklevel=4)


def write_run_files(out: Path, recipe: Mapping[str, Any], registry) -> list[Path]:
    """recipe.yaml (the validated recipe) and plugins.json (every installed component and its source)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(dict(recipe), sort_keys=False))
    (out / "plugins.json").write_text(json.dumps([{"kind": e.kind, "name": e.name, "plugin": e.plugin,
                                                   "distribution": e.distribution, "version": e.version}
                                                  for e in registry], indent=1))
    return [out / "recipe.yaml", out / "plugins.json"]
