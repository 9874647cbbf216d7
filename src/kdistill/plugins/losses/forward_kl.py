"""Forward KL(teacher || student) at a temperature, scaled by T^2 (Hinton et al., 2015)."""

from __future__ import annotations

import torch
from pydantic import Field

import kdistill
from kdistill.plugins.losses.common import counted_logits


class ForwardKL(kdistill.Loss):
    """KL(teacher || student) on temperature-softened distributions, times T^2."""

    name = "forward-kl"

    class Options(kdistill.Options):
        temperature: float = Field(1.0, gt=0, description="softening temperature T; the loss is scaled by T^2")

    def __call__(self, student, teacher, batch):
        s, t = counted_logits(student, teacher, batch)
        temp = self.options.temperature
        log_ps = torch.log_softmax(s / temp, dim=-1)
        log_pt = torch.log_softmax(t / temp, dim=-1)
        pt = log_pt.exp()
        # where the teacher gives a token no mass its term is 0 (0 * log 0 := 0), even at -inf logits
        per_token = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1)
        return per_token.sum() * (temp * temp)


@kdistill.hookimpl
def kd_register_losses():
    return [ForwardKL]
