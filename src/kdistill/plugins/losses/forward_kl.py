"""Forward KL(teacher || student) at a temperature, scaled by T^2 (Hinton et al., 2015)."""

from __future__ import annotations

import math

import torch

import kdistill
from kdistill import SparseTargets
from kdistill.plugins.losses.common import (
    LOG_FLOOR,
    Divergence,
    cross_entropy_rows_and_grad,
    integer_ratio,
    kl_rows,
    log_normalizer,
    log_normalizers,
    upcast,
    vocab_blocks,
)


class ForwardKL(Divergence):
    """KL(teacher || student) on temperature-softened distributions, times T^2 (mode-covering)."""

    name = "forward-kl"
    supports_sampled = True  # on sampled targets its gradient is the cross-entropy's to them: unbiased
    carries_cross_entropy = True  # rows_and_grad_with_ce: the cross-entropy in forward KL's own passes

    def divergence(self, log_ps, log_pt):
        return kl_rows(log_pt, log_ps)

    def rows(self, student, teacher, labels):
        values = super().rows(student, teacher, labels)
        offset = draws_offset(teacher) if isinstance(teacher, SparseTargets) else None
        return values if offset is None else values + offset.to(values.dtype) * (self.temperature ** 2)

    def rows_and_grad(self, student, teacher, labels):
        values, _, grad = self._rows_and_grad(student, teacher, labels, None)
        return values, grad

    def rows_and_grad_with_ce(self, student, teacher, labels, ce_scale):
        return self._rows_and_grad(student, teacher, labels, ce_scale)

    def _rows_and_grad(self, student, teacher, labels, ce_scale):
        """(rows, cross-entropy rows or None, gradient [+ ce_scale x the cross-entropy's]) in two passes."""
        ce_labels = labels if ce_scale is not None else None
        if isinstance(teacher, SparseTargets):
            return sparse_rows_and_grad(student, teacher, self.temperature, ce_labels, ce_scale or 0.0)
        if student.shape[-1] == teacher.shape[-1] and student.dtype == teacher.dtype:
            return dense_rows_and_grad(student, teacher, self.temperature, ce_labels, ce_scale or 0.0)
        # the autograd path (vocabularies padded to different sizes), the cross-entropy beside it
        ce = cross_entropy_rows_and_grad(student.clone(), labels) if ce_scale is not None else None
        values, grad = super().rows_and_grad(student, teacher, labels)
        return (values, None, grad) if ce is None else (values, ce[0], grad.add_(ce[1], alpha=ce_scale))


def dense_rows_and_grad(student: torch.Tensor, teacher: torch.Tensor, temp: float, labels: torch.Tensor | None = None,
                        ce_scale: float = 0.0):
    """Forward KL to dense teacher logits, analytic, in blocks of the vocabulary, the gradient written over the
    student's chunk (the fused path hands over chunks it no longer needs): value T^2 sum p_t (log p_t - log p_s),
    gradient T (p_s - p_t). Only three block-sized temporaries (four with `labels`), which stay in cache.

    With `labels`: also the cross-entropy on them, its rows returned and ce_scale x its gradient
    (softmax(z) - onehot) added, in the same passes (else the cross-entropy rows are None)."""
    s, t = student.detach(), teacher.detach()
    with_ce = labels is not None
    temps = (temp,) if not with_ce or temp == 1.0 else (temp, 1.0)
    s_shift, s_log_totals = log_normalizers(s, temps)
    s_log_total = s_log_totals[0]
    t_shift, t_log_total = log_normalizer(t, temp)
    blocks = vocab_blocks(s)
    log_ps, log_pt, p_t = (torch.empty_like(s[:, blocks[0]]) for _ in range(3))
    values = torch.zeros(s.shape[0], dtype=s.dtype, device=s.device)
    ce_values = lse = p_s1 = None
    if with_ce:
        lse = s_shift + s_log_totals[-1]
        index = labels.unsqueeze(-1)
        ce_values = (lse - s.gather(-1, index)).squeeze(-1)
        p_s1 = torch.empty_like(log_ps) if len(temps) > 1 else None
    for b in blocks:
        width = b.stop - b.start
        ls, lt, pt = log_ps[:, :width], log_pt[:, :width], p_t[:, :width]
        _tempered(s[:, b], s_shift, s_log_total, temp, out=ls)
        _tempered(t[:, b], t_shift, t_log_total, temp, out=lt)
        torch.exp(lt, out=pt)
        ce_block = torch.sub(s[:, b], lse, out=p_s1[:, :width]).exp_() if p_s1 is not None else None
        grad = torch.exp(ls, out=s[:, b])
        if with_ce and ce_block is None:  # T = 1: the cross-entropy's softmax is p_s itself
            grad.mul_(1.0 + ce_scale)
        grad.sub_(pt)
        if temp != 1.0:
            grad.mul_(temp)
        if ce_block is not None:
            grad.add_(ce_block, alpha=ce_scale)
        # bins where p_t is 0 count 0; log p_s is floored so a -inf student logit stays finite
        values += lt.clamp_(min=LOG_FLOOR).sub_(ls.clamp_(min=LOG_FLOOR)).mul_(pt).sum(dim=-1)
    if with_ce:
        s.scatter_add_(-1, index, torch.full_like(lse, -ce_scale))
    return values.mul_(temp * temp), ce_values, s


