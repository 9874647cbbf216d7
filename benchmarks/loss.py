"""Peak memory and time of a distillation loss's forward + backward from hidden states.

    python benchmarks/loss.py                      # the issue's shapes at vocabularies 32,000 and 128,256
    python benchmarks/loss.py --vocab 32000 --reps 3
    python benchmarks/loss.py --vocab 128256 --rounds 3   # every variant 3 times, interleaved

Each variant runs in a fresh process. Memory is that process's peak resident set size while the
loss runs minus its resident size once the inputs (hidden states, output projections) exist: what
the loss itself adds, including the student projection's gradient that every variant must produce.
The peak is the kernel's high-water mark (VmHWM), reset once the inputs exist (/proc/self/clear_refs),
so that making the inputs does not count; where that reset is not available it falls back to
ru_maxrss and says so. Time is the median over --reps runs after one warm-up. With --rounds R
every variant's process runs R times, the variants taking turns, and a row shows the median of all
R x reps runs and the largest peak: this machine's speed drifts by 10-20% over minutes, and taking
turns spreads that drift over all variants instead of favouring whichever ran in a fast minute.

The loss is forward KL(teacher || student) at temperature 1 (Liger's and TRL's generalized JSD
with beta=0 is the same divergence; Liger runs its pure-torch chunked path, uncompiled, with its
default chunk of 1024 rows and with 128 rows); peers that are not installed are listed as such.
The floor is the four projection products alone: student and teacher logits, and the student's two
gradient products.
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
VARIANTS = ["naive", "kdistill", "kdistill-c256", "torchtune", "liger", "liger-c128", "trl", "floor"]


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


def make_inputs(vocab: int):
    import torch

    g = torch.Generator().manual_seed(0)
    # scaled in place: a scaled copy would be a transient as large as the weight, before the peak is reset
    hs = torch.randn(B * S, DS, generator=g).mul_(0.5)
    ws = torch.randn(vocab, DS, generator=g).mul_(DS ** -0.5).requires_grad_(True)
    ht = torch.randn(B * S, DT, generator=g).mul_(0.5)
    wt = torch.randn(vocab, DT, generator=g).mul_(DT ** -0.5)
    labels = torch.randint(0, vocab, (B * S,), generator=g)
    labels[-64:] = -100  # some padding, as in real batches
    return hs, ws, ht, wt, labels


def build(variant: str, vocab: int):
    """A callable running forward + backward once, or raise ImportError."""
    import torch
    import torch.nn.functional as F

    hs, ws, ht, wt, labels = make_inputs(vocab)
    hs.requires_grad_(True)
    mask = labels != -100

    if variant == "naive":  # the design document's DistillationLoss.kl_divergence_loss
        def step():
            student_logits = hs @ ws.T
            with torch.no_grad():
                teacher_logits = ht @ wt.T
            student_probs = F.log_softmax(student_logits / TEMPERATURE, dim=-1)
            teacher_probs = F.softmax(teacher_logits / TEMPERATURE, dim=-1)
            loss = F.kl_div(student_probs, teacher_probs, reduction="batchmean") * TEMPERATURE ** 2
            loss.backward()
    elif variant.startswith("kdistill"):  # "kdistill": its default chunk (96 MiB of logits); "kdistill-cN": N rows
        import kdistill
        from kdistill.core.fused import TeacherRows, fused_logit_loss
        from kdistill.plugins.losses.forward_kl import ForwardKL

        loss_fn = ForwardKL(ForwardKL.Options(temperature=TEMPERATURE))
        teacher = TeacherRows(kdistill.ModelOutputs(final_hidden=ht, output_weight=wt), torch.ones(B * S, dtype=torch.bool))

        def step():
            rows = teacher if mask.all() else TeacherRows(kdistill.ModelOutputs(final_hidden=ht[mask], output_weight=wt),
                                                          torch.ones(int(mask.sum()), dtype=torch.bool))
            total, _ = fused_logit_loss(hs[mask], ws, rows, labels[mask], [("forward-kl", 1.0, loss_fn)],
                                        chunk=int(variant.split("-c")[1]) if "-c" in variant else None)
            (total / mask.sum()).backward()
    elif variant == "torchtune":
        from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

        loss_fn = ForwardKLWithChunkedOutputLoss(num_output_chunks=8)

        def step():
            student_chunks = [h @ ws.T for h in hs.view(B, S, DS).chunk(8, dim=1)]
            with torch.no_grad():
                teacher_chunks = [h @ wt.T for h in ht.view(B, S, DT).chunk(8, dim=1)]
            loss_fn(student_chunks, teacher_chunks, labels.view(B, S)).backward()
    elif variant.startswith("liger"):  # "liger": its default chunk of 1024 rows; "liger-c128": 128 rows
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        chunk = {"chunk_size": 128} if variant == "liger-c128" else {}
        loss_fn = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=TEMPERATURE,
                                          compiled=False, **chunk)

        def step():
            loss_fn(hs, ws, ht, wt, labels).backward()
    elif variant == "trl":
        from trl.experimental.gkd import GKDTrainer

        def step():
            student_logits = (hs @ ws.T)[mask]
            with torch.no_grad():
                teacher_logits = (ht @ wt.T)[mask]
            GKDTrainer.generalized_jsd_loss(student_logits[None], teacher_logits[None], beta=0.0, temperature=TEMPERATURE,
                                            reduction="batchmean").backward()
    elif variant == "floor":
        grad = torch.randn(B * S, vocab).mul_(1e-3)

        def step():
            with torch.no_grad():
                hs @ ws.T
                ht @ wt.T
                grad @ ws
                grad.T @ hs
    else:
        raise ValueError(variant)

    def run():
        step()
        hs.grad = None
        ws.grad = None
    return run


def child(variant: str, vocab: int, reps: int) -> dict:
    import torch

    torch.manual_seed(0)
    try:
        run = build(variant, vocab)
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
    return {"variant": variant, "vocab": vocab, "time_s": statistics.median(times), "times_s": times,
            "peak_extra_mib": (peak - base) / 2**20,
            "peak_rss_mib": peak / 2**20, "peak_source": "VmHWM" if high_water_mark else "ru_maxrss",
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, action="append", help="vocabulary sizes (default 32000 and 128256)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per variant, variants taking turns")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "VOCAB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.reps)))
        return
    rows = []
    for vocab in args.vocab or [32000, 128256]:
        runs: dict[str, list[dict]] = {variant: [] for variant in args.variants.split(",")}
        for round_ in range(args.rounds):
            for variant, results in runs.items():
                if results and "error" in results[0]:
                    continue
                out = subprocess.run([sys.executable, __file__, "--child", variant, str(vocab), "--reps", str(args.reps)],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    results.append({"variant": variant, "vocab": vocab, "error": f"failed: {out.stderr.strip().splitlines()[-1:]}"})
                else:
                    results.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"  measured {variant} at V={vocab} (round {round_ + 1} of {args.rounds})", file=sys.stderr, flush=True)
        rows.extend(combine(results) for results in runs.values())
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


def combine(results: list[dict]) -> dict:
    """One row from a variant's rounds: the median of all their timed runs and the largest peak."""
    if "error" in results[0]:
        return results[0]
    row = dict(results[-1])
    row["times_s"] = [t for r in results for t in r["times_s"]]
    row["time_s"] = statistics.median(row["times_s"])
    row["peak_extra_mib"] = max(r["peak_extra_mib"] for r in results)
    return row


