"""Forward KL(teacher || student) at a temperature, scaled by T^2 (Hinton et al., 2015)."""

from __future__ import annotations

import torch

import kdistill
from kdistill.core.components import SparseTargets
from kdistill.plugins.losses.common import Divergence, kl_rows, shared_vocab, tempered_log_softmax, upcast


class ForwardKL(Divergence):
    """KL(teacher || student) on temperature-softened distributions, times T^2 (mode-covering)."""

    name = "forward-kl"

    def divergence(self, log_ps, log_pt):
        return kl_rows(log_pt, log_ps)

    def rows_and_grad(self, student, teacher, labels):
        if isinstance(teacher, SparseTargets):
            return super().rows_and_grad(student, teacher, labels)
        # analytic: d/dz [T^2 KL(p_t || softmax(z/T))] = T (p_s - p_t), over the shared tokens
        temp = self.options.temperature
        full = student.shape[-1]
        s, t = shared_vocab(student.detach(), upcast(teacher))
        log_ps = tempered_log_softmax(s, temp)
        log_pt = tempered_log_softmax(t, temp)
        values = kl_rows(log_pt, log_ps) * (temp * temp)
        grad = log_ps.exp_().sub_(log_pt.exp_()).mul_(temp)
        if grad.shape[-1] != full:
            grad = torch.nn.functional.pad(grad, (0, full - grad.shape[-1]))
        return values, grad


@kdistill.hookimpl
def kd_register_losses():
    return [ForwardKL]
