"""Logit losses straight from hidden states, in chunks of positions (the fused path).

For each chunk of c counted positions the student's logits [c, V] are projected, every logit loss
of the recipe gives its per-row values and its gradient with respect to those logits, and the
gradients of the hidden states and of the output projection are accumulated at once. So no
[tokens x vocabulary] tensor exists in forward or backward, only [c x V] ones. The backward pass
only scales the stored gradients by the incoming one.

A chunk's logits are stored vocabulary-major ([V, c] in memory, seen as its transpose [c, V]):
`W @ h.T` with few rows of h runs at full matrix-product speed on CPU BLAS, where `h @ W.T` loses
25-30% of it (benchmarks/chunk_parts.py), and the losses work through the vocabulary in blocks, which are then contiguous.
float32 chunks are computed into two buffers made once per call.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from kdistill.core.components import LogitLoss, ModelOutputs, SparseTargets

DEFAULT_CHUNK_ELEMENTS = 3 << 23  # about 96 MiB of float32 logits per chunk (192 positions at V=128,256)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32 (the loss math); float32 and float64 stay."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def fused_supported(model: nn.Module) -> bool:
    """A causal LM whose logits are exactly `final_hidden @ W.T` (no bias, scale or soft-capping)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    # a ZeRO-3 partitioned weight (ds_id) is whole only inside its module's forward: use full logits
    return (isinstance(head, nn.Linear) and head.bias is None and base is not None and base is not model
            and getattr(head.weight, "ds_id", None) is None
            and getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
            and getattr(config, "logits_scaling", None) is None and not getattr(config, "output_multiplier_scale", None))


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> ModelOutputs:
    """The last hidden states (after the final norm) and the output projection weight."""
    base = getattr(model, model.base_model_prefix)
    out = base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return ModelOutputs(final_hidden=out.last_hidden_state, output_weight=model.get_output_embeddings().weight)


def frozen_outputs(model: nn.Module, input_ids: torch.Tensor, attention_mask, needs) -> ModelOutputs:
    """A frozen model's outputs (a teacher's): final hidden states and output weight when the fused path
    asks for them and the model allows it, else full logits. no_grad rather than inference_mode:
    inference tensors may not be saved by the student's autograd graph, which the losses build from both."""
    with torch.no_grad():
        if needs.final_hidden and not needs.logits and fused_supported(model):
            return final_hidden(model, input_ids, attention_mask)
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return ModelOutputs(logits=out.logits)


