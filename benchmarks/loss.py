"""Peak memory and time of a distillation loss's forward + backward from hidden states.

    python benchmarks/loss.py                      # forward KL + cross-entropy at vocabularies 32,000 and 128,256
    python benchmarks/loss.py --vocab 128256 --rounds 3   # every variant 3 times, interleaved
    python benchmarks/loss.py --objective kl       # forward KL alone (the tables before 2026-12)
    python benchmarks/loss.py --device cuda        # on a GPU: bfloat16 inputs, CUDA events, max_memory_allocated

The workload is what users run: forward KL(teacher || student) at temperature 1 plus cross-entropy
on the labels, weights 0.5 and 0.5, averaged over the counted positions (`--objective kl`: forward
KL alone). Liger's fused linear JSD with beta=0 is the same divergence, its hard loss the same
cross-entropy (weight_hard_loss 0.5, weight_soft_loss 0.5); TRL's generalized JSD (beta=0) and
torchtune's chunked forward KL get a plain cross-entropy added. Peers that are not installed are
listed as such.

On CPU each variant runs in a fresh process. Memory is that process's peak resident set size while
the loss runs minus its resident size once the inputs (hidden states, output projections) exist:
what the loss itself adds, including the student projection's gradient that every variant must
produce. The peak is the kernel's high-water mark (VmHWM), reset once the inputs exist
(/proc/self/clear_refs); where that reset is not available it falls back to ru_maxrss and says so.
Time is the median over --reps runs after one warm-up. With --rounds R every variant's process runs
R times, the variants taking turns, and a row shows the median of all R x reps runs and the largest
peak (this machine's speed drifts by 10-20% over minutes; taking turns spreads that drift).

On CUDA every variant runs in this process, one after the other: memory is
torch.cuda.max_memory_allocated (reset once the inputs exist) minus what was allocated then, time
the median of CUDA-event timings of --reps runs after one warm-up.

The floor is the four projection products alone, measured the same way: student and teacher
logits, and the student's two gradient products.

Variants: naive, kdistill (the default chunk: the memory budget's), kdistill-speed (the chunk sized
for speed, 96 MiB of logits), kdistill-cN (N positions), kdistill-mM (a budget of M MiB),
kdistill-compiled (the element-wise part through torch.compile), liger, liger-c128 (chunk 128),
liger-compiled, liger-compiled-c128, torchtune, trl, floor.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

B, S, DS, DT = 2, 512, 512, 1024
TEMPERATURE = 1.0
KL_WEIGHT, CE_WEIGHT = 0.5, 0.5
VARIANTS = ["naive", "kdistill", "kdistill-speed", "kdistill-compiled", "liger", "liger-c128", "liger-compiled",
            "liger-compiled-c128", "torchtune", "trl", "floor"]


class Shape:
    """The benchmark's shapes: batch x sequence positions, student and teacher hidden sizes."""

    def __init__(self, batch: int = B, seq: int = S, student_hidden: int = DS, teacher_hidden: int = DT, padding: int = 64):
        self.batch, self.seq, self.ds, self.dt, self.padding = batch, seq, student_hidden, teacher_hidden, padding

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    def as_dict(self) -> dict:
        return {"batch": self.batch, "seq": self.seq, "student_hidden": self.ds, "teacher_hidden": self.dt, "padding": self.padding}


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak() -> bool:
    """Reset the kernel's resident high-water mark to the current size (Linux); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return read_peak() is not None
    except OSError:
        return False


def read_peak() -> int | None:
    """Peak resident set size in bytes since the last reset (VmHWM), or None where /proc lacks it."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def make_inputs(vocab: int, shape: Shape, device: str = "cpu", dtype: str = "float32"):
    import torch

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, dtype)
    n = shape.tokens

    def randn(*size, scale):
        # made on CPU (the same numbers on every device), scaled in place: a scaled copy would be a
        # transient as large as the weight, before the peak is reset
        return torch.randn(*size, generator=g).mul_(scale).to(device=device, dtype=dt)

    hs = randn(n, shape.ds, scale=0.5)
    ws = randn(vocab, shape.ds, scale=shape.ds ** -0.5).requires_grad_(True)
    ht = randn(n, shape.dt, scale=0.5)
    wt = randn(vocab, shape.dt, scale=shape.dt ** -0.5)
    labels = torch.randint(0, vocab, (n,), generator=g)
    if shape.padding:
        labels[-shape.padding:] = -100  # some padding, as in real batches
    return hs, ws, ht, wt, labels.to(device)


