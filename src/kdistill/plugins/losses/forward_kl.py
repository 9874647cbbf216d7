"""Forward KL(teacher || student) at a temperature, scaled by T^2 (Hinton et al., 2015)."""

from __future__ import annotations

import torch

import kdistill
from kdistill.core.components import SparseTargets
from kdistill.plugins.losses.common import LOG_FLOOR, Divergence, kl_rows


class ForwardKL(Divergence):
    """KL(teacher || student) on temperature-softened distributions, times T^2 (mode-covering)."""

    name = "forward-kl"

    def divergence(self, log_ps, log_pt):
        return kl_rows(log_pt, log_ps)

    def rows_and_grad(self, student, teacher, labels):
        if isinstance(teacher, SparseTargets) or student.shape[-1] != teacher.shape[-1] or student.dtype != teacher.dtype:
            return super().rows_and_grad(student, teacher, labels)
        # analytic and in place (the fused path hands over chunks it no longer needs):
        # value T^2 KL(p_t || p_s) = T^2 (sum p_t log p_t - sum p_t log p_s), gradient T (p_s - p_t);
        # at most four chunk-sized tensors live at once
        temp = self.options.temperature
        log_pt, p_t = _log_softmax_and_probs(teacher.detach(), temp)
        log_ps, p_s = _log_softmax_and_probs(student.detach(), temp)
        row_dot = lambda a, b: torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)  # noqa: E731
        values = (row_dot(p_t, log_pt) - row_dot(p_t, log_ps)) * (temp * temp)
        return values, p_s.sub_(p_t).mul_(temp)


def _log_softmax_and_probs(x: torch.Tensor, temp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log softmax(x / T) in place in x, floored at LOG_FLOOR so 0 * log 0 stays 0; softmax(x / T))."""
    shift = x.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    x.sub_(shift)
    if temp != 1.0:
        x.div_(temp)
    probs = x.exp()
    total = probs.sum(dim=-1, keepdim=True)
    probs.div_(total)
    return x.sub_(total.log_()).clamp_(min=LOG_FLOOR), probs


@kdistill.hookimpl
def kd_register_losses():
    return [ForwardKL]