def default_chunk(vocab: int) -> int:
    """Positions per chunk: DEFAULT_CHUNK_ELEMENTS logits, rounded down to a multiple of 32 (BLAS
    kernels work on tiles of 8-32 columns; a count just above a multiple leaves a slow remainder,
    see docs/performance.md)."""
    rows = max(8, DEFAULT_CHUNK_ELEMENTS // max(1, vocab))
    return rows - rows % 32 if rows >= 32 else rows


class TeacherRows:
    """The teacher's side of the counted positions, served chunk by chunk."""

    def __init__(self, teacher: ModelOutputs | None, mask: torch.Tensor):
        self.hidden = self.weight = self.logits = self.sparse = None
        if teacher is None:
            return
        if teacher.final_hidden is not None and teacher.output_weight is not None:
            self.hidden, self.weight = teacher.final_hidden[mask], teacher.output_weight
        elif teacher.logits is not None:
            self.logits = teacher.logits[mask]
        elif teacher.sparse is not None:
            self.sparse = teacher.sparse.rows(mask)
        else:
            raise ValueError("the teacher gave neither hidden states, logits nor top-k targets")

    def chunk(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor | SparseTargets | None:
        """The teacher's rows start:stop; projected logits go into `buffer` when one is given."""
        with torch.no_grad():
            if self.hidden is not None:
                return project(self.hidden[start:stop], self.weight, buffer)
            if self.logits is not None:
                return _upcast(self.logits[start:stop])
            if self.sparse is not None:
                return self.sparse.slice(start, stop)
        return None


def project(hidden: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [n, V] of `hidden` [n, D], stored vocabulary-major, in float32 or wider; computed into
    `buffer` (flat, at least V * n elements, from chunk_buffer(weight, ...)) when one is given."""
    if buffer is None:
        return _upcast(weight @ hidden.T).T
    out = buffer[: weight.shape[0] * hidden.shape[0]].view(weight.shape[0], hidden.shape[0])
    return torch.matmul(weight, hidden.T, out=out).T


def chunk_buffer(weight: torch.Tensor, chunk: int) -> torch.Tensor | None:
    """A flat buffer for one chunk's logits, for float32 and float64 weights (others are upcast anyway)."""
    if weight.dtype not in (torch.float32, torch.float64):
        return None
    return torch.empty(chunk * weight.shape[0], dtype=weight.dtype, device=weight.device)


class _FusedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher, labels, losses, chunk):  # noqa: D401 - autograd API
        n = hidden.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)  # gradients accumulate in at least float32
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        terms = torch.zeros(len(losses), dtype=torch.float64, device=hidden.device)
        last_teacher_user = max((i for i, (_, _, loss) in enumerate(losses) if loss.needs_teacher), default=-1)
        student_buffer = chunk_buffer(weight, min(chunk, n))
        teacher_buffer = chunk_buffer(teacher.weight, min(chunk, n)) if teacher.hidden is not None and last_teacher_user >= 0 else None
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            h = hidden[start:stop]
            logits = project(h, weight, student_buffer)
            target = teacher.chunk(start, stop, teacher_buffer) if last_teacher_user >= 0 else None
            grad_logits = None
            for i, (_, w, loss) in enumerate(losses):
                # the last loss may overwrite the chunks in place; earlier ones get copies
                own_logits = logits if i == len(losses) - 1 else logits.clone()
                own_target = None
                if loss.needs_teacher:
                    own_target = target if (i == last_teacher_user or not isinstance(target, torch.Tensor)) else target.clone()
                values, g = loss.rows_and_grad(own_logits, own_target, labels[start:stop])
                del own_logits, own_target
                value = values.sum().double()
                terms[i] += value
                total += w * value
                grad_logits = g.mul_(w) if grad_logits is None else grad_logits.add_(g, alpha=w)
            del logits, target
            g = grad_logits.to(weight.dtype)
            if want_h:
                grad_h[start:stop] = g @ weight
            if want_w:
                grad_w.addmm_(g.T.to(acc), h.to(acc))
        # kept as attributes, not saved tensors, so backward can hand them over without a copy
        ctx.grad_h, ctx.grad_w = grad_h, grad_w
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        ctx.mark_non_differentiable(terms)
        return total.to(acc), terms

    @staticmethod
    def backward(ctx, grad_total, grad_terms):
        grad_h, grad_w = ctx.grad_h, ctx.grad_w
        ctx.grad_h = ctx.grad_w = None
        out_h = grad_h.mul_(grad_total).to(ctx.hidden_dtype) if grad_h is not None else None
        out_w = grad_w.mul_(grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        del grad_h, grad_w
        return out_h, out_w, None, None, None, None


def fused_logit_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher: TeacherRows, labels: torch.Tensor,
                     losses: Sequence[tuple[str, float, LogitLoss]], chunk: int | None = None):
    """Weighted sum over counted rows of every logit loss, and each loss's own sum.

    `hidden` [N, D] are the student's final hidden states of the counted positions, `weight` [V, D]
    its output projection, `labels` [N]. Returns (total, {name: sum}) with `total` differentiable.
    """
    chunk = chunk or default_chunk(weight.shape[0])
    total, terms = _FusedLogitLoss.apply(hidden, weight, teacher, labels, list(losses), chunk)
    return total, {name: terms[i].to(total.dtype) for i, (name, _, _) in enumerate(losses)}
