"""The store of the `cached` teacher: a teacher's top-k log-probabilities on disk (writer and reader).

Layout of a cache folder:

    manifest.json          what the cache was computed from and how (checked before use)
    index.safetensors      for every sequence key, its shard and row
    tokenizer/             the teacher's tokenizer, so a run from the cache needs no teacher files
    shard-00000.safetensors, ...   one per `shard_sequences` training sequences, in key order

Each shard holds, for its sequences (rows) and every position:

    keys      [n]          int64    the data source's sequence keys
    ids       [n, S, k]    uint8/uint16/int32, the smallest type the vocabulary fits
    q         [n, S, k]    uint8    log-probabilities, quantized between the row's max and min:
                                    lp = hi - q * (hi - lo) / 255
    hi, lo    [n, S]       float16  the largest and smallest of the k log-probabilities
    log_tail  [n, S]       float16  log of the probability of every token outside the top k

At k = 64 and a vocabulary under 65,536 that is 64*2 + 64 + 3*2 = 198 bytes per token. The error
of a stored log-probability is at most half a quantization step plus float16 rounding of hi and lo;
the writer measures the largest error it made and records it in the manifest. The reader
renormalizes the k + 1 bins (top k and tail) so they sum to one.

Shards are written to a temporary name, fsynced and renamed: an interrupted write resumes at the
first missing shard and yields the same files as a write in one go. Reading is memory-mapped
(safetensors), one row at a time; the cache is never loaded whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kdistill import ConfigError, SparseTargets

FORMAT = "kdistill-teacher-cache/1"
MANIFEST = "manifest.json"
INDEX = "index.safetensors"
LEVELS = 255

# manifest fields that must match between a cache and the run that uses it (or resumes writing it)
IDENTITY_FIELDS = ("format", "teacher", "tokenizer", "data_fingerprint", "k", "temperature", "shard_sequences",
                   "n_sequences", "seq_len", "vocab_size", "ids_dtype")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def ids_dtype(vocab_size: int) -> torch.dtype:
    """The smallest integer type that holds every token id."""
    if vocab_size <= 1 << 8:
        return torch.uint8
    if vocab_size <= 1 << 16:
        return torch.uint16
    return torch.int32


def vocab_digest(tokenizer) -> str:
    """A digest of the vocabulary itself (token -> id), not of its size."""
    items = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode()).hexdigest()[:16]


def top_k_targets(logits: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-k log-probabilities sorted high to low, their ids, log tail mass) of softmax(logits / T)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    top, ids = logp.topk(k, dim=-1)
    covered = torch.logsumexp(top.double(), dim=-1)
    # log(1 - exp(covered)); -inf when the top k hold everything
    tail = torch.where(covered < 0, torch.log(-torch.expm1(covered.clamp(max=-1e-300))), torch.full_like(covered, -math.inf))
    return top, ids, tail.float()


def quantize(top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """uint8 codes between each row's max (hi) and min (lo); hi and lo in float16."""
    floor = torch.finfo(torch.float16).min
    hi = top[..., 0].clamp(min=floor).half()
    lo = top[..., -1].clamp(min=floor).half()
    span = (hi.float() - lo.float()).clamp(min=1e-12).unsqueeze(-1)
    q = ((hi.float().unsqueeze(-1) - top.clamp(min=floor)) / span * LEVELS).round().clamp(0, LEVELS).to(torch.uint8)
    return q, hi, lo


def dequantize(q: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    hi, lo = hi.float().unsqueeze(-1), lo.float().unsqueeze(-1)
    return hi - q.float() * (hi - lo) / LEVELS


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=1))
    _fsync(tmp)
    os.replace(tmp, path)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{name} (cache {a.get(name)!r}, now {b.get(name)!r})" for name in IDENTITY_FIELDS if a.get(name) != b.get(name)]


# ------------------------------------------------------------------------------------ writing


