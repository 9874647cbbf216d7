"""Peak memory of quickstart training with hidden-state distillation on 4 mapped layers.

    python benchmarks/feature_memory.py [--steps 3]

Three fresh processes, each `kdistill run quickstart-features` (teacher SmolLM2-135M, 6-layer
student, 4 x 128 tokens) for a few steps without evaluation, checkpoints or MLflow:
  logit-only          the same recipe without the hidden-state loss
  hooks (kdistill)    forward hooks keep the 4 mapped layers only
  output_hidden_states  the same loss, with both models also asked for every layer's hidden
                      states, as code that calls `model(..., output_hidden_states=True)` does
Reports each process's peak resident set size. Needs the quickstart's packages (see README).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import sys
from transformers.models.llama import modeling_llama
if sys.argv[1] == "naive":
    original = modeling_llama.LlamaModel.forward
    def forward(self, *args, **kwargs):
        kwargs["output_hidden_states"] = True
        return original(self, *args, **kwargs)
    modeling_llama.LlamaModel.forward = forward
from kdistill.core.engine import run_recipe
overrides = sys.argv[3:]
if sys.argv[1] == "logit-only":
    overrides += ["losses=[{name: forward-kl, weight: 0.5, options: {temperature: 2.0}}, {name: cross-entropy, weight: 0.5}]",
                  "layer_mapper=null"]
from kdistill.core.cli import recipe_path
from pathlib import Path
run_recipe(recipe_path(Path("quickstart-features")), overrides=overrides, overwrite=True)
'''


def measure(variant: str, steps: int, workdir: str) -> float:
    overrides = [f"train.steps={steps}", "train.eval_every=0", "train.save_every=0", "evaluators=[]", "tracker={name: jsonl}",
                 f"output_dir={os.path.join(workdir, variant)}"]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, variant, "-", *overrides], cwd=workdir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr.read()[-2000:]}")
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(v, measure(v, args.steps, tmp)) for v in ("logit-only", "hooks", "naive")]
    print(f"quickstart-features, {args.steps} training steps, peak RSS of the process")
    print("| variant | peak RSS MiB | vs logit-only |")
    print("|---|---|---|")
    base = rows[0][1]
    names = {"logit-only": "logit losses only", "hooks": "+ hidden-cosine-mse on 4 layers, forward hooks (kdistill)",
             "naive": "+ the same, with output_hidden_states=True"}
    for variant, mib in rows:
        print(f"| {names[variant]} | {mib:.0f} | {mib - base:+.0f} MiB |")


if __name__ == "__main__":
    main()
