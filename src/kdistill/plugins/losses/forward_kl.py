"""Forward KL(teacher || student) at a temperature, scaled by T^2 (Hinton et al., 2015)."""

from __future__ import annotations

import torch

import kdistill
from kdistill import SparseTargets
from kdistill.plugins.losses.common import LOG_FLOOR, Divergence, kl_rows, log_normalizer, vocab_blocks


class ForwardKL(Divergence):
    """KL(teacher || student) on temperature-softened distributions, times T^2 (mode-covering)."""

    name = "forward-kl"

    def divergence(self, log_ps, log_pt):
        return kl_rows(log_pt, log_ps)

    def rows_and_grad(self, student, teacher, labels):
        if isinstance(teacher, SparseTargets) or student.shape[-1] != teacher.shape[-1] or student.dtype != teacher.dtype:
            return super().rows_and_grad(student, teacher, labels)
        # analytic, in blocks of the vocabulary, the gradient written over the student's chunk (the
        # fused path hands over chunks it no longer needs): value T^2 sum p_t (log p_t - log p_s),
        # gradient T (p_s - p_t). Only three block-sized temporaries, which stay in cache.
        temp = self.temperature
        s, t = student.detach(), teacher.detach()
        s_shift, s_log_total = log_normalizer(s, temp)
        t_shift, t_log_total = log_normalizer(t, temp)
        blocks = vocab_blocks(s)
        log_ps, log_pt, p_t = (torch.empty_like(s[:, blocks[0]]) for _ in range(3))
        values = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
        for b in blocks:
            width = b.stop - b.start
            ls, lt, pt = log_ps[:, :width], log_pt[:, :width], p_t[:, :width]
            _tempered(s[:, b], s_shift, s_log_total, temp, out=ls)
            _tempered(t[:, b], t_shift, t_log_total, temp, out=lt)
            torch.exp(lt, out=pt)
            grad = torch.exp(ls, out=s[:, b]).sub_(pt)
            if temp != 1.0:
                grad.mul_(temp)
            # bins where p_t is 0 count 0; log p_s is floored so a -inf student logit stays finite
            values += lt.clamp_(min=LOG_FLOOR).sub_(ls.clamp_(min=LOG_FLOOR)).mul_(pt).sum(dim=-1)
        return values.mul_(temp * temp), s


def _tempered(x, shift, log_total, temp, out):
    """log softmax(x / T) of a block, into `out`."""
    torch.sub(x, shift, out=out)
    if temp != 1.0:
        out.div_(temp)
    return out.sub_(log_total)


@kdistill.hookimpl
def kd_register_losses():
    return [ForwardKL]
