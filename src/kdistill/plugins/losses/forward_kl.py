"""Forward KL(teacher || student) at a temperature, scaled by T^2 (Hinton et al., 2015)."""

from __future__ import annotations

import math

import torch

import kdistill
from kdistill import SparseTargets
from kdistill.plugins.losses.common import LOG_FLOOR, Divergence, kl_rows, log_normalizer, upcast, vocab_blocks


class ForwardKL(Divergence):
    """KL(teacher || student) on temperature-softened distributions, times T^2 (mode-covering)."""

    name = "forward-kl"
    supports_sampled = True  # on sampled targets its gradient is the cross-entropy's to them: unbiased

    def divergence(self, log_ps, log_pt):
        return kl_rows(log_pt, log_ps)

    def rows(self, student, teacher, labels):
        values = super().rows(student, teacher, labels)
        offset = draws_offset(teacher) if isinstance(teacher, SparseTargets) else None
        return values if offset is None else values + offset.to(values.dtype) * (self.temperature ** 2)

    def rows_and_grad(self, student, teacher, labels):
        if isinstance(teacher, SparseTargets):
            return sparse_rows_and_grad(student, teacher, self.temperature)
        if student.shape[-1] != teacher.shape[-1] or student.dtype != teacher.dtype:
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


def sparse_rows_and_grad(student: torch.Tensor, targets: SparseTargets, temp: float):
    """Forward KL to sparse targets (k bins and a tail bin holding every other token), analytic and written over
    the student's chunk: no temporary as large as the chunk, two passes over it (the normalizer's read, then the
    gradient written block by block while in cache), as many as a cross-entropy's.

    value    T^2 [sum_k p_t (log p_t - log p_s) + p_t,tail (log p_t,tail - log p_s,tail)]
    gradient T (p_s - p_t) at the k tokens, T p_s (1 - p_t,tail / p_s,tail) at every other token
    (bins where p_t is 0 count 0; log p_s is floored at LOG_FLOOR, as in the autograd path).
    """
    if not math.isclose(targets.temperature, temp, rel_tol=1e-6):
        raise ValueError(f"top-k targets were computed at temperature {targets.temperature}; the loss asks for {temp}")
    s = student.detach()
    ids = targets.ids.long()
    log_pt, log_pt_tail = upcast(targets.logprobs).to(s.dtype), upcast(targets.log_tail).to(s.dtype)
    picked = s.gather(-1, ids)
    # the k tokens out, so that the normalizer's pass sums the student's tail alone (no 1 - sum cancellation)
    s.scatter_(-1, ids, -math.inf)
    shift, log_rest = log_normalizer(s, temp)
    log_rest = torch.where(log_rest == math.inf, torch.full_like(log_rest, -math.inf), log_rest)  # no tail: 0 mass
    scaled = picked.sub_(shift).div_(temp)
    log_total = torch.logaddexp(log_rest, torch.logsumexp(scaled, dim=-1, keepdim=True))
    log_total = torch.where(log_total == -math.inf, torch.full_like(log_total, math.inf), log_total)  # all -inf: p_s 0
    log_ps = scaled.sub_(log_total)
    log_ps_tail = (log_rest - log_total).squeeze(-1)
    pt, pt_tail = log_pt.exp(), log_pt_tail.exp()
    ratio = pt_tail / log_ps_tail.exp().clamp(min=torch.finfo(s.dtype).tiny)
    factor = (1.0 - ratio).mul_(temp).unsqueeze(-1)
    for b in vocab_blocks(s):  # T p_s (1 - p_t,tail / p_s,tail) at every other token, a block at a time
        _tempered(s[:, b], shift, log_total, temp, out=s[:, b]).exp_().mul_(factor)
    grad = s.scatter_(-1, ids, log_ps.exp().sub_(pt).mul_(temp))
    values = torch.where(pt > 0, pt * (log_pt - log_ps.clamp(min=LOG_FLOOR)), torch.zeros_like(pt)).sum(-1)
    values += torch.where(pt_tail > 0, pt_tail * (log_pt_tail - log_ps_tail.clamp(min=LOG_FLOOR)), torch.zeros_like(pt_tail))
    offset = draws_offset(targets)
    if offset is not None:
        values += offset.to(values.dtype)
    return values.mul_(temp * temp), grad


def draws_offset(targets: SparseTargets) -> torch.Tensor | None:
    """H(draws) - H(teacher) per position, for sampled targets that carry the teacher's entropy (else None).

    Added to the KL to the draws, sum p^ log p^ - sum p^ log p_s, it gives -H(teacher) - sum p^ log p_s: an
    unbiased estimate of the full KL (the cross-entropy term is unbiased, the entropy exact), where the KL to
    the draws is larger by about H(teacher) - H(draws), which grows with the temperature and shrinks with k.
    No student term: the gradient is unchanged."""
    if targets.kind != "sampled" or targets.entropy is None:
        return None
    log_p = upcast(targets.logprobs)
    p = log_p.exp()
    own = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
    return own - targets.entropy.float()


def _tempered(x, shift, log_total, temp, out):
    """log softmax(x / T) of a block, into `out`."""
    torch.sub(x, shift, out=out)
    if temp != 1.0:
        out.div_(temp)
    return out.sub_(log_total)


@kdistill.hookimpl
def kd_register_losses():
    return [ForwardKL]
