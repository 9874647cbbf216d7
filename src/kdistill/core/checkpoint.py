"""Atomic checkpoints with exact resume, in safetensors and JSON only (nothing unpickled).

A checkpoint is written into a hidden temporary folder, each file fsynced, then a COMPLETE marker
listing every file, its size and a content hash (SHA-256); only then is the folder renamed to
`step-NNNNNNNN`. A folder without a valid marker is never read, and a file whose content no longer
matches its hash is never loaded.

Two levels of checking, on purpose: `check_complete` (sizes, a `stat` per file) is what listing,
pruning and choosing a checkpoint use, since they run at every save over every kept checkpoint;
`verify_contents` (reads and hashes every file) runs only when a checkpoint is about to be loaded.
The hash guards against corruption (a flipped bit, a torn or overwritten file), not against an
attacker, who can rewrite the marker too; against hostile content the loader itself holds (only
safetensors and JSON are read).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from kdistill.core import adapters
from kdistill.core.errors import KdistillError

MARKER = "COMPLETE"
PREFIX = "step-"
# SHA-256: with the SHA extensions of current x86 and Arm CPUs OpenSSL hashes 1.2-1.5 GB/s per core,
# twice hashlib's BLAKE2b on the same machine (benchmarks/checkpoint_hash.py prints both)
HASH = "sha256"
_CHUNK = 4 << 20  # read and hash in 4 MiB pieces: memory stays flat however large the file


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def os_error_of(exc: Exception, path: Path) -> OSError:
    """safetensors reports a failed write (a full disk) as SafetensorError '... (os error 28)': the
    OSError it stands for, naming the file, so that the run ends with one line that says so."""
    found = re.search(r"os error (\d+)", str(exc))
    code = int(found.group(1)) if found else errno.EIO
    return OSError(code, os.strerror(code), str(path))


ALIASES = "kdistill.aliases"  # safetensors metadata: tensors stored once under another name (tied weights)


def _unique(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors that are the same memory (a tied embedding and output matrix) kept once: the rest
    become aliases {name: stored name}, so a checkpoint holds each weight a single time."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        key = (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen.setdefault(key, name)
            unique[name] = tensor
    return unique, aliases


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A file `_save_tensors` wrote, its aliases restored (the same tensor under each tied name)."""
    with safe_open(str(path), framework="pt") as handle:  # one open: the tensors and the header's metadata
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        aliases = json.loads((handle.metadata() or {}).get(ALIASES, "{}"))
    for name, stored in aliases.items():
        tensors[name] = tensors[stored]
    return tensors


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    unique, aliases = _unique(tensors)
    # clone: a view into a larger storage would otherwise write the whole storage
    try:
        save_file({k: v.detach().to("cpu").clone().contiguous() for k, v in unique.items()}, str(path),
                  metadata={ALIASES: json.dumps(aliases)} if aliases else None)
    except SafetensorError as exc:
        raise os_error_of(exc, path) from None
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def rng_state() -> dict[str, torch.Tensor]:
    version, internal, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(list(internal), dtype=torch.int64),
        "python_meta": torch.tensor([version, -1 if gauss is None else 1], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if gauss is None else gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda.{i}"] = s
    return state


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    version, has_gauss = state["python_meta"].tolist()
    gauss = state["python_gauss"].item() if has_gauss == 1 else None
    random.setstate((version, tuple(state["python"].tolist()), gauss))
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(k for k in state if k.startswith("cuda."))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)


