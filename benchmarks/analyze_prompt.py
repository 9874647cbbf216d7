"""How long `kdistill analyze RECIPE --text PROMPT` takes for one prompt, with and without the scan of the
validation split (`--validation`, which every call made before the scan became an option: issue #22).

Each command runs as its own process (`python -m kdistill.cli`, what a user's `kdistill` does: imports, the
recipe, the teacher loaded from its GGUF, then the prompt), in interleaved rounds, with its output folder and
tracker in a fresh temporary folder. Printed: wall seconds and the child's CPU seconds (user + system; steadier on
a shared machine), medians over the rounds.

    python benchmarks/analyze_prompt.py --recipe quickstart --rounds 3
    python benchmarks/analyze_prompt.py --set teacher.options.model=/tmp/smollm2   # the teacher as safetensors

Measured 2026-12-01 on a shared machine (2 CPU cores, load average 2.4 to 6 from other work, so wall times
vary; CPU times vary less), medians of 2 rounds, recipe quickstart:

| command | wall (s) | CPU (s) |
|---|---|---|
| `--text` (the GGUF teacher, as shipped) | 44.4 | 36.6 |
| `--text --validation` (what every call did before) | 85.2 | 71.9 |
| `--text`, the teacher saved once as a safetensors folder | 23.4 | 14.0 |
| `--text --validation`, the same | 85.7 | 49.1 |

Before the change one call of `kdistill analyze quickstart --text ...` took 142.7 s wall (`/usr/bin/time`, load
average 3 to 5). What is left without the scan (cProfile): loading the teacher, where transformers reads the GGUF
file three times (config, weights, tokenizer) and dequantizes it, then importing torch and transformers.
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


def timed(args: list[str], cwd: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `python -m kdistill.cli ARGS` process; stops on failure."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdistill.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
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
    parser.add_argument("--set", action="append", default=[], help="a recipe override for both commands (repeatable)")
    args = parser.parse_args()
    modes = {"--text": [], "--text --validation": ["--validation"]}
    times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    for _ in range(args.rounds):
        for mode, extra in modes.items():
            with tempfile.TemporaryDirectory() as folder:
                command = ["analyze", args.recipe, "--text", args.text, *extra, "--set", f"output_dir={folder}/out",
                           "--set", "tracker={name: jsonl}", *(f"--set={item}" for item in args.set)]
                times[mode].append(timed(command, folder))
    print(f"kdistill analyze {args.recipe} --text {args.text!r}: medians of {args.rounds} rounds")
    print("| command | wall (s) | CPU (s) |")
    print("|---|---|---|")
    for mode, runs in times.items():
        print(f"| `{mode}` | {statistics.median(w for w, _ in runs):.1f} | {statistics.median(c for _, c in runs):.1f} |")


if __name__ == "__main__":
    main()
