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

At k = 64 and a vocabulary under 65,536 that is 64*2 + 64 + 3*2 = 198 bytes per token.

A cache of `mode: sampled` (SAMPLED_ENCODING) holds, instead of the top k, k tokens drawn from
softmax(logits / T) (random-sampling KD, Anshumann et al., ACL 2025), by systematic sampling (`sampled_draws`):

    packed_ids [n, S, b]   uint8    the k tokens drawn, in id order (a token drawn twice is there twice), Elias-Fano
                                    coded (`pack_sorted_ids`): b = ceil((k L + k + floor((V - 1) / 2^L)) / 8) bytes,
                                    L = floor(log2(V / k)) low bits a draw, the rest in unary
    entropy    [n, S]      float16  the entropy of softmax(logits / T)

The targets are the draws' frequencies: an unbiased estimate of the teacher's distribution, so the expected
gradient of forward KL (the cross-entropy to the teacher) is the full one, at any k; no tail bin. With the
entropy, forward KL's value is an unbiased estimate of the full KL too (not the KL to the draws). Sorted ids
from a vocabulary of V cost about 2 + log2(V / k) bits each instead of 16: at V = 49,152, 92 bytes hold 64
draws (94 a position with the entropy) where 2 bytes an id held 48. The draws are seeded per shard, so a
resumed write gives the same files. Caches of the earlier sampled encodings (the draws as 2-byte ids, 3;
distinct ids and a byte of count each, of independent draws, with or without the entropy, 2 and 1) are still
read.

The top-k per-position encoding (ENCODING; `encode_top_k`, `decode_top_k`) is also how `kdistill generate` stores the teacher's
top-k for the tokens it wrote (generator option `top_k`). The error
of a stored log-probability is at most half a quantization step plus float16 rounding of hi and lo;
the writer measures the largest error it made and records it in the manifest. The reader
renormalizes the k + 1 bins (top k and tail) so they sum to one.

Shards are written to a temporary name, fsynced and renamed: an interrupted write resumes at the
first missing shard and yields the same files as a write in one go. Reading is memory-mapped
(safetensors), one row at a time; the cache is never loaded whole.

Integrity (format 2): the manifest records the size and sha256 of every shard and of the index. A
reader checks sizes, headers and the index when it opens the cache, and each shard's hash the first
time a lookup reads from it; a file that differs is refused in one line naming it. A writer keeps the
shards whose hash still matches and recomputes the others. The teacher is identified by its weights
(`weights_digest`), not by its path.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

import kdistill
from kdistill import ConfigError, KdistillError, Needs, SparseTargets

FORMAT = "kdistill-teacher-cache/2"  # 2: sha256 of every shard and of the index; the teacher known by its weights
OLD_FORMATS = ("kdistill-teacher-cache/1",)  # no content hashes, the teacher known by its path: refused
MANIFEST = "manifest.json"
INDEX = "index.safetensors"
LEVELS = 255
ENCODING = "kdistill-top-k/1"  # per position: ids, q (uint8), hi, lo, log_tail (float16), as below
SAMPLED_ENCODING = "kdistill-sampled/4"  # per position: k systematic draws Elias-Fano coded, entropy (float16)
# still read: the draws as plain ids (3); distinct ids and uint8 counts of k independent draws, with (2) and
# without (1) the entropy
THIRD_SAMPLED_ENCODING = "kdistill-sampled/3"
SECOND_SAMPLED_ENCODING, FIRST_SAMPLED_ENCODING = "kdistill-sampled/2", "kdistill-sampled/1"
FIELDS = {ENCODING: ("ids", "q", "hi", "lo", "log_tail"), SAMPLED_ENCODING: ("packed_ids", "entropy"),
          THIRD_SAMPLED_ENCODING: ("ids", "entropy"), SECOND_SAMPLED_ENCODING: ("ids", "counts", "entropy"),
          FIRST_SAMPLED_ENCODING: ("ids", "counts")}
ENCODINGS = {"top-k": ENCODING, "sampled": SAMPLED_ENCODING}  # what the writer stores in each mode

# manifest fields that must match between a cache and the run that uses it (or resumes writing it)
IDENTITY_FIELDS = ("format", "teacher", "tokenizer", "data_fingerprint", "mode", "encoding", "k", "temperature", "seed",
                   "shard_sequences", "n_sequences", "seq_len", "vocab_size", "ids_dtype")
# what a manifest written before a field existed means by its absence
IDENTITY_DEFAULTS: dict[str, Any] = {"mode": "top-k", "seed": None}