def build(variant: str, vocab: int, shape: Shape | None = None, device: str = "cpu", dtype: str = "float32",
          objective: str = "kl+ce"):
    """A callable running forward + backward once, or raise ImportError."""
    import torch
    import torch.nn.functional as F

    shape = shape or Shape()
    with_ce = objective == "kl+ce"
    kl_w, ce_w = (KL_WEIGHT, CE_WEIGHT) if with_ce else (1.0, 0.0)
    hs, ws, ht, wt, labels = make_inputs(vocab, shape, device, dtype)
    hs.requires_grad_(True)
    mask = labels != -100
    counted = int(mask.sum())
    nb, ns = shape.batch, shape.seq

    if variant == "naive":  # the design document's DistillationLoss, plus cross-entropy; loss math in float32
        def step():
            student_logits = (hs @ ws.T).float()
            with torch.no_grad():
                teacher_logits = (ht @ wt.T).float()
            s, t = student_logits[mask], teacher_logits[mask]
            student_probs = F.log_softmax(s / TEMPERATURE, dim=-1)
            teacher_probs = F.softmax(t / TEMPERATURE, dim=-1)
            loss = kl_w * F.kl_div(student_probs, teacher_probs, reduction="batchmean") * TEMPERATURE ** 2
            if with_ce:
                loss = loss + ce_w * F.cross_entropy(s, labels[mask])
            loss.backward()
    elif variant.startswith("kdistill"):
        # "kdistill": the default (memory budget); "-speed": 96 MiB of logits per chunk; "-cN": N rows;
        # "-mM": a budget of M MiB; "-compiled": torch.compile of the element-wise part
        import kdistill
        from kdistill.core.fused import TeacherRows, default_chunk, fused_logit_loss
        from kdistill.plugins.losses.cross_entropy import CrossEntropy
        from kdistill.plugins.losses.forward_kl import ForwardKL

        losses = [("forward-kl", kl_w, ForwardKL(ForwardKL.Options(temperature=TEMPERATURE)))]
        if with_ce:
            losses.append(("cross-entropy", ce_w, CrossEntropy(CrossEntropy.Options())))
        options: dict = {}
        for part in variant.split("-")[1:]:
            if part == "speed":
                options["chunk"] = default_chunk(vocab)
            elif part == "compiled":
                options["compile"] = True
            elif part.startswith("c") and part[1:].isdigit():
                options["chunk"] = int(part[1:])
            elif part.startswith("m") and part[1:].replace(".", "", 1).isdigit():
                options["memory_budget_mib"] = float(part[1:])
            else:
                raise ValueError(f"variant: unknown kdistill option '{part}' in '{variant}'")

        def step():
            rows = TeacherRows(kdistill.ModelOutputs(final_hidden=ht[mask], output_weight=wt), torch.ones(counted, dtype=torch.bool, device=device))
            total, _ = fused_logit_loss(hs[mask], ws, rows, labels[mask], losses, **options)
            (total / counted).backward()
    elif variant == "torchtune":
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)

        def step():
            student_chunks = [h @ ws.T for h in hs.view(nb, ns, shape.ds).chunk(8, dim=1)]
            with torch.no_grad():
                teacher_chunks = [h @ wt.T for h in ht.view(nb, ns, shape.dt).chunk(8, dim=1)]
            loss = kl_w * loss_fn(student_chunks, teacher_chunks, labels.view(nb, ns))
            if with_ce:
                loss = loss + ce_w * sum(F.cross_entropy(c.float().reshape(-1, vocab), y.reshape(-1), reduction="sum")
                                         for c, y in zip(student_chunks, labels.view(nb, ns).chunk(8, dim=1))) / counted
            loss.backward()
    elif variant.startswith("liger"):  # default chunk of 1024 rows, or "-c128"; "-compiled": its torch.compile path
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        chunk = {"chunk_size": 128} if variant.endswith("-c128") else {}
        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=ce_w, weight_soft_loss=kl_w, beta=0.0, temperature=TEMPERATURE,
                                          compiled="compiled" in variant, **chunk)

        def step():
            loss_fn(hs, ws, ht, wt, labels).backward()
    elif variant == "trl":
        from trl.experimental.gkd import GKDTrainer

        def step():
            student_logits = (hs @ ws.T)[mask].float()
            with torch.no_grad():
                teacher_logits = (ht @ wt.T)[mask].float()
            loss = kl_w * GKDTrainer.generalized_jsd_loss(student_logits[None], teacher_logits[None], beta=0.0,
                                                          temperature=TEMPERATURE, reduction="batchmean") / counted
            if with_ce:
                loss = loss + ce_w * F.cross_entropy(student_logits, labels[mask])
            loss.backward()
    elif variant == "floor":
        grad = torch.randn(shape.tokens, vocab, generator=torch.Generator().manual_seed(1)).mul_(1e-3).to(device=device, dtype=hs.dtype)

        def step():
            with torch.no_grad():
                hs @ ws.T
                ht @ wt.T
                grad @ ws
                grad.T @ hs
    else:
        raise ValueError(f"variant: unknown variant '{variant}'")

    def run():
        step()
        hs.grad = None
        ws.grad = None
    return run