def write_cache(teacher, data, folder: Path, *, k: int, temperature: float, shard_sequences: int, batch_size: int,
                device: torch.device, teacher_identity: dict[str, Any], overwrite: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Run `teacher` once over every training sequence of `data` and write the cache to `folder`.

    Resumes an interrupted write (same manifest identity) at the first missing shard.
    """
    from kdistill import Needs

    keys = data.train_keys()
    tokenizer = teacher.tokenizer
    vocab = teacher.model.get_output_embeddings().weight.shape[0]
    if k > vocab:
        raise ConfigError(f"teacher.options.k: {k} is more than the teacher's {vocab} tokens")
    seq_len = data.batch_for_keys(keys[:1]).input_ids.shape[1]
    manifest = {"format": FORMAT, "teacher": teacher_identity, "tokenizer": vocab_digest(tokenizer),
                "data_fingerprint": data.fingerprint(), "k": k, "temperature": temperature,
                "shard_sequences": shard_sequences, "n_sequences": len(keys), "seq_len": seq_len, "vocab_size": vocab,
                "ids_dtype": str(ids_dtype(vocab)).replace("torch.", ""), "complete": False}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        differ = _differences(old, manifest)
        if differ and not overwrite:
            raise ConfigError(f"teacher.options.path: {folder} holds a cache of something else: {'; '.join(differ)}; "
                              "pass --overwrite to replace it")
        if differ:
            shutil.rmtree(folder)
            folder.mkdir(parents=True)
        elif old.get("complete"):
            return old
    _write_json(path, manifest)
    tokenizer.save_pretrained(str(folder / "tokenizer"))

    n_shards = math.ceil(len(keys) / shard_sequences)
    done = sum(min(shard_sequences, len(keys) - i * shard_sequences) for i in range(n_shards) if (folder / shard_name(i)).exists())
    bar = _progress(progress, len(keys), done)
    for index in range(n_shards):
        target = folder / shard_name(index)
        if target.exists():
            continue
        shard_keys = keys[index * shard_sequences:(index + 1) * shard_sequences]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("ids", "q", "hi", "lo", "log_tail")}
        worst = 0.0
        for start in range(0, len(shard_keys), batch_size):
            batch = data.batch_for_keys(shard_keys[start:start + batch_size]).to(device)
            bar.update(batch.input_ids.shape[0])
            logits = _teacher_logits(teacher, batch, Needs)
            top, ids, tail = top_k_targets(logits, k, temperature)
            q, hi, lo = quantize(top)
            worst = max(worst, float((dequantize(q, hi, lo) - top).abs().max()))
            for name, value in (("ids", ids.to(ids_dtype(vocab))), ("q", q), ("hi", hi), ("lo", lo), ("log_tail", tail.half())):
                parts[name].append(value.cpu())
        tensors = {name: torch.cat(values) for name, values in parts.items()}
        tensors["keys"] = shard_keys.to(torch.int64).clone()
        tmp = folder / f".tmp-{target.name}"
        save_file(tensors, str(tmp), metadata={"max_abs_logprob_error": repr(worst)})
        _fsync(tmp)
        os.replace(tmp, target)
    bar.close()
    _write_index(folder, n_shards)
    stats = _stats(folder, n_shards, manifest)
    manifest.update(complete=True, **stats)
    _write_json(path, manifest)
    return manifest


def _write_index(folder: Path, n_shards: int) -> None:
    """index.safetensors: for every cached sequence key, its shard and row (what a reader looks up)."""
    keys, shards, rows = [], [], []
    for index in range(n_shards):
        with safe_open(str(folder / shard_name(index)), "pt") as handle:
            shard_keys = handle.get_tensor("keys")
        keys.append(shard_keys)
        shards.append(torch.full_like(shard_keys, index, dtype=torch.int32))
        rows.append(torch.arange(len(shard_keys), dtype=torch.int32))
    tmp = folder / f".tmp-{INDEX}"
    save_file({"keys": torch.cat(keys), "shard": torch.cat(shards), "row": torch.cat(rows)}, str(tmp))
    _fsync(tmp)
    os.replace(tmp, folder / INDEX)


def _teacher_logits(teacher, batch, needs_cls) -> torch.Tensor:
    """The teacher's logits for a batch: the cost the cache saves every later run."""
    out = teacher.outputs(batch, needs_cls(logits=True))
    return out.logits


def _stats(folder: Path, n_shards: int, manifest: dict[str, Any]) -> dict[str, Any]:
    worst, size = 0.0, 0
    for index in range(n_shards):
        path = folder / shard_name(index)
        size += path.stat().st_size
        with safe_open(str(path), "pt") as handle:
            worst = max(worst, float((handle.metadata() or {}).get("max_abs_logprob_error", "nan")))
    tokens = manifest["n_sequences"] * manifest["seq_len"]
    return {"tokens": tokens, "shard_bytes": size, "bytes_per_token": size / tokens, "max_abs_logprob_error": worst}


def _progress(enabled: bool, total: int, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="caching the teacher", unit="seq", disable=not enabled)


# ------------------------------------------------------------------------------------ reading


class TeacherCache:
    """Serves a written cache row by row from memory-mapped shards."""

    def __init__(self, folder: Path, field: str = "teacher.options.path"):
        self.folder = Path(folder)
        path = self.folder / MANIFEST
        if not path.is_file():
            raise ConfigError(f"{field}: no teacher cache at {self.folder} (write it with: kdistill cache-teacher RECIPE)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ConfigError(f"{field}: {path} is not a kdistill teacher cache of format {FORMAT}")
        if not self.manifest.get("complete"):
            raise ConfigError(f"{field}: the teacher cache at {self.folder} is incomplete (an interrupted write); "
                              "run kdistill cache-teacher RECIPE again to finish it")
        n_shards = math.ceil(self.manifest["n_sequences"] / self.manifest["shard_sequences"])
        self._handles = []
        for index in range(n_shards):
            shard = self.folder / shard_name(index)
            if not shard.is_file():
                raise ConfigError(f"{field}: {shard} is missing")
            self._handles.append(safe_open(str(shard), "pt"))
        if not (self.folder / INDEX).is_file():
            raise ConfigError(f"{field}: {self.folder / INDEX} is missing")
        with safe_open(str(self.folder / INDEX), "pt") as handle:
            keys, shards, rows = (handle.get_tensor(name).tolist() for name in ("keys", "shard", "row"))
        self._where: dict[int, tuple[int, int]] = {k: (s, r) for k, s, r in zip(keys, shards, rows)}
        self.temperature = float(self.manifest["temperature"])

    def check(self, expected: dict[str, Any], field: str = "teacher.options.path") -> None:
        """Refuse a cache computed from other data, tokenizer, k or temperature, naming the fields."""
        differ = [f"{name} (cache {self.manifest.get(name)!r}, this run {value!r})"
                  for name, value in expected.items() if self.manifest.get(name) != value]
        if differ:
            raise ConfigError(f"{field}: the teacher cache at {self.folder} does not fit this run: {'; '.join(differ)}")

    def lookup(self, keys: torch.Tensor) -> SparseTargets:
        rows = []
        for key in keys.tolist():
            where = self._where.get(int(key))
            if where is None:
                raise KeyError(f"sequence {key} is not in the teacher cache at {self.folder}")
            rows.append(where)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("ids", "q", "hi", "lo", "log_tail")}
        for shard, row in rows:
            handle = self._handles[shard]
            for name in parts:
                parts[name].append(handle.get_slice(name)[row:row + 1])
        t = {name: torch.cat(values) for name, values in parts.items()}
        top = dequantize(t["q"], t["hi"], t["lo"])
        bins = torch.cat([top, t["log_tail"].float().unsqueeze(-1)], dim=-1)
        bins = bins - torch.logsumexp(bins, dim=-1, keepdim=True)
        return SparseTargets(ids=t["ids"].long(), logprobs=bins[..., :-1].contiguous(), log_tail=bins[..., -1].contiguous(),
                             temperature=self.temperature)

    def __iter__(self) -> Iterator[int]:
        return iter(self._where)
