"""Which teacher layers a cut student keeps, chosen by measuring them on the recipe's own data.

- `block-influence` (ShortGPT, Men et al. 2024): 1 - the mean cosine similarity between a layer's input
  and output hidden states; a layer that barely turns the residual stream matters little.
- `removal-kl`: how far the teacher's next-token distribution on the calibration batches moves (KL) when
  that one layer is skipped (its output replaced by its input); slower (one forward pass per layer),
  but it measures what distillation transfers, the output distribution.

Both score every layer of the teacher; the `keep_layers` highest-scoring ones are kept, in order.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from kdistill.core.errors import ConfigError
from kdistill.core.models import decoder_layers

MEASURES = ("block-influence", "removal-kl")


def check_keep_layers(keep: int, teacher: Any) -> None:
    n = teacher.config.num_hidden_layers
    if not 1 <= keep <= n:
        raise ConfigError(f"student.from_teacher.keep_layers: {keep} is not between 1 and the teacher's {n} layers")


def _inputs(batch, model: nn.Module) -> dict[str, Any]:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return batch.model_inputs(dtype)


def block_influence(teacher: Any, batches: Sequence[Any]) -> list[float]:
    """1 - mean cosine(input, output) of each layer over the batches' real (non-padding) positions."""
    n = teacher.config.num_hidden_layers
    sums, count = torch.zeros(n, dtype=torch.float64), 0
    with torch.no_grad():
        for batch in batches:
            states = teacher(**_inputs(batch, teacher), output_hidden_states=True, use_cache=False).hidden_states
            real = batch.attention_mask.bool() if batch.attention_mask is not None else torch.ones_like(batch.input_ids, dtype=torch.bool)
            for i in range(n):
                cosine = nn.functional.cosine_similarity(states[i][real].double(), states[i + 1][real].double(), dim=-1)
                sums[i] += cosine.sum()
            count += int(real.sum())
    return (1 - sums / count).tolist()


def _log_probs(teacher: nn.Module, batch) -> torch.Tensor:
    """Next-token log-probabilities at the batch's counted positions, float64."""
    logits = teacher(**_inputs(batch, teacher), use_cache=False).logits
    return torch.log_softmax(logits[batch.mask].double(), dim=-1)


def removal_kl(teacher: nn.Module, batches: Sequence[Any]) -> list[float]:
    """KL(teacher || teacher without the layer) per counted token, for each layer skipped alone (its output
    replaced by its input): how far the output distribution, which the student learns, moves without it."""
    _, layers = decoder_layers(teacher)

    def skip(module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    with torch.no_grad():
        full = [_log_probs(teacher, batch) for batch in batches]
        count = sum(len(f) for f in full)
        scores = []
        for layer in layers:
            handle = layer.register_forward_hook(skip, with_kwargs=True)
            try:
                kl = sum(float((f.exp() * (f - _log_probs(teacher, b))).sum()) for f, b in zip(full, batches))
            finally:
                handle.remove()
            scores.append(kl / count)
    return scores


def layer_scores(teacher: nn.Module, batches: Sequence[Any], by: str) -> list[float]:
    measure: Callable[[nn.Module, Sequence[Any]], list[float]] = {"block-influence": block_influence,
                                                                    "removal-kl": removal_kl}[by]
    was_training = teacher.training
    teacher.eval()
    try:
        return measure(teacher, batches)
    finally:
        teacher.train(was_training)


def keep(scores: Sequence[float], n: int) -> list[int]:
    """The indices of the `n` highest scores, in layer order (ties: the earlier layer)."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(ranked[:n])
