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
        # value T^2 KL(p_t || p_s) = T^2 sum p_t (log p_t - log p_s), gradient T (p_s - p_t);
        # only the two chunks themselves live at chunk size, the value is summed in small row blocks
        temp = self.options.temperature
        log_pt = _log_softmax_(teacher.detach(), temp)
        log_ps = _log_softmax_(student.detach(), temp)
        values = torch.empty(log_pt.shape[0], dtype=log_pt.dtype, device=log_pt.device)
        for start in range(0, log_pt.shape[0], ROW_BLOCK):
            lt, ls = log_pt[start:start + ROW_BLOCK], log_ps[start:start + ROW_BLOCK]
            # bins where p_t is 0 count 0; log p_s is floored so a -inf student logit stays finite
            values[start:start + ROW_BLOCK] = (lt.exp() * (lt.clamp(min=LOG_FLOOR) - ls.clamp(min=LOG_FLOOR))).sum(-1)
        values.mul_(temp * temp)
        p_t = log_pt.exp_()
        return values, log_ps.exp_().sub_(p_t).mul_(temp)


ROW_BLOCK = 16  # rows per block of the value's temporaries


def _log_softmax_(x: torch.Tensor, temp: float) -> torch.Tensor:
    """log softmax(x / T), in place in x (rows of -inf everywhere stay -inf)."""
    shift = x.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    x.sub_(shift)
    if temp != 1.0:
        x.div_(temp)
    total = torch.empty_like(shift)
    for start in range(0, x.shape[0], ROW_BLOCK):
        total[start:start + ROW_BLOCK] = torch.logsumexp(x[start:start + ROW_BLOCK], dim=-1, keepdim=True)
    return x.sub_(total)


@kdistill.hookimpl
def kd_register_losses():
    return [ForwardKL]