def sparse_rows_and_grad(student: torch.Tensor, targets: SparseTargets, temp: float, labels: torch.Tensor | None = None,
                         ce_scale: float = 0.0):
    """Forward KL to sparse targets (k bins and a tail bin holding every other token), analytic and written over
    the student's chunk: no temporary as large as the chunk, two passes over it (the normalizer's read, then the
    gradient written block by block while in cache), as many as a cross-entropy's.

    value    T^2 [sum_k p_t (log p_t - log p_s) + p_t,tail (log p_t,tail - log p_s,tail)]
    gradient T (p_s - p_t) at the k tokens, T p_s (1 - p_t,tail / p_s,tail) at every other token
    (bins where p_t is 0 count 0; log p_s is floored at LOG_FLOOR, as in the autograd path).

    With `labels`: also the cross-entropy on them, its rows returned and ce_scale x its gradient
    (softmax(z) - onehot) added, in the same two passes (else the cross-entropy rows are None).
    Returns (rows, cross-entropy rows, gradient).
    """
    if not math.isclose(targets.temperature, temp, rel_tol=1e-6):
        raise ValueError(f"top-k targets were computed at temperature {targets.temperature}; the loss asks for {temp}")
    s = student.detach()
    ids = targets.ids.long()
    with_ce = labels is not None
    log_pt, log_pt_tail = upcast(targets.logprobs).to(s.dtype), upcast(targets.log_tail).to(s.dtype)
    picked = s.gather(-1, ids)
    label_logits = s.gather(-1, labels.unsqueeze(-1)) if with_ce else None
    # the k tokens out, so that the normalizer's pass sums the student's tail alone (no 1 - sum cancellation)
    s.scatter_(-1, ids, -math.inf)
    temps = (temp,) if not with_ce or temp == 1.0 else (temp, 1.0)
    shift, log_rests = log_normalizers(s, temps)
    centered = picked.sub_(shift)

    def log_whole(log_rest, t):  # log of the sum over every token (the tail's and the k tokens') at temperature t
        log_rest = torch.where(log_rest == math.inf, torch.full_like(log_rest, -math.inf), log_rest)  # no tail: 0 mass
        log_total = torch.logaddexp(log_rest, torch.logsumexp(centered / t, dim=-1, keepdim=True))
        return log_rest, torch.where(log_total == -math.inf, torch.full_like(log_total, math.inf), log_total)  # all -inf: p_s 0

    log_rest, log_total = log_whole(log_rests[0], temp)
    log_ps = centered.div(temp).sub_(log_total)
    log_ps_tail = (log_rest - log_total).squeeze(-1)
    pt, pt_tail = log_pt.exp(), log_pt_tail.exp()
    ratio = pt_tail / log_ps_tail.exp().clamp(min=torch.finfo(s.dtype).tiny)
    factor = (1.0 - ratio).mul_(temp).unsqueeze(-1)
    at_ids = log_ps.exp().sub_(pt).mul_(temp)
    ce_values = log_total_1 = None
    if with_ce:
        log_total_1 = log_total if len(temps) == 1 else log_whole(log_rests[1], 1.0)[1]
        ce_values = (shift + log_total_1 - label_logits).squeeze(-1)
        at_ids.add_(centered.sub(log_total_1).exp_(), alpha=ce_scale)
    blocks = vocab_blocks(s)
    scratch = torch.empty_like(s[:, blocks[0]]) if len(temps) > 1 else None
    power = integer_ratio(temp, 1.0) if scratch is not None else None
    if power is not None:  # e = exp((z - shift) / T): forward KL's term is e a, the cross-entropy's e^T b
        a, b_ce = factor * (-log_total).exp(), ce_scale * (-log_total_1).exp()
    for b in blocks:  # T p_s (1 - p_t,tail / p_s,tail) at every other token, a block at a time
        block, spare = s[:, b], None if scratch is None else scratch[:, : b.stop - b.start]
        if spare is None:  # forward KL alone, or at T = 1 where the cross-entropy's softmax is p_s itself
            _tempered(block, shift, log_total, temp, out=block).exp_().mul_(factor + ce_scale if with_ce else factor)
        elif power is not None:
            e = block.sub_(shift).div_(temp).exp_()
            torch.pow(e, power, out=spare).mul_(b_ce)
            e.mul_(a).add_(spare)
        else:
            kl = _tempered(block, shift, log_total, temp, out=spare).exp_().mul_(factor)
            torch.add(kl, _tempered(block, shift, log_total_1, 1.0, out=block).exp_(), alpha=ce_scale, out=block)
    grad = s.scatter_(-1, ids, at_ids)
    if with_ce:
        grad.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(label_logits, -ce_scale))
    values = torch.where(pt > 0, pt * (log_pt - log_ps.clamp(min=LOG_FLOOR)), torch.zeros_like(pt)).sum(-1)
    values += torch.where(pt_tail > 0, pt_tail * (log_pt_tail - log_ps_tail.clamp(min=LOG_FLOOR)), torch.zeros_like(pt_tail))
    offset = draws_offset(targets)
    if offset is not None:
        values += offset.to(values.dtype)
    return values.mul_(temp * temp), ce_values, grad


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