def identity(manifest: dict[str, Any], name: str) -> Any:
    """A manifest's identity field, with the meaning of its absence in older caches."""
    if name == "encoding" and name not in manifest:  # written before the sampled encoding stored the entropy
        return {"top-k": ENCODING, "sampled": FIRST_SAMPLED_ENCODING}.get(identity(manifest, "mode"))
    return manifest.get(name, IDENTITY_DEFAULTS.get(name))


CHUNK = 4 << 20  # bytes per read when hashing a file
TENSOR_SAMPLE = 4096  # bytes of each teacher tensor hashed at its start, middle and end
GGUF_SAMPLES, GGUF_SAMPLE = 64, 1 << 16  # a GGUF teacher: 64 evenly spaced 64 KiB reads
REBUILD = "rebuild it with kdistill cache-teacher RECIPE"


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
    """(top-k log-probabilities sorted high to low, their ids, log tail mass) of softmax(logits / T).

    The top k of the logits are those of the log-probabilities, so only the normalizer needs the whole
    vocabulary, and no full-vocabulary log-probability tensor is made (the writer's cost beside the forward)."""
    top, ids = logits.topk(k, dim=-1)
    top = top.float() / temperature - log_normalizer(logits, temperature).unsqueeze(-1)
    covered = torch.logsumexp(top.double(), dim=-1)
    # log(1 - exp(covered)); -inf when the top k hold everything
    tail = torch.where(covered < 0, torch.log(-torch.expm1(covered.clamp(max=-1e-300))), torch.full_like(covered, -math.inf))
    return top, ids, tail.float()


def log_normalizer(logits: torch.Tensor, temperature: float, chunk_elements: int = 1 << 21) -> torch.Tensor:
    """logsumexp(logits / T) over the last dimension in float32, a few rows at a time: the temporaries stay a
    few MB (in cache, their memory reused) instead of full-vocabulary tensors allocated for every batch."""
    flat = logits.reshape(-1, logits.shape[-1])
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=logits.device)
    rows = max(1, chunk_elements // max(1, flat.shape[1]))
    for start in range(0, flat.shape[0], rows):
        scaled = flat[start:start + rows].float() / temperature
        peak = scaled.amax(dim=-1, keepdim=True)
        out[start:start + rows] = scaled.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))
    return out.reshape(logits.shape[:-1])


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


def encode_top_k(logits: torch.Tensor, k: int, temperature: float, vocab_size: int) -> tuple[dict[str, torch.Tensor], float]:
    """The stored form (ENCODING) of the top-k log-probabilities of softmax(logits / T) at every position of
    `logits` [..., V]: ids (the smallest type the vocabulary fits), q, hi, lo and log_tail; and the largest
    error of a stored log-probability."""
    top, ids, tail = top_k_targets(logits, k, temperature)
    return encode_targets(top, ids, tail, vocab_size)


def encode_targets(top: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor, vocab_size: int) -> tuple[dict[str, torch.Tensor], float]:
    """The stored form of top-k targets given as they are (sorted high to low; a served teacher's)."""
    q, hi, lo = quantize(top)
    worst = float((dequantize(q, hi, lo) - top).abs().max()) if top.numel() else 0.0
    return {"ids": ids.to(ids_dtype(vocab_size)), "q": q, "hi": hi, "lo": lo, "log_tail": tail.half()}, worst


def decode_top_k(ids: torch.Tensor, q: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor, log_tail: torch.Tensor,
                 temperature: float) -> SparseTargets:
    """Targets from their stored form: the k log-probabilities and the tail renormalized to sum to one."""
    bins = torch.cat([dequantize(q, hi, lo), log_tail.float().unsqueeze(-1)], dim=-1)
    bins = bins - torch.logsumexp(bins, dim=-1, keepdim=True)
    return SparseTargets(ids=ids.long(), logprobs=bins[..., :-1].contiguous(), log_tail=bins[..., -1].contiguous(),
                         temperature=temperature)


