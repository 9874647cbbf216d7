"""Capture hidden states and attention maps of chosen layers with forward hooks.

Only the layers some loss maps are kept, instead of `output_hidden_states=True` (every layer) or
`output_attentions=True` (every layer's [B, H, S, S] map).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from kdistill.core.models import decoder_layers

ATTENTION_NAMES = ("self_attn", "attn", "attention", "self_attention")


def attention_module(layer: nn.Module) -> nn.Module:
    for name in ATTENTION_NAMES:
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise ValueError(f"cannot find the attention module of {type(layer).__name__} (looked for {', '.join(ATTENTION_NAMES)})")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model)[1])


@contextmanager
def capture(model: nn.Module, hidden_layers=(), attention_layers=()) -> Iterator[dict[str, dict[int, torch.Tensor]]]:
    """Yields {"hidden": {layer: output}, "attention": {layer: weights}}, filled by the forward pass.

    A layer's hidden state is its block's output (before the final norm for the last one); its
    attention map is the probabilities [B, heads, S, S] (needs the eager attention implementation).
    """
    found: dict[str, dict[int, torch.Tensor]] = {"hidden": {}, "attention": {}}
    if not hidden_layers and not attention_layers:
        yield found
        return
    _, layers = decoder_layers(model)
    handles = []

    def keep(kind: str, index: int, position: int):
        def hook(module, args, output):
            value = output[position] if isinstance(output, (tuple, list)) else output
            if value is None:
                raise RuntimeError(f"layer {index} returned no attention weights; it needs attn_implementation='eager'")
            found[kind][index] = value
        return hook

    try:
        for i in sorted(set(hidden_layers)):
            handles.append(layers[i].register_forward_hook(keep("hidden", i, 0)))
        for i in sorted(set(attention_layers)):
            handles.append(attention_module(layers[i]).register_forward_hook(keep("attention", i, 1)))
        yield found
    finally:
        for handle in handles:
            handle.remove()