def _optimizer_parts(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {"param_groups": sd["param_groups"], "state": {}}
    for idx, values in sd["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value
            else:
                plain["state"].setdefault(str(idx), {})[key] = value
    return tensors, plain


def _optimizer_state(tensors: Mapping[str, torch.Tensor], plain: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    for idx, values in plain["state"].items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": plain["param_groups"]}


def save_checkpoint(root: Path, step: int, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer,
                    state: Mapping[str, Any], keep: int) -> Path:
    """Write checkpoint `step` atomically under `root` and prune all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # a LoRA student's checkpoint holds its adapters only: the base is rebuilt from the recipe at resume
    weights = {f"{name}.{k}": v for name, module in modules.items() for k, v in adapters.trained_state(module).items()}
    _save_tensors(weights, tmp / "model.safetensors")
    opt_tensors, opt_plain = _optimizer_parts(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    _write_bytes(tmp / "optimizer.json", json.dumps(opt_plain).encode())
    _save_tensors(rng_state(), tmp / "rng.safetensors")
    _write_bytes(tmp / "state.json", json.dumps(dict(state), indent=1).encode())
    mark_complete(tmp, step)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def file_digest(path: Path, algorithm: str = HASH) -> str:
    """The hex digest of `path`'s content, read in fixed pieces into one reused buffer."""
    digest = hashlib.new(algorithm)
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while n := handle.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _digests(folder: Path, names: list[str], algorithm: str) -> dict[str, str]:
    """Digests of several files at once: hashlib and file reads release the GIL, so threads overlap
    the model's and the optimizer's files (largest first, so the longest starts first)."""
    ordered = sorted(names, key=lambda n: -(folder / n).stat().st_size)
    workers = max(1, min(4, os.cpu_count() or 1, len(ordered)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = dict(zip(ordered, pool.map(lambda n: file_digest(folder / n, algorithm), ordered)))
    return {n: found[n] for n in names}


def mark_complete(folder: Path, step: int) -> None:
    """Write the COMPLETE marker listing every file under `folder` (recursively), its size and its
    content hash. The files are read back once after they were written and fsynced (usually from the
    page cache), in pieces, so hashing adds no memory however large the checkpoint."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.name != MARKER}
    digests = _digests(folder, list(files), HASH)
    _write_bytes(folder / MARKER, json.dumps({"step": step, "files": files, "hash": HASH, "digests": digests}).encode())
    _fsync_dir(folder)


def _marker(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The COMPLETE marker of `path`, checked for shape, or the reason it cannot be used."""
    marker = path / MARKER
    if not marker.is_file():
        return None, f"{marker.name} marker missing"
    try:
        value = json.loads(marker.read_text())
    except (ValueError, OSError):
        return None, f"{marker} is unreadable"
    files = value.get("files") if isinstance(value, dict) else None
    if not (isinstance(files, dict) and all(isinstance(n, str) and type(s) is int for n, s in files.items())):
        return None, f"{marker} is unreadable"
    if "digests" in value:
        digests = value["digests"]
        if not (isinstance(digests, dict) and digests.keys() == files.keys()
                and all(isinstance(d, str) for d in digests.values())):
            return None, f"{marker} is unreadable (its content hashes do not cover its files)"
        if value.get("hash") != HASH:
            return None, f"{marker} is unreadable (unknown hash {value.get('hash')!r})"
    return value, None


def check_complete(path: Path) -> str | None:
    """None when `path` is a complete checkpoint (every listed file there, at its size), else the
    reason it is not. Cheap (no file is read); `verify_contents` checks what the files hold."""
    marker, reason = _marker(path)
    if marker is None:
        return reason
    for name, size in marker["files"].items():
        f = path / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes, expected {size}"
    return None


def verify_contents(path: Path, rank: int = 0, world_size: int = 1) -> str | None:
    """None when every file of checkpoint `path` (or this rank's share, `rank::world_size`, so that
    DeepSpeed's processes split the reading) hashes to what its marker recorded, else one line naming
    the first file that does not. Call after `check_complete`.

    A marker without hashes was written by kdistill before they were recorded: such a checkpoint is
    accepted on its sizes alone, with a warning. Refusing it would strand every run in progress across
    the upgrade (its only way on would be --overwrite, losing the training so far), and what it loses
    is only what the old version never had; its next save writes a marker with hashes.
    """
    marker, reason = _marker(path)
    if marker is None:
        return reason
    if "digests" not in marker:
        if rank == 0:
            warnings.warn(f"{path}: written by an older kdistill without content hashes; only its file sizes "
                          "were checked", stacklevel=3)
        return None
    names = sorted(marker["digests"])[rank::world_size]
    try:
        found = _digests(path, names, marker["hash"])
    except OSError as exc:
        return f"{path}: cannot read the checkpoint: {type(exc).__name__}: {exc}"
    for name in names:
        if found[name] != marker["digests"][name]:
            return (f"{path / name}: its content does not match what was saved "
                    f"(its {marker['hash']} differs from the one in {MARKER})")
    return None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def interrupted_saves(root: Path) -> list[Path]:
    """Temporary folders of saves that never finished (the process died before the rename)."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(f".tmp-{PREFIX}"))


def latest_complete(root: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint, and the folders skipped with their reasons: interrupted
    saves and newer checkpoints that are incomplete."""
    skipped = [(p, "an interrupted save (never completed)") for p in interrupted_saves(root)]
    for path in reversed(list_checkpoints(root)):
        reason = check_complete(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older complete ones and interrupted saves.

    Incomplete `step-*` folders are left for a person to look at; they are never counted as kept,
    so the last complete checkpoint always survives.
    """
    complete = [p for p in list_checkpoints(root) if check_complete(p) is None]
    for path in complete[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)
    for path in interrupted_saves(root):
        if not _writer_alive(path):
            shutil.rmtree(path, ignore_errors=True)


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that writes `.tmp-...-PID` still runs (this one included): its folder stays."""
    pid = tmp.name.rpartition("-")[2]
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


_READ_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, SafetensorError)


def _read(path: Path, reader):
    """Run `reader(path)`; any failure becomes one error naming the file and the reason."""
    try:
        return reader(path)
    except _READ_ERRORS as exc:
        raise KdistillError(f"{path}: cannot restore the checkpoint: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def load_checkpoint(path: Path, modules: Mapping[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore modules, optimizer and RNG from `path`; returns the saved state mapping.

    Every file must first hash to what the marker recorded (a corrupt checkpoint is refused before
    anything is restored). Only safetensors and JSON are read, so a hostile file can fail to load but
    never run code.
    """
    reason = check_complete(path)
    if reason is not None:
        raise KdistillError(f"{path}: not a complete checkpoint ({reason})")
    reason = verify_contents(path)
    if reason is not None:
        raise KdistillError(reason)
    tensors = _load_tensors
    text = lambda p: json.loads(p.read_text())  # noqa: E731
    weights = _read(path / "model.safetensors", tensors)

    def restore_modules(p):
        for name, module in modules.items():
            prefix = f"{name}."
            adapters.load_trained_state(module, {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)})
    _read(path / "model.safetensors", restore_modules)
    opt_tensors = _read(path / "optimizer.safetensors", tensors)
    opt_plain = _read(path / "optimizer.json", text)
    _read(path / "optimizer.json", lambda p: optimizer.load_state_dict(_optimizer_state(opt_tensors, opt_plain)))
    rng = _read(path / "rng.safetensors", tensors)
    _read(path / "rng.safetensors", lambda p: set_rng_state(rng))
    return _read(path / "state.json", text)


def atomic_save_pretrained(model: Any, tokenizer: Any, target: Path) -> None:
    """`save_pretrained` (safetensors) into a temporary folder, then swap it into place."""
    tmp = target.with_name(f".tmp-{target.name}-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        if adapters.wrapper(model) is not None:  # a LoRA student: merged into a plain model, and the adapter beside it
            adapters.merged(model).save_pretrained(str(tmp), safe_serialization=True)
            adapters.save_adapter(model, tmp / adapters.ADAPTER_FOLDER)
        else:
            model.save_pretrained(str(tmp), safe_serialization=True)
    except SafetensorError as exc:
        raise os_error_of(exc, tmp) from None
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    _fsync_dir(tmp)
    old = target.with_name(f".old-{target.name}-{os.getpid()}")
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    if old.exists():
        shutil.rmtree(old)
