"""What the checkpoint content hashes cost: a 1 GiB safetensors file, hashed and verified, against
reading it and against saving it.

    python benchmarks/checkpoint_hash.py [--gib 1] [--rounds 5] [--workdir DIR]

In a temporary folder (or --workdir), one safetensors file of --gib GiB of float32 tensors, written by
the checkpoint's own writer. Each round times, in a rotated order (rounds interleaved, so a slow
moment of a shared machine touches every row alike):

- the save itself (`_save_tensors`: serialise, write, fsync), the cost the hash is set against;
- `mark_complete`: hashing at save time (reads the fresh file back, writes the marker);
- `verify_contents`: the check on resume, and a plain read of the file in the same 4 MiB pieces,
  both with the file in the page cache (as right after a save) and evicted first (`posix_fadvise
  DONTNEED`, as after a reboot: then the disk sets the pace of both);
- SHA-256 (the chosen hash) and BLAKE2b, SHA-1 for comparison, file in the page cache.

Prints the median of the rounds. Hashing is CPU-bound: one core per file, so on a machine shared
with other work the figures move with the load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdistill.core import checkpoint as ckpt


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache (clean pages only: it was fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def plain_read(path: Path) -> None:
    buffer = bytearray(ckpt._CHUNK)
    with open(path, "rb", buffering=0) as handle:
        while handle.readinto(buffer):
            pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kdistill-hash-bench-", dir=args.workdir) as tmp:
        folder = Path(tmp)
        target = folder / "model.safetensors"
        pieces = 16
        numel = int(args.gib * (1 << 30)) // 4 // pieces
        g = torch.Generator().manual_seed(0)
        tensors = {f"layer.{i}.weight": torch.randn(numel, generator=g) for i in range(pieces)}
        ckpt._save_tensors(tensors, target)
        ckpt.mark_complete(folder, 1)
        size = target.stat().st_size

        def cold(fn):
            def run():
                evict(target)
                fn()
            return run

        def verify():
            assert ckpt.verify_contents(folder) is None

        ops = {
            "save (_save_tensors: serialise, write, fsync)": lambda: ckpt._save_tensors(tensors, target),
            "hash at save (mark_complete)": lambda: ckpt.mark_complete(folder, 1),
            "verify on resume (verify_contents), cached": verify,
            "plain read, cached": lambda: plain_read(target),
            "verify on resume (verify_contents), evicted": cold(verify),
            "plain read, evicted": cold(lambda: plain_read(target)),
            "sha256 digest, cached": lambda: ckpt.file_digest(target, "sha256"),
            "blake2b digest, cached": lambda: ckpt.file_digest(target, "blake2b"),
            "sha1 digest, cached": lambda: ckpt.file_digest(target, "sha1"),
        }
        names = list(ops)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                start = time.perf_counter()
                ops[name]()
                times[name].append(time.perf_counter() - start)
    read = statistics.median(times["plain read, cached"])
    print(f"{size / (1 << 30):.2f} GiB safetensors file, median of {args.rounds} interleaved rounds, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    print("| operation | seconds | GB/s | x plain read (cached) |")
    print("|---|---|---|---|")
    for name in names:
        t = statistics.median(times[name])
        print(f"| {name} | {t:.3f} | {size / t / 1e9:.2f} | {t / read:.1f} |")


if __name__ == "__main__":
    main()