def cumulative_weights(x: torch.Tensor, temperature: float, shifted: torch.Tensor,
                       weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cumulative sum of exp((x - max) / T) along each row of x [n, V] float32, in `weights`, whose last column
    is the normalizer; entropy of softmax(x / T) [n]): one exponentiation and no division over the vocabulary,
    into the buffers `shifted` and `weights` [n, V] (reused across chunks: a fresh tensor each time costs more
    than the arithmetic)."""
    torch.sub(x, x.amax(dim=-1, keepdim=True), out=shifted)
    if temperature != 1.0:
        shifted.div_(temperature)
    torch.exp(shifted, out=weights)
    dot = torch.linalg.vecdot(weights, shifted)  # sum e (x - max) / T
    if torch.isnan(dot).any():  # -inf logits (0 * -inf): they carry no mass
        dot = torch.linalg.vecdot(weights, shifted.clamp_(min=torch.finfo(torch.float32).min))
    cumulative = weights.cumsum_(-1)
    total = cumulative[:, -1]
    return cumulative, total.log() - dot / total  # -sum p log p with p = e / total


def sampled_draws(logits: torch.Tensor, k: int, temperature: float, generator: torch.Generator | None = None,
                  chunk_elements: int = 1 << 21) -> tuple[torch.Tensor, torch.Tensor]:
    """(draws [..., k] in id order, entropy [...]): k tokens drawn from softmax(logits / T) by systematic
    sampling (one uniform u per position; the tokens where the cumulative probability passes (u + i) / k,
    i < k), and the distribution's entropy. Each token is drawn floor(k p) or ceil(k p) times, k p on average
    (unbiased, like k independent draws) with less variance: at most 1/4 a token against k p (1 - p), half as
    much summed over the vocabulary at k = 32, T = 1 on the quickstart teacher. A few rows at a time, so no
    full-vocabulary temporary is made."""
    shape, vocab = logits.shape[:-1], logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    rows = flat.shape[0]
    draws = torch.zeros(rows, k, dtype=torch.long, device=logits.device)
    entropy = torch.zeros(rows, dtype=torch.float32, device=logits.device)
    offsets = torch.rand(rows, 1, generator=generator, dtype=torch.float64,
                         device=generator.device if generator is not None else logits.device).to(logits.device)
    steps = torch.arange(k, dtype=torch.float64, device=logits.device)
    step = max(1, chunk_elements // max(1, vocab))
    shifted = torch.empty(min(step, rows), vocab, dtype=torch.float32, device=logits.device)
    weights = torch.empty_like(shifted)
    for start in range(0, rows, step):
        x = flat[start:start + step].float()
        # float32: a token's share of the cumulative sum is off by rounding (about 1e-7 of the total), far below
        # 1 / k; float64 would cost more than the sampling saves
        cumulative, entropy[start:start + step] = cumulative_weights(x, temperature, shifted[:len(x)], weights[:len(x)])
        total = cumulative[:, -1:]
        points = ((offsets[start:start + step] + steps) / k * total).float()
        points = torch.minimum(points, torch.nextafter(total, torch.zeros_like(total)))  # rounding: never past the end
        draws[start:start + step] = torch.searchsorted(cumulative, points, right=True).clamp_(max=vocab - 1)
    return draws.reshape(*shape, k), entropy.reshape(shape)


def counted(draws: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, counts) [..., k] of draws [..., k] in id order: the distinct tokens drawn with how often each was
    drawn, then, in the slots left, the smallest ids not drawn (count 0), so that every position has k
    distinct ids (what the losses' scatters need)."""
    shape, k = draws.shape[:-1], draws.shape[-1]
    flat = draws.reshape(-1, k).long()
    rows = flat.shape[0]
    first = torch.ones_like(flat, dtype=torch.bool)
    first[:, 1:] = flat[:, 1:] != flat[:, :-1]
    slot = first.long().cumsum(-1) - 1  # each draw's distinct token's slot
    ids = torch.zeros(rows, k + 1, dtype=torch.long, device=draws.device)  # the last column takes what is dropped
    counts = torch.zeros(rows, k + 1, dtype=torch.long, device=draws.device)
    ids.scatter_(1, slot, flat)
    counts.scatter_add_(1, slot, torch.ones_like(flat))
    distinct = slot[:, -1:] + 1
    candidates = torch.arange(min(vocab_size, 2 * k), device=draws.device).expand(rows, -1)  # >= k not drawn
    fresh = ~(candidates.unsqueeze(-1) == flat.unsqueeze(-2)).any(-1)
    place = distinct + fresh.long().cumsum(-1) - 1
    place = torch.where(fresh & (place < k), place, torch.full_like(place, k))
    ids.scatter_(1, place, candidates)
    return ids[:, :k].reshape(*shape, k), counts[:, :k].reshape(*shape, k)


