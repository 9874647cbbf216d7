"""How long `kdistill analyze RECIPE --text PROMPT` takes for one prompt, with and without the scan of the
validation split (`--validation`, which every call made before the scan became an option: issue #22).

Each command runs as its own process (`python -m kdistill.cli`, what a user's `kdistill` does: imports, the
recipe, the teacher loaded, then the prompt), in interleaved rounds, with its output folder and tracker in a
fresh temporary folder, and with the GGUF teacher's dequantized copy (docs/teachers.md) turned off, written by
the call, or written before the rounds. Printed: wall seconds and the child's CPU seconds (user + system),
medians over the rounds.

    python benchmarks/analyze_prompt.py --recipe quickstart --rounds 2

Measured 2026-12-02 on 2 CPU cores, otherwise idle, medians of 2 rounds, recipe quickstart:

| command | wall (s) | CPU (s) |
|---|---|---|
| `--text`, no dequantized copy (KDISTILL_CACHE=off) | 48.3 | 48.4 |
| `--text`, first call (dequantizes and writes the copy) | 54.4 | 54.5 |
| `--text`, later calls (read the copy) | 13.7 | 13.9 |
| `--text --validation`, later calls | 27.7 | 37.3 |

Before the scan became an option one call took 142.7 s wall (`/usr/bin/time`, load average 3 to 5). What is
left of a later call (cProfile): importing torch (4 s) and the transformers modules the model needs (5 s), then
reading the copy's weights (3 s); without the copy, transformers' GGUF reader parses the file's metadata in
Python three times (config, weights, tokenizer) and dequantizes it (35 s).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time


def timed(args: list[str], cwd: str, env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `python -m kdistill.cli ARGS` process; stops on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdistill.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **env})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"kdistill {' '.join(args)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--text", default="To be, or not to be")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], help="a recipe override for every command (repeatable)")
    args = parser.parse_args()
    # (label, extra arguments, which dequantized-teacher cache: none, a fresh one, or one written before the rounds)
    modes = [("`--text`, no dequantized copy (KDISTILL_CACHE=off)", [], "off"),
             ("`--text`, first call (dequantizes and writes the copy)", [], "fresh"),
             ("`--text`, later calls (read the copy)", [], "warm"),
             ("`--text --validation`, later calls", ["--validation"], "warm")]
    times: dict[str, list[tuple[float, float]]] = {label: [] for label, _, _ in modes}
    with tempfile.TemporaryDirectory() as warm:
        for round_ in range(-1, args.rounds):  # round -1 writes the warm copy and is not counted
            for label, extra, cache in modes[2:3] if round_ < 0 else modes:
                with tempfile.TemporaryDirectory() as folder:
                    command = ["analyze", args.recipe, "--text", args.text, *extra, "--set", f"output_dir={folder}/out",
                               "--set", "tracker={name: jsonl}", *(f"--set={item}" for item in args.set)]
                    env = {"KDISTILL_CACHE": {"off": "off", "fresh": f"{folder}/cache", "warm": warm}[cache]}
                    measured = timed(command, folder, env)
                    if round_ >= 0:
                        times[label].append(measured)
    print(f"kdistill analyze {args.recipe} --text {args.text!r}: medians of {args.rounds} rounds")
    print("| command | wall (s) | CPU (s) |")
    print("|---|---|---|")
    for label, runs in times.items():
        print(f"| {label} | {statistics.median(w for w, _ in runs):.1f} | {statistics.median(c for _, c in runs):.1f} |")


if __name__ == "__main__":
    main()
