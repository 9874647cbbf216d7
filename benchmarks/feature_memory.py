"""Peak memory of quickstart training with hidden-state distillation on 4 mapped layers.

    python benchmarks/feature_memory.py [--steps 3]

Three fresh processes, each `kdistill run quickstart-features` (teacher SmolLM2-135M, 6-layer
student, 4 x 128 tokens) for a few steps without evaluation, checkpoints or MLflow:
  logit-only          the same recipe without the hidden-state loss
  hooks (kdistill)    forward hooks keep the 4 mapped layers only
  output_hidden_states  the same loss, with both models also asked for every layer's hidden
                      states, as code that calls `model(..., output_hidden_states=True)` does
Reports resident memory when training starts and its peak during the steps (the kernel's
high-water mark, reset through a kd_run_started hook), so model loading does not hide the steps.
Needs the quickstart's packages (see README).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import json, sys, types
import kdistill
from transformers.models.llama import modeling_llama
if sys.argv[1] == "naive":
    original = modeling_llama.LlamaModel.forward
    def forward(self, *args, **kwargs):
        kwargs["output_hidden_states"] = True
        return original(self, *args, **kwargs)
    modeling_llama.LlamaModel.forward = forward
from kdistill.core.engine import run_recipe
from kdistill.core.plugins import make_plugin_manager

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

found = {}
probe = types.ModuleType("probe")

@kdistill.hookimpl
def kd_run_started(recipe, output_dir):
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset the peak (VmHWM) so it covers the training steps only
    found["start"] = status("VmRSS")

@kdistill.hookimpl
def kd_run_finished(output_dir, metrics, status):
    found["peak"] = globals()["status"]("VmHWM")

probe.kd_run_started, probe.kd_run_finished = kd_run_started, kd_run_finished
overrides = sys.argv[3:]
if sys.argv[1] == "logit-only":
    overrides += ["losses=[{name: forward-kl, weight: 0.5, options: {temperature: 2.0}}, {name: cross-entropy, weight: 0.5}]",
                  "layer_mapper=null"]
from kdistill.cli import recipe_path
from pathlib import Path
run_recipe(recipe_path(Path("quickstart-features")), overrides=overrides, overwrite=True,
           pm=make_plugin_manager(extra_plugins=[("probe", probe)]))
print(json.dumps(found))
'''


def measure(variant: str, steps: int, workdir: str) -> dict:
    overrides = [f"train.steps={steps}", "train.eval_every=0", "train.save_every=0", "evaluators=[]", "tracker={name: jsonl}",
                 f"output_dir={os.path.join(workdir, variant)}"]
    out = subprocess.run([sys.executable, "-c", CHILD, variant, "-", *overrides], cwd=workdir, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{out.stderr[-2000:]}")
    found = json.loads(out.stdout.strip().splitlines()[-1])
    return {"start": found["start"] / 2**20, "peak": found["peak"] / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [(v, measure(v, args.steps, tmp)) for v in ("logit-only", "hooks", "naive")]
    print(f"quickstart-features, {args.steps} training steps: resident memory when training starts (models loaded)")
    print("and its peak during the steps (VmHWM reset at the start), MiB")
    print("| variant | at start | peak in steps | peak - start |")
    print("|---|---|---|---|")
    names = {"logit-only": "logit losses only", "hooks": "+ hidden-state loss on 4 layers, forward hooks (kdistill)",
             "naive": "+ the same, with output_hidden_states=True"}
    for variant, r in rows:
        print(f"| {names[variant]} | {r['start']:.0f} | {r['peak']:.0f} | {r['peak'] - r['start']:.0f} |")


if __name__ == "__main__":
    main()