def child(variant: str, vocab: int, reps: int, shape: Shape | None = None, objective: str = "kl+ce") -> dict:
    """One variant on CPU in this (fresh) process: resident-memory peak and wall-clock times."""
    import torch

    torch.manual_seed(0)
    try:
        run = build(variant, vocab, shape, "cpu", "float32", objective)
    except ImportError as exc:
        return {"variant": variant, "vocab": vocab, "error": f"not installed ({exc.name or exc})"}
    base = rss_bytes()
    high_water_mark = reset_peak()
    run()  # warm-up, counted in the peak
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    peak = read_peak() if high_water_mark else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "vocab": vocab, "device": "cpu", "dtype": "float32", "time_s": statistics.median(times),
            "times_s": times, "peak_extra_mib": (peak - base) / 2**20,
            "peak_rss_mib": peak / 2**20, "peak_source": "VmHWM" if high_water_mark else "ru_maxrss",
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def measure_cuda(variant: str, vocab: int, reps: int, shape: Shape | None = None, dtype: str = "bfloat16",
                 objective: str = "kl+ce", device: str = "cuda") -> dict:
    """One variant on a GPU, in this process: max_memory_allocated above the inputs, CUDA-event times."""
    import gc

    import torch

    torch.manual_seed(0)
    gc.collect()
    torch.cuda.empty_cache()
    try:
        run = build(variant, vocab, shape, device, dtype, objective)
    except ImportError as exc:
        return {"variant": variant, "vocab": vocab, "error": f"not installed ({exc.name or exc})"}
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        run()  # warm-up (and compilation), counted in the peak
        times = []
        for _ in range(reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000.0)
        peak = torch.cuda.max_memory_allocated(device)
    except torch.cuda.OutOfMemoryError as exc:
        return {"variant": variant, "vocab": vocab, "error": f"out of memory ({str(exc).splitlines()[0][:120]})"}
    finally:
        del run
        gc.collect()
        torch.cuda.empty_cache()
    return {"variant": variant, "vocab": vocab, "device": torch.cuda.get_device_name(device), "dtype": dtype,
            "time_s": statistics.median(times), "times_s": times, "peak_extra_mib": (peak - base) / 2**20,
            "peak_source": "cuda.max_memory_allocated", "torch": torch.__version__}


def run_cpu_variants(vocabs, variants, reps, rounds, shape: Shape | None = None, objective: str = "kl+ce",
                     python: str | None = None, timeout: float | None = None, log=None) -> list[dict]:
    """Every variant at every vocabulary, each run in a fresh process, `rounds` times taking turns."""
    shape = shape or Shape()
    rows = []
    for vocab in vocabs:
        runs: dict[str, list[dict]] = {variant: [] for variant in variants}
        for round_ in range(rounds):
            for variant, results in runs.items():
                if results and "error" in results[0]:
                    continue
                command = [python or sys.executable, os.path.abspath(__file__), "--child", variant, str(vocab),
                           "--reps", str(reps), "--objective", objective, "--shape",
                           f"{shape.batch},{shape.seq},{shape.ds},{shape.dt},{shape.padding}"]
                try:
                    out = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
                except subprocess.TimeoutExpired:
                    results.append({"variant": variant, "vocab": vocab, "error": f"timed out after {timeout} s"})
                    continue
                if out.returncode != 0:
                    results.append({"variant": variant, "vocab": vocab, "error": f"failed: {out.stderr.strip().splitlines()[-1:]}"})
                else:
                    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                if log:
                    log(f"  measured {variant} at V={vocab} (round {round_ + 1} of {rounds})")
        rows.extend(combine(results) for results in runs.values())
    return rows


def run_cuda_variants(vocabs, variants, reps, shape: Shape | None = None, dtype: str = "bfloat16",
                      objective: str = "kl+ce", log=None) -> list[dict]:
    rows = []
    for vocab in vocabs:
        for variant in variants:
            try:
                rows.append(measure_cuda(variant, vocab, reps, shape, dtype, objective))
            except Exception as exc:  # one variant failing does not hide the others
                first = str(exc).splitlines()[0][:200] if str(exc) else ""
                rows.append({"variant": variant, "vocab": vocab, "error": f"failed: {type(exc).__name__}: {first}"})
            if log:
                log(f"  measured {variant} at V={vocab}")
    return rows


