"""Where a fused forward-KL step's time goes, chunk by chunk, at the loss benchmark's shapes.

    python benchmarks/chunk_parts.py [--vocab 128256] [--chunk 128] [--reps 3]

Times, summed over one step's chunks (960 counted positions), the student's and the teacher's
logit products computed both ways, `h @ W.T` (position-major) and `W @ h.T` (vocabulary-major,
what kdistill's fused path does), and forward KL's analytic value and gradient on the
vocabulary-major chunks (the element-wise work). Best of --reps, in one process.
"""

from __future__ import annotations

import argparse
import time

import torch

from kdistill.plugins.losses.forward_kl import ForwardKL

POSITIONS, STUDENT_HIDDEN, TEACHER_HIDDEN = 960, 512, 1024


def best(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    v, c = args.vocab, args.chunk
    g = torch.Generator().manual_seed(0)
    weights = {"student": torch.randn(v, STUDENT_HIDDEN, generator=g), "teacher": torch.randn(v, TEACHER_HIDDEN, generator=g)}
    hidden = {"student": torch.randn(POSITIONS, STUDENT_HIDDEN, generator=g), "teacher": torch.randn(POSITIONS, TEACHER_HIDDEN, generator=g)}
    starts = range(0, POSITIONS, c)
    rows = []
    for side in ("student", "teacher"):
        w, h = weights[side], hidden[side]
        position_major, vocab_major = torch.empty(c * v), torch.empty(c * v)

        def by_positions():
            for s in starts:
                n = min(c, POSITIONS - s)
                torch.matmul(h[s:s + n], w.T, out=position_major[:n * v].view(n, v))

        def by_vocabulary():
            for s in starts:
                n = min(c, POSITIONS - s)
                torch.matmul(w, h[s:s + n].T, out=vocab_major[:n * v].view(v, n))

        rows.append((f"{side} logits, h @ W.T", best(by_positions, args.reps)))
        rows.append((f"{side} logits, W @ h.T", best(by_vocabulary, args.reps)))
    loss = ForwardKL(ForwardKL.Options(temperature=1.0))
    chunks = [(torch.randn(v, min(c, POSITIONS - s), generator=g) * 3, torch.randn(v, min(c, POSITIONS - s), generator=g) * 3)
              for s in starts]
    work = [(torch.empty_like(a), torch.empty_like(b)) for a, b in chunks]

    def elementwise():
        for (a, b), (x, y) in zip(chunks, work):
            x.copy_(a)
            y.copy_(b)
            loss.rows_and_grad(x.T, y.T, None)

    copies = best(lambda: [(x.copy_(a), y.copy_(b)) for (a, b), (x, y) in zip(chunks, work)], args.reps)
    rows.append(("forward KL value + gradient (blocks)", best(elementwise, args.reps) - copies))
    print(f"one step's chunks: {POSITIONS} positions in chunks of {c}, V={v}, {torch.get_num_threads()} threads")
    print("| part | seconds per step |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
