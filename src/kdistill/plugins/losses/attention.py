"""Attention transfer: KL between teacher and student attention rows of mapped layers."""

from __future__ import annotations

import torch

import kdistill
from kdistill import KdistillError
from kdistill.plugins.losses.common import kl_rows, upcast


def group_heads(attention: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H, S, S] -> [B, heads, S, S] by averaging consecutive groups of H / heads heads."""
    b, h, q, k = attention.shape
    if h % heads:
        raise KdistillError(f"attention-kl: the teacher's {h} attention heads do not split evenly into the student's {heads}")
    return attention.view(b, heads, h // heads, q, k).mean(dim=2)


class AttentionKL(kdistill.FeatureLoss):
    """KL(teacher row || student row) per query position, averaged over heads and layer pairs.

    Teacher heads are averaged in groups to the student's head count. Keys that are padding are
    masked out of both rows and each row is renormalised over the keys that remain; query
    positions count as the labels say.
    """

    name = "attention-kl"
    uses = "attention"

    class Options(kdistill.Options):
        pass

    def __call__(self, student, teacher, batch):
        pairs = sorted(student.attentions)
        if not pairs:
            raise ValueError("no mapped attention maps reached the loss")
        keys = batch.attention_mask.bool() if batch.attention_mask is not None else torch.ones_like(batch.labels, dtype=torch.bool)
        keys = keys[:, None, None, :]
        total = 0.0
        for layer in pairs:
            s = upcast(student.attentions[layer])
            t = group_heads(upcast(teacher.attentions[layer]).detach(), s.shape[1])
            s = s.masked_fill(~keys, 0.0)
            t = t.masked_fill(~keys, 0.0)
            s = s / s.sum(-1, keepdim=True).clamp(min=1e-30)
            t = t / t.sum(-1, keepdim=True).clamp(min=1e-30)
            log_s = torch.where(s > 0, s.clamp(min=1e-30).log(), torch.full_like(s, float("-inf")))
            log_t = torch.where(t > 0, t.clamp(min=1e-30).log(), torch.full_like(t, float("-inf")))
            per_query = kl_rows(log_t, log_s).mean(dim=1)  # [B, S]: mean over heads
            total = total + per_query[batch.mask].sum()
        return total / len(pairs)


@kdistill.hookimpl
def kd_register_losses():
    return [AttentionKL]