def print_table(rows: list[dict]) -> None:
    print(f"forward + backward of forward KL from hidden states: batch {B} x seq {S}, student hidden {DS}, "
          f"teacher hidden {DT}, float32, T={TEMPERATURE}")
    header = f"| {'vocab':>7} | {'variant':<13} | {'time s':>7} | {'x naive':>7} | {'x floor':>7} | {'peak MiB':>9} | {'x naive':>7} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for vocab in sorted({r["vocab"] for r in rows}):
        group = {r["variant"]: r for r in rows if r["vocab"] == vocab}
        naive, floor = group.get("naive", {}), group.get("floor", {})
        for variant, r in group.items():
            if "error" in r:
                print(f"| {vocab:>7} | {variant:<13} | {r['error']}")
                continue
            tn = r["time_s"] / naive["time_s"] if "time_s" in naive else float("nan")
            tf = r["time_s"] / floor["time_s"] if "time_s" in floor else float("nan")
            mn = r["peak_extra_mib"] / naive["peak_extra_mib"] if "peak_extra_mib" in naive else float("nan")
            print(f"| {vocab:>7} | {variant:<13} | {r['time_s']:7.3f} | {tn:7.2f} | {tf:7.2f} | {r['peak_extra_mib']:9.0f} | {mn:7.3f} |")
    if any(r.get("peak_source") == "ru_maxrss" for r in rows):
        print("note: the peak could not be reset after the inputs were made (no /proc/self/clear_refs): "
              "peaks are ru_maxrss and include making the inputs")
    missing = sorted({r["variant"] for r in rows if "error" in r})
    if missing:
        print(f"not measured: {', '.join(missing)} (see the rows above; peers: pip install -r benchmarks/requirements-peers.txt)")


if __name__ == "__main__":
    main()
