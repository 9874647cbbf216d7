"""The output folder's rules: when a run may start, resume or overwrite, what it writes first, and
which checkpoint a resumed run restores (the newest that loads, or exactly the one asked for)."""

from __future__ import annotations

import contextlib
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
    earlier = [name for name in EARLIER_RUN if (out / name).exists()]
    if resume:
        latest, skipped = ckpt.latest_complete(root)
        for path, reason in skipped:
            warnings.warn(f"skipping incomplete checkpoint {path}: {reason}", stacklevel=3)
        if latest is None:
            raise KdistillError(f"--resume: no complete checkpoint under {root}")
        return latest
    if existing and not overwrite:
        raise KdistillError(f"output_dir: {out} already holds checkpoints; pass --resume to continue or --overwrite to start over")
    if earlier and not overwrite:
        raise KdistillError(f"output_dir: {out} already holds a run ({', '.join(earlier)}); pass --overwrite to start over "
                            "or choose another output_dir")
    return None


# what an earlier run leaves in its folder (a folder holding any of them is not started in again)
EARLIER_RUN = ("summary.json", "final", "metrics.jsonl", "mlflow_run.json")


def finished(out: Path, recipe: Mapping[str, Any]) -> dict[str, Any] | None:
    """The summary of the run of this very recipe that finished in `out` (its final model, summary and
    recipe.yaml exist and match), else None: a changed recipe goes on to the resume checks."""
    path = out / "summary.json"
    if not (path.is_file() and (out / "final").is_dir() and (out / "recipe.yaml").is_file()):
        return None
    try:
        value = json.loads(path.read_text())
        same = yaml.safe_load((out / "recipe.yaml").read_text()) == json.loads(json.dumps(dict(recipe)))
    except (ValueError, yaml.YAMLError):
        return None
    return value if same and isinstance(value, dict) and value.get("after") else None


def lock_on_main(out: Path, backend):
    """The lock, taken by the main process; every process learns whether it got it (a refused run ends
    on every rank, not only on rank 0 while the others wait at a barrier)."""
    held, error = None, None
    if backend.is_main:
        try:
            held = lock(out)
        except KdistillError as exc:
            error = exc
    if not backend.agree(error is None):
        if held is not None:
            held.close()
        raise error or KdistillError(f"output_dir: {out} is in use by another kdistill run")
    return held


class FolderLock:
    """An exclusive hold on `out/.lock`; a folder the lock itself created and nothing else wrote to is
    removed again on release (a run refused before it began leaves no trace)."""

    def __init__(self, out: Path, handle, created: bool):
        self.out, self.handle, self.created = out, handle, created

    def close(self) -> None:
        if self.handle.closed:
            return
        with contextlib.suppress(OSError):  # best effort: a folder gone, or a run that began meanwhile, is left be
            if self.created and [p.name for p in self.out.iterdir()] == [".lock"]:
                (self.out / ".lock").unlink()
                self.out.rmdir()
        self.handle.close()

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def lock(out: Path) -> FolderLock:
    """Hold `out/.lock` for this process's lifetime (the OS releases it if the process dies): a second run
    on the folder is refused naming the holder, and never deletes or interleaves with this one's files."""
    import fcntl
    import os

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "a+")  # noqa: SIM115 - kept open: the lock lives as long as the file is open
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise KdistillError(f"output_dir: {out} is in use by another kdistill run (PID {holder}); wait for it to end "
                            "or choose another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return FolderLock(out, handle, created)


def clear(out: Path) -> None:
    """--overwrite: remove what an earlier run wrote (only once the new run has been built)."""
    for name in ("checkpoints", "best", "final"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("mlflow_run.json", "metrics.jsonl", "summary.json"):
        (out / name).unlink(missing_ok=True)


def restore(backend, out: Path, start_from: Path, exact: bool, modules, optimizer) -> tuple[Path, dict[str, Any]]:
    """Load `start_from`; unless `exact`, a corrupt one is named in a warning and older complete ones
    are tried in turn (one process only: DeepSpeed's shards load as one checkpoint or not at all)."""
    def load(path: Path) -> dict[str, Any]:
        return checked_state(backend.load_checkpoint(path, modules, optimizer), path)

    if exact or not backend.falls_back:
        return start_from, load(start_from)
    root = out / "checkpoints"
    candidates = [p for p in reversed(ckpt.list_checkpoints(root)) if p.name <= start_from.name and ckpt.check_complete(p) is None]
    failures = []
    for path in candidates:
        try:
            return path, load(path)
        except KdistillError as exc:
            warnings.warn(f"skipping checkpoint {path}: {exc}", stacklevel=3)
            failures.append(str(exc))
    raise KdistillError([f"--resume: no checkpoint under {root} could be restored"] + failures)


def what_is_kept(root: Path) -> str:
    """After a failed write: which checkpoint a --resume would start from (a folder that cannot even be
    listed counts as none)."""
    latest = None
    with contextlib.suppress(OSError):
        latest = ckpt.latest_complete(root)[0]
    return f"the last complete checkpoint, {latest}, is kept" if latest else "no complete checkpoint was written"


def checked_state(state: Any, path: Path) -> dict[str, Any]:
    """A checkpoint's state.json has the shape kdistill writes: valid JSON of another shape is a corrupt
    checkpoint (named, and skipped by --resume), not a KeyError later."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    shape = {"step": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
             "best": lambda v: v is None or number(v),
             "before": lambda v: isinstance(v, dict) and all(number(x) or x is None for x in v.values()),
             "data_fingerprint": lambda v: isinstance(v, str),
             "result_fields": lambda v: isinstance(v, dict)}
    if not isinstance(state, dict):
        raise KdistillError(f"{path / 'state.json'}: not a checkpoint state (a JSON {type(state).__name__}, not an object)")
    wrong = [key for key, fits in shape.items() if key not in state or not fits(state[key])]
    if wrong:
        raise KdistillError(f"{path / 'state.json'}: not a checkpoint state (missing or malformed: {', '.join(wrong)})")
    return state


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