def elias_fano_layout(k: int, vocab_size: int) -> tuple[int, int, int]:
    """(low bits a draw L, bits of the unary part, bytes a position) of k sorted ids below `vocab_size`."""
    low = max(0, (vocab_size // k).bit_length() - 1)  # floor(log2(V / k))
    unary = k + ((vocab_size - 1) >> low)  # the last id's bit is at most at (V - 1) >> L + k - 1
    return low, unary, (k * low + unary + 7) // 8


def pack_sorted_ids(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """uint8 [..., b]: each row of ids [..., k] (non-decreasing, below `vocab_size`) Elias-Fano coded: the L low
    bits of every id, then a bit set at (id >> L) + i for the i-th id; a fixed number of bytes a row, so the
    shards stay plain tensors and a row is read by its index."""
    shape, k = ids.shape[:-1], ids.shape[-1]
    low, unary, size = elias_fano_layout(k, vocab_size)
    flat = ids.reshape(-1, k).long()
    rows = flat.shape[0]
    bits = torch.zeros(rows, size * 8, dtype=torch.uint8, device=ids.device)
    if low:
        shifts = torch.arange(low, device=ids.device)
        bits[:, :k * low] = ((flat.unsqueeze(-1) >> shifts) & 1).reshape(rows, k * low).to(torch.uint8)
    ones = k * low + (flat >> low) + torch.arange(k, device=ids.device)
    bits.scatter_(1, ones, 1)
    weights = (1 << torch.arange(8, device=ids.device)).to(torch.uint8)
    return (bits.view(rows, size, 8) * weights).sum(-1, dtype=torch.uint8).reshape(*shape, size)


def unpack_sorted_ids(packed: torch.Tensor, k: int, vocab_size: int) -> torch.Tensor:
    """The ids [..., k] (int64, in id order) of rows packed by `pack_sorted_ids`."""
    shape = packed.shape[:-1]
    low, unary, size = elias_fano_layout(k, vocab_size)
    flat = packed.reshape(-1, size)
    rows = flat.shape[0]
    bits = (flat.unsqueeze(-1) >> torch.arange(8, device=packed.device, dtype=torch.uint8)) & 1
    bits = bits.reshape(rows, size * 8)
    where = bits[:, k * low:k * low + unary].nonzero()[:, 1]  # row by row, in order
    if where.numel() != rows * k:
        raise ValueError(f"{where.numel()} ids where {rows * k} were packed")
    ids = (where.view(rows, k) - torch.arange(k, device=packed.device)) << low
    if low:
        ids |= (bits[:, :k * low].view(rows, k, low).long() << torch.arange(low, device=packed.device)).sum(-1)
    return ids.reshape(*shape, k)


def encode_sampled(logits: torch.Tensor, k: int, temperature: float, vocab_size: int,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The stored form (SAMPLED_ENCODING) of k draws from softmax(logits / T) at every position."""
    draws, entropy = sampled_draws(logits, k, temperature, generator)
    return {"packed_ids": pack_sorted_ids(draws, vocab_size), "entropy": entropy.half()}


def decode_sampled(draws: torch.Tensor, temperature: float, vocab_size: int,
                   entropy: torch.Tensor | None = None) -> SparseTargets:
    """Targets from k draws [..., k] in id order: the draws' frequencies over distinct ids."""
    return targets_from_counts(*counted(draws, vocab_size), temperature, entropy)


def targets_from_counts(ids: torch.Tensor, counts: torch.Tensor, temperature: float,
                        entropy: torch.Tensor | None = None) -> SparseTargets:
    """counts / k as log-probabilities (-inf for the count-0 fillers), no tail; the teacher's entropy where
    stored (the earlier sampled encodings store ids and counts as they are)."""
    counts = counts.float()
    logprobs = (counts / counts.sum(-1, keepdim=True).clamp(min=1)).log()
    return SparseTargets(ids=ids.long(), logprobs=logprobs, log_tail=torch.full(counts.shape[:-1], -math.inf),
                         temperature=temperature, kind="sampled", entropy=None if entropy is None else entropy.float())


def check_top_k_losses(losses, temperature: float, *, teacher: str, targets: str, at: str, field: str,
                       mode: str = "top-k") -> None:
    """The losses a teacher of stored top-k targets can serve: logit losses defined on them, at the temperature
    the targets were computed at. Messages name the teacher (`teacher`: "a cached teacher"), its targets
    (`targets`: "the cached teacher's targets"; `at`: "the cached teacher's is") and the `field` that sets it.
    Sampled targets (`mode`) serve only losses whose expected gradient stays the full one on them (forward KL)."""
    for name, _, loss in losses:
        if mode == "sampled" and isinstance(loss, kdistill.LogitLoss) and loss.needs_teacher and \
                not loss.supports_sampled:
            raise ConfigError(f"losses: '{name}' is not unbiased on sampled targets (it needs the teacher's "
                              f"probability of the student's own tokens); with {teacher} of mode sampled use "
                              "forward-kl, or mode: top-k")
        if isinstance(loss, kdistill.FeatureLoss):
            raise ConfigError(f"losses: '{name}' needs the teacher's hidden states or attention; {teacher} has only "
                              "top-k log-probabilities")
        if not (isinstance(loss, kdistill.LogitLoss) and loss.needs_teacher):
            continue
        if not loss.supports_sparse:
            raise ConfigError(f"losses: '{name}' is not defined on top-k targets; with {teacher} use forward-kl, "
                              "reverse-kl, jsd or skew-kl")
        if not isinstance(loss.options, kdistill.TemperatureOptions):
            continue
        t = loss.options.temperature
        if isinstance(t, kdistill.Schedule) and t.schedule != "constant":
            raise ConfigError(f"losses: '{name}' schedules its temperature but {targets} are at one temperature, "
                              f"{temperature} ({field})")
        t = kdistill.value_at(t, 0, 1)
        if abs(t - temperature) > 1e-9 * t:
            raise ConfigError(f"losses: '{name}' uses temperature {t} but {at} {temperature} ({field})")


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=1))
    _fsync(tmp)
    os.replace(tmp, path)


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{name} (cache {identity(a, name)!r}, now {identity(b, name)!r})" for name in IDENTITY_FIELDS
            if identity(a, name) != identity(b, name)]


# ------------------------------------------------------------------------------------ integrity


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(buffer)
            if not n:
                break
            digest.update(view[:n])
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What the manifest keeps of a cache file: its size and content hash."""
    return {"bytes": path.stat().st_size, "sha256": file_digest(path)}


def damaged(path: Path, reason: str) -> KdistillError:
    return KdistillError(f"teacher cache: {path}: {reason}; {REBUILD}")


def _sample(handle, digest, start: int, length: int, size: int) -> None:
    """Hash `length` bytes from `start`: whole when short, else at its start, middle and end."""
    spans = [(start, length)] if length <= 3 * size else \
        [(start, size), (start + (length - size) // 2, size), (start + length - size, size)]
    for offset, count in spans:
        handle.seek(offset)
        digest.update(handle.read(count))


def _safetensors_identity(path: Path, digest, field: str) -> None:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n} in a file of {size} bytes")
            header_bytes = handle.read(n)
            header = json.loads(header_bytes)
            spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1])) for k, v in header.items()
                           if k != "__metadata__")
            if any(not 0 <= a <= b <= size - 8 - n for a, b in spans):
                raise ValueError("tensor data outside the file")
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise ConfigError(f"{field}: {path} is not a safetensors file ({exc})") from None
        digest.update(f"{path.name}\0{size}\0".encode())
        digest.update(header_bytes)
        for a, b in spans:
            _sample(handle, digest, 8 + n + a, b - a, TENSOR_SAMPLE)


def _canonical_json(path: Path, drop: tuple[str, ...], field: str) -> bytes:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{field}: {path} is not readable JSON ({exc})") from None
    if isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in drop}
    return json.dumps(value, sort_keys=True).encode()


def weights_digest(model: Path, gguf_file: str | None = None, field: str = "teacher.options.source.model") -> str:
    """The teacher's identity from its files, not its path, reading only a little of each.

    A safetensors folder: every `*.safetensors` file's name, size and header, 4 KiB at the start, middle
    and end of every tensor's data (a whole tensor when it is under 12 KiB), and `config.json` (without
    `transformers_version` and `_name_or_path`) and the weight index. Headers and sizes alone are not
    enough: a model re-initialised or retrained in place has the same shapes, so the same headers. A GGUF
    file: its size and 64 evenly spaced 64 KiB samples.
    """
    model = Path(model)
    if gguf_file is None and model.suffix == ".gguf":
        model, gguf_file = model.parent, model.name
    target = model / gguf_file if gguf_file else model
    if not target.exists():
        raise ConfigError(f"{field}: {target} does not exist, so the cache cannot be checked against its teacher "
                          "(drop teacher.options.source to use the cache without it)")
    digest = hashlib.sha256()
    if gguf_file:
        size = target.stat().st_size
        digest.update(f"gguf\0{size}\0".encode())
        with open(target, "rb") as handle:
            for i in range(GGUF_SAMPLES):
                handle.seek(max(0, (size - GGUF_SAMPLE) * i // (GGUF_SAMPLES - 1)))
                digest.update(handle.read(GGUF_SAMPLE))
        return digest.hexdigest()[:32]
    files = sorted(target.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{field}: {target} holds no *.safetensors weights")
    for path in files:
        _safetensors_identity(path, digest, field)
    for name, drop in (("config.json", ("transformers_version", "_name_or_path")), ("model.safetensors.index.json", ())):
        if (target / name).is_file():
            digest.update(name.encode() + b"\0" + _canonical_json(target / name, drop, field))
    return digest.hexdigest()[:32]


# ------------------------------------------------------------------------------------ writing


def write_cache(teacher, data, folder: Path, *, k: int, temperature: float, shard_sequences: int, batch_size: int,
                device: torch.device, teacher_identity: dict[str, Any], overwrite: bool = False,
                progress: bool = True, tokenizer: Any = None, mode: str = "top-k", seed: int = 0) -> dict[str, Any]:
    """Run `teacher` once over every training sequence of `data` and write the cache to `folder`: a teacher
    with a model gives logits (their top k, or k draws seeded by `seed` and the shard, are taken here), one
    without (served) its top-k targets at `temperature` as they are (`tokenizer`: then the student's, which
    the server's was checked against).

    Resumes an interrupted write (same manifest identity) at the first missing shard.
    """
    keys = data.train_keys()
    tokenizer = tokenizer if tokenizer is not None else teacher.tokenizer
    vocab = teacher.model.get_output_embeddings().weight.shape[0] if teacher.model is not None else len(tokenizer)
    if k > vocab:
        raise ConfigError(f"teacher.options.k: {k} is more than the teacher's {vocab} tokens")
    if mode == "sampled" and teacher.model is None:
        raise ConfigError("teacher.options.mode: sampled draws from the teacher's whole distribution; a served teacher "
                          "gives its top k only (use mode: top-k)")
    seq_len = data.batch_for_keys(keys[:1]).input_ids.shape[1]
    manifest = {"format": FORMAT, "teacher": teacher_identity, "tokenizer": vocab_digest(tokenizer),
                "data_fingerprint": data.fingerprint(), "mode": mode, "encoding": ENCODINGS[mode], "k": k,
                "temperature": temperature,
                "seed": seed if mode == "sampled" else None,
                "shard_sequences": shard_sequences, "n_sequences": len(keys), "seq_len": seq_len, "vocab_size": vocab,
                "ids_dtype": str(ids_dtype(vocab)).replace("torch.", ""), "complete": False}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MANIFEST
    n_shards = math.ceil(len(keys) / shard_sequences)
    kept: dict[str, dict[str, Any]] = {}  # shards already written whose size and hash still match the manifest
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        old = old if isinstance(old, dict) else {}
        differ = _differences(old, manifest)
        if differ and not overwrite:
            raise ConfigError(f"teacher.options.path: {folder} holds a cache of something else: {'; '.join(differ)}; "
                              "pass --overwrite to replace it")
        if differ:
            shutil.rmtree(folder)
            folder.mkdir(parents=True)
        else:
            records = old.get("shards")
            kept = _intact_shards(folder, n_shards, records if isinstance(records, dict) else {})
            if old.get("complete") and len(kept) == n_shards and _matches(folder / INDEX, old.get("index")):
                return old
    manifest["shards"] = dict(kept)
    _write_json(path, manifest)
    tokenizer.save_pretrained(str(folder / "tokenizer"))

    done = sum(min(shard_sequences, len(keys) - i * shard_sequences) for i in range(n_shards) if shard_name(i) in kept)
    bar = _progress(progress, len(keys), done)
    records: dict[str, dict[str, Any]] = {}
    for index in range(n_shards):
        target = folder / shard_name(index)
        if target.name in kept:
            records[target.name] = kept[target.name]
            continue
        target.unlink(missing_ok=True)  # missing, changed since it was written, or written but never recorded
        shard_keys = keys[index * shard_sequences:(index + 1) * shard_sequences]
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in FIELDS[ENCODINGS[mode]]}
        worst = 0.0
        generator = torch.Generator(device).manual_seed(seed * 1_000_003 + index) if mode == "sampled" else None
        for start in range(0, len(shard_keys), batch_size):
            batch = data.batch_for_keys(shard_keys[start:start + batch_size]).to(device)
            bar.update(batch.input_ids.shape[0])
            # encoded here, not in a second thread beside the next forward: on 2 cores that was slower
            # (0.79x against 0.94x the bare forward, docs/teachers.md)
            encoded, error = _encoded(teacher.outputs(batch, Needs(logits=True)), k, temperature, vocab, generator)
            worst = max(worst, error)
            for name, value in encoded.items():
                parts[name].append(value.cpu())
        tensors = {name: torch.cat(values) for name, values in parts.items()}
        tensors["keys"] = shard_keys.to(torch.int64).clone()
        tmp = folder / f".tmp-{target.name}"
        save_file(tensors, str(tmp), metadata={"max_abs_logprob_error": repr(worst)})
        _fsync(tmp)
        records[target.name] = file_record(tmp)
        os.replace(tmp, target)
        manifest["shards"] = {**kept, **records}
        _write_json(path, manifest)  # a resumed write keeps this shard
    bar.close()
    manifest["shards"] = records  # in shard order
    _write_index(folder, n_shards)
    manifest["index"] = file_record(folder / INDEX)
    stats = _stats(folder, n_shards, manifest)
    manifest.update(complete=True, **stats)
    _write_json(path, manifest)
    return manifest


def _matches(path: Path, record: Any) -> bool:
    """Whether the file exists with the size and content hash of its manifest record."""
    return (isinstance(record, dict) and path.is_file() and path.stat().st_size == record.get("bytes")
            and file_digest(path) == record.get("sha256"))


def _intact_shards(folder: Path, n_shards: int, records: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {shard_name(i): records[shard_name(i)] for i in range(n_shards)
            if _matches(folder / shard_name(i), records.get(shard_name(i)))}


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


def _encoded(out, k: int, temperature: float, vocab: int,
             generator: torch.Generator | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """The teacher's outputs for a batch, encoded (the cost the cache saves every later run); k draws when a
    `generator` is given, else the top k."""
    if out.sparse is None and generator is not None:
        return encode_sampled(out.logits, k, temperature, vocab, generator), 0.0
    if out.sparse is None:
        return encode_top_k(out.logits, k, temperature, vocab)
    sparse = out.sparse
    if sparse.ids.shape[-1] != k or sparse.temperature != temperature:
        raise ConfigError(f"teacher: targets of k={sparse.ids.shape[-1]} at T={sparse.temperature}, not k={k} at T={temperature}")
    return encode_targets(sparse.logprobs, sparse.ids, sparse.log_tail, vocab)


def _stats(folder: Path, n_shards: int, manifest: dict[str, Any]) -> dict[str, Any]:
    worst, size = 0.0, 0
    for index in range(n_shards):
        path = folder / shard_name(index)
        size += path.stat().st_size
        with safe_open(str(path), "pt") as handle:
            worst = max(worst, float((handle.metadata() or {}).get("max_abs_logprob_error", "nan")))
    tokens = manifest["n_sequences"] * manifest["seq_len"]
    return {"tokens": tokens, "shard_bytes": size, "bytes_per_token": size / tokens, "max_abs_logprob_error": worst}


def _first_line(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


def file_hash(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


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
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError as exc:
            raise damaged(path, f"not readable JSON ({exc})") from None
        version = self.manifest.get("format") if isinstance(self.manifest, dict) else None
        if version in OLD_FORMATS:
            raise ConfigError(f"{field}: the teacher cache at {self.folder} has the older format {version} (no content "
                              f"hashes; its teacher known by path, not weights); {REBUILD} --overwrite")
        if version != FORMAT:
            raise ConfigError(f"{field}: {path} is not a kdistill teacher cache of format {FORMAT}")
        if not self.manifest.get("complete"):
            raise ConfigError(f"{field}: the teacher cache at {self.folder} is incomplete (an interrupted write); "
                              "run kdistill cache-teacher RECIPE again to finish it")
        try:
            n_shards = math.ceil(self.manifest["n_sequences"] / self.manifest["shard_sequences"])
            self.temperature = float(self.manifest["temperature"])
            self.mode = identity(self.manifest, "mode")
            self._fields = FIELDS[identity(self.manifest, "encoding")]
            self.vocab_size = int(self.manifest["vocab_size"])
            self.k = int(self.manifest["k"])
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise damaged(path, f"not a complete manifest ({_first_line(exc)})") from None
        records = self.manifest.get("shards") or {}
        if not isinstance(records, dict):
            raise damaged(path, "not a complete manifest (its shards are not a mapping)")
        self._handles = []
        for index in range(n_shards):
            shard = self.folder / shard_name(index)
            self._handles.append(self._open(shard, records.get(shard.name)))
        self._verified: set[int] = set()  # shards whose content hash has been checked (on first use)
        index_path = self.folder / INDEX
        self._present(index_path, self.manifest.get("index"))
        content = index_path.read_bytes()  # small (16 bytes a sequence): hashed and parsed from one read
        if file_hash(content) != self.manifest["index"]["sha256"]:
            raise damaged(index_path, "content does not match the manifest (changed after it was written)")
        try:
            index = load_safetensors_bytes(content)
            keys, shards, rows = (index[name].tolist() for name in ("keys", "shard", "row"))
        except (SafetensorError, KeyError, ValueError) as exc:
            raise damaged(index_path, f"not a readable index ({_first_line(exc)})") from None
        self._where: dict[int, tuple[int, int]] = {k: (s, r) for k, s, r in zip(keys, shards, rows)}

    @staticmethod
    def _present(path: Path, record: Any) -> None:
        """The file exists, its manifest record too, and its size is the recorded one (truncated: refused here)."""
        if not path.is_file():
            raise damaged(path, "missing")
        if not isinstance(record, dict) or "sha256" not in record or "bytes" not in record:
            raise damaged(path, "has no content hash in the manifest")
        size = path.stat().st_size
        if size != record["bytes"]:
            raise damaged(path, f"{size} bytes where the manifest says {record['bytes']} (truncated or replaced)")

    def _open(self, path: Path, record: Any):
        self._present(path, record)
        try:
            return safe_open(str(path), "pt")
        except (SafetensorError, OSError, ValueError) as exc:
            raise damaged(path, f"not a readable safetensors file ({_first_line(exc)})") from None

    def _shard(self, index: int):
        """The open shard `index`, its content hash checked the first time it is read from."""
        if index not in self._verified:
            path = self.folder / shard_name(index)
            if file_digest(path) != self.manifest["shards"][path.name]["sha256"]:
                raise damaged(path, "content does not match the manifest (changed after it was written)")
            self._verified.add(index)
        return self._handles[index]

    def check_teacher(self, identity: dict[str, Any], model: str) -> None:
        """Refuse a cache built from other teacher weights than those now at `model`."""
        cached = self.manifest.get("teacher") or {}
        if cached.get("weights") != identity.get("weights"):
            raise ConfigError(f"teacher.options.source.model: the teacher at {model} has other weights than the ones the "
                              f"cache at {self.folder} was built from; {REBUILD} --overwrite")

    def check(self, expected: dict[str, Any], field: str = "teacher.options.path") -> None:
        """Refuse a cache computed from other data, tokenizer, k or temperature, naming the fields."""
        differ = [f"{name} (cache {identity(self.manifest, name)!r}, this run {value!r})"
                  for name, value in expected.items() if identity(self.manifest, name) != value]
        if differ:
            raise ConfigError(f"{field}: the teacher cache at {self.folder} does not fit this run: {'; '.join(differ)}")

    def lookup(self, keys: torch.Tensor) -> SparseTargets:
        rows = []
        for key in keys.tolist():
            where = self._where.get(int(key))
            if where is None:
                raise KeyError(f"sequence {key} is not in the teacher cache at {self.folder}")
            rows.append(where)
        parts: dict[str, list[torch.Tensor]] = {name: [] for name in self._fields}
        for shard, row in rows:
            handle = self._shard(shard)
            for name in parts:
                parts[name].append(handle.get_slice(name)[row:row + 1])
        t = {name: torch.cat(values) for name, values in parts.items()}
        if "counts" in t:  # an earlier sampled encoding
            return targets_from_counts(t["ids"], t["counts"], self.temperature, t.get("entropy"))
        if "packed_ids" in t:
            draws = unpack_sorted_ids(t["packed_ids"], self.k, self.vocab_size)
            return decode_sampled(draws, self.temperature, self.vocab_size, t["entropy"])
        if self.mode == "sampled":  # the draws as plain ids (THIRD_SAMPLED_ENCODING)
            return decode_sampled(t["ids"], self.temperature, self.vocab_size, t["entropy"])
        return decode_top_k(t["ids"], t["q"], t["hi"], t["lo"], t["log_tail"], self.temperature)

    def __iter__(self) -> Iterator[int]:
        return iter(self._where)
