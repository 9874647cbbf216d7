"""Mean squared error between raw logits (as in early distillation work on logits)."""

from __future__ import annotations

import torch

import kdistill
from kdistill.plugins.losses.common import shared_vocab, upcast


class LogitMSE(kdistill.LogitLoss):
    """Mean over the shared vocabulary of (z_s - z_t)^2 per position; needs dense teacher logits.

    Tokens where either logit is infinite (ruled out) are left out of the mean; the squares are
    summed in float64, since logits near a half type's limit square past float32's range.
    """

    name = "logit-mse"

    class Options(kdistill.Options):
        pass

    def rows(self, student, teacher, labels):
        s, t = shared_vocab(student, upcast(teacher))
        finite = torch.isfinite(s) & torch.isfinite(t)
        diff = torch.where(finite, s - t, torch.zeros_like(s)).double()
        return (diff * diff).sum(-1) / finite.sum(-1).clamp(min=1)


@kdistill.hookimpl
def kd_register_losses():
    return [LogitMSE]