def combine(results: list[dict]) -> dict:
    """One row from a variant's rounds: the median of all their timed runs and the largest peak."""
    if "error" in results[0]:
        return results[0]
    row = dict(results[-1])
    row["times_s"] = [t for r in results for t in r["times_s"]]
    row["time_s"] = statistics.median(row["times_s"])
    row["peak_extra_mib"] = max(r["peak_extra_mib"] for r in results)
    return row


def add_ratios(rows: list[dict]) -> list[dict]:
    """x naive (time and memory) and x floor (time) on every measured row, from its vocabulary's naive and floor rows."""
    for vocab in {r["vocab"] for r in rows}:
        group = {r["variant"]: r for r in rows if r["vocab"] == vocab}
        naive, floor = group.get("naive", {}), group.get("floor", {})
        for r in group.values():
            if "time_s" not in r:
                continue
            if "time_s" in naive:
                r["time_x_naive"] = r["time_s"] / naive["time_s"]
                r["memory_x_naive"] = r["peak_extra_mib"] / naive["peak_extra_mib"] if naive["peak_extra_mib"] > 0 else None
            if "time_s" in floor:
                r["time_x_floor"] = r["time_s"] / floor["time_s"]
    return rows


def format_table(rows: list[dict], objective: str = "kl+ce", shape: Shape | None = None) -> str:
    shape = shape or Shape()
    add_ratios(rows)
    what = "forward KL + cross-entropy (0.5 each)" if objective == "kl+ce" else "forward KL"
    dtypes = sorted({r.get("dtype", "?") for r in rows if "dtype" in r}) or ["float32"]
    lines = [f"forward + backward of {what} from hidden states: batch {shape.batch} x seq {shape.seq} "
             f"({shape.padding} padded), student hidden {shape.ds}, teacher hidden {shape.dt}, {'/'.join(dtypes)}, T={TEMPERATURE}"]
    header = f"| {'vocab':>7} | {'variant':<20} | {'time s':>8} | {'x naive':>7} | {'x floor':>7} | {'peak MiB':>9} | {'x naive':>7} |"
    lines += [header, "|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|"]
    for vocab in sorted({r["vocab"] for r in rows}):
        for r in (r for r in rows if r["vocab"] == vocab):
            if "error" in r:
                lines.append(f"| {vocab:>7} | {r['variant']:<20} | {r['error']}")
                continue
            lines.append(f"| {vocab:>7} | {r['variant']:<20} | {r['time_s']:8.4f} | {r.get('time_x_naive', float('nan')):7.2f} | "
                         f"{r.get('time_x_floor', float('nan')):7.2f} | {r['peak_extra_mib']:9.0f} | "
                         f"{(r.get('memory_x_naive') or float('nan')):7.3f} |")
    if any(r.get("peak_source") == "ru_maxrss" for r in rows):
        lines.append("note: the peak could not be reset after the inputs were made (no /proc/self/clear_refs): "
                     "peaks are ru_maxrss and include making the inputs")
    missing = sorted({r["variant"] for r in rows if "error" in r})
    if missing:
        lines.append(f"not measured: {', '.join(missing)} (see the rows above; peers: pip install -r benchmarks/requirements-peers.txt)")
    return "\n".join(lines)


def parse_shape(text: str) -> Shape:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 5 or min(parts[:4]) < 1 or parts[4] < 0 or parts[4] >= parts[0] * parts[1]:
        raise argparse.ArgumentTypeError(f"--shape: expected batch,seq,student_hidden,teacher_hidden,padding, got '{text}'")
    return Shape(*parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, action="append", help="vocabulary sizes (default 32000 and 128256)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--objective", choices=["kl+ce", "kl"], default="kl+ce",
                        help="forward KL + cross-entropy (default, as users run it) or forward KL alone")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="input dtype (default float32 on CPU, bfloat16 on CUDA)")
    parser.add_argument("--shape", type=parse_shape, default=Shape(),
                        help=f"batch,seq,student_hidden,teacher_hidden,padding (default {B},{S},{DS},{DT},64)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per variant on CPU, variants taking turns")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.reps, args.shape, args.objective)))
        return
    vocabs, variants = args.vocab or [32000, 128256], args.variants.split(",")
    log = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    if args.device == "cuda":
        rows = run_cuda_variants(vocabs, variants, args.reps, args.shape, args.dtype or "bfloat16", args.objective, log)
    else:
        if args.dtype not in (None, "float32"):
            parser.error("--dtype: CPU runs are float32")
        rows = run_cpu_variants(vocabs, variants, args.reps, args.rounds, args.shape, args.objective, log=log)
    print(format_table(rows, args.objective, args.shape))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
