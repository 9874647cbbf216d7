"""Logit losses straight from hidden states, in chunks of positions (the fused path).

For each chunk of c counted positions the student's logits [c, V] are projected, every logit loss
of the recipe gives its per-row values and its gradient with respect to those logits, and the
gradients of the hidden states and of the output projection are accumulated at once. So no
[tokens x vocabulary] tensor exists in forward or backward, only [c x V] ones. The backward pass
only scales the stored gradients by the incoming one.

A chunk's logits are stored vocabulary-major ([V, c] in memory, seen as its transpose [c, V]):
`W @ h.T` with few rows of h runs at full matrix-product speed on CPU BLAS, where `h @ W.T` loses
25-30% of it (benchmarks/chunk_parts.py), and the losses work through the vocabulary in blocks, which are then contiguous.
float32 chunks are computed into buffers made once per call (student, teacher, and one copy per
further loss that needs the student's chunk intact; a cross-entropy carried by another loss needs none).

How many positions a chunk holds: explicit `chunk` positions when given, else as many as fit a
memory budget (`memory_budget_mib`, default DEFAULT_MEMORY_BUDGET_MIB) for the chunk-sized float32
tensors that exist at once. Under autocast (or with half-precision weights) the four projection
products run in the low-precision dtype, the loss math in float32.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from kdistill.core.components import Batch, LogitLoss, ModelOutputs, SparseTargets

DEFAULT_CHUNK_ELEMENTS = 3 << 23  # about 96 MiB of float32 logits per chunk (192 positions at V=128,256)
# Memory for the chunk-sized tensors that exist at once (see chunk_tensors): 192 MiB gives forward KL,
# alone or carrying the cross-entropy, 192 positions at V=128,256 (2 x 96 MiB), which keeps the loss at
# about 0.11x naive PyTorch's memory there (docs/performance.md).
DEFAULT_MEMORY_BUDGET_MIB = 192.0
# On CUDA a chunk costs a fixed number of kernel launches whatever its size, so chunks must be large
# for the products to dominate: 1 GiB (e.g. 1024 positions of forward KL + CE at V=128,256 over 3
# float32 tensors would be 1.5 GiB; this gives 672). Not yet measured on a GPU (benchmarks/gpu_check.py).
CUDA_MEMORY_BUDGET_MIB = 1024.0
# Chunk-sized temporaries a loss without an analytic gradient (autograd through `rows`) makes: an
# estimate (log-softmax of both sides, probabilities, their gradients) used only to size chunks.
AUTOGRAD_CHUNK_TEMPORARIES = 4


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32 (the loss math); float32 and float64 stay."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def fused_supported(model: Any) -> bool:
    """A causal LM whose logits are exactly `final_hidden @ W.T` (no bias, scale or soft-capping)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    # a ZeRO-3 partitioned weight (ds_id) is whole only inside its module's forward: use full logits
    return (isinstance(head, nn.Linear) and head.bias is None and base is not None and base is not model
            and getattr(head.weight, "ds_id", None) is None
            and getattr(config, "final_logit_softcapping", None) is None and getattr(config, "logit_scale", None) is None
            and getattr(config, "logits_scaling", None) is None and not getattr(config, "output_multiplier_scale", None))


def model_dtype(model: Any) -> torch.dtype:
    """The dtype a model computes in (for masks built to match it)."""
    dtype = getattr(model, "dtype", torch.float32)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def final_hidden(model: Any, batch: Batch) -> ModelOutputs:
    """The last hidden states (after the final norm) and the output projection weight."""
    base = getattr(model, model.base_model_prefix)
    out = base(**batch.model_inputs(model_dtype(model)), use_cache=False)
    return ModelOutputs(final_hidden=out.last_hidden_state, output_weight=model.get_output_embeddings().weight)


def frozen_outputs(model: nn.Module, batch: Batch, needs) -> ModelOutputs:
    """A frozen model's outputs (a teacher's): final hidden states and output weight when the fused path
    asks for them and the model allows it, else full logits. no_grad rather than inference_mode:
    inference tensors may not be saved by the student's autograd graph, which the losses build from both."""
    with torch.no_grad():
        if needs.final_hidden and not needs.logits and fused_supported(model):
            return final_hidden(model, batch)
        out = model(**batch.model_inputs(model_dtype(model)), use_cache=False)
        return ModelOutputs(logits=out.logits)


def _round_rows(rows: int) -> int:
    """At least 8, and a multiple of 32 from 32 on (BLAS kernels work on tiles of 8-32 columns; a
    count just above a multiple leaves a slow remainder, see docs/performance.md)."""
    rows = max(8, rows)
    return rows - rows % 32 if rows >= 32 else rows


def default_chunk(vocab: int) -> int:
    """Positions per chunk sized for speed: DEFAULT_CHUNK_ELEMENTS logits, rounded down to a multiple of 32."""
    return _round_rows(DEFAULT_CHUNK_ELEMENTS // max(1, vocab))


def _analytic(loss: LogitLoss) -> bool:
    return type(loss).rows_and_grad is not LogitLoss.rows_and_grad


def carried_cross_entropy(losses: Sequence[tuple[str, float, LogitLoss]], compiled: bool = False) -> tuple[int, int] | None:
    """(carrier, cross-entropy): positions in `losses` of the one cross-entropy and of the first loss with a nonzero
    weight that can carry it along (LogitLoss.carries_cross_entropy), or None (also under `compiled`, which
    evaluates every loss's `rows` on its own)."""
    if compiled:
        return None
    ce = [i for i, (_, _, loss) in enumerate(losses) if loss.is_cross_entropy]
    carriers = [i for i, (_, weight, loss) in enumerate(losses) if loss.carries_cross_entropy and weight != 0]
    return (carriers[0], ce[0]) if len(ce) == 1 and carriers else None


def chunk_tensors(losses: Sequence[tuple[str, float, LogitLoss]], teacher_dense: bool = True, compiled: bool = False) -> int:
    """How many chunk-sized float32 tensors the fused path keeps at once for these losses: the
    student's chunk, the teacher's (when a loss needs a dense teacher), a copy of the student's chunk
    for every loss but the last (a cross-entropy carried by another loss needs none), a copy of the
    teacher's for every teacher user but the last, and AUTOGRAD_CHUNK_TEMPORARIES for each loss without
    an analytic gradient."""
    losses = list(losses)
    users = sum(1 for _, _, loss in losses if loss.needs_teacher)
    count = 1 + max(0, len(losses) - 1) - (carried_cross_entropy(losses, compiled) is not None)
    if teacher_dense and users:
        count += 1 + (users - 1)
    return count + AUTOGRAD_CHUNK_TEMPORARIES * sum(1 for _, _, loss in losses if not _analytic(loss))


def default_memory_budget(device: torch.device) -> float:
    """MiB for the chunk-sized tensors when no budget is given: CUDA_MEMORY_BUDGET_MIB on CUDA, else DEFAULT_MEMORY_BUDGET_MIB."""
    return CUDA_MEMORY_BUDGET_MIB if device.type == "cuda" else DEFAULT_MEMORY_BUDGET_MIB


def budget_chunk(vocab: int, tensors: int, memory_budget_mib: float = DEFAULT_MEMORY_BUDGET_MIB, element_bytes: int = 4) -> int:
    """Positions per chunk so that `tensors` chunk-sized tensors of `vocab` columns fit in the budget
    (at least 8; a multiple of 32 from 32 on)."""
    per_row = max(1, tensors) * max(1, vocab) * element_bytes
    return _round_rows(int(memory_budget_mib * 2**20) // per_row)


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

    @staticmethod
    def projected(rows: "TeacherRows", weight: torch.Tensor) -> "TeacherRows":
        """The same rows with another (e.g. low-precision) output weight for the projection."""
        if weight is rows.weight:
            return rows
        other = TeacherRows(None, rows.hidden)  # type: ignore[arg-type]  # filled in below
        other.hidden, other.weight = rows.hidden, weight
        return other

    def chunk(self, start: int, stop: int, buffer: torch.Tensor | None = None) -> torch.Tensor | SparseTargets | None:
        """The teacher's rows start:stop; projected logits go into `buffer` when one is given."""
        with torch.no_grad():
            if self.hidden is not None and self.weight is not None:
                return project(self.hidden[start:stop], self.weight, buffer)
            if self.logits is not None:
                return _upcast(self.logits[start:stop])
            if self.sparse is not None:
                return self.sparse.slice(start, stop)
        return None


def project(hidden: torch.Tensor, weight: torch.Tensor, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [n, V] of `hidden` [n, D], stored vocabulary-major, in float32 or wider; computed into
    `buffer` (flat, at least V * n elements, from chunk_buffer(weight, ...)) when one is given. A
    half-precision product is computed in its dtype and upcast into the buffer."""
    if buffer is None:
        return _upcast(weight @ hidden.T).T
    out = buffer[: weight.shape[0] * hidden.shape[0]].view(weight.shape[0], hidden.shape[0])
    if weight.dtype == buffer.dtype:
        return torch.matmul(weight, hidden.T.to(weight.dtype), out=out).T
    return out.copy_(weight @ hidden.T.to(weight.dtype)).T


def chunk_buffer(weight: torch.Tensor, chunk: int, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A flat buffer for one chunk's logits: in `dtype` when given, else for float32 and float64
    weights only (None for others: project() then upcasts a fresh product)."""
    if dtype is None:
        if weight.dtype not in (torch.float32, torch.float64):
            return None
        dtype = weight.dtype
    return torch.empty(chunk * weight.shape[0], dtype=dtype, device=weight.device)


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype in force for this device type, or None."""
    kind = device.type
    try:
        if torch.is_autocast_enabled(kind):
            return torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError, AttributeError):  # torch < 2.4 has the per-device functions only
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
    return None


_COMPILED: dict[int, tuple[LogitLoss, object]] = {}


def _compiled_rows_and_grad(loss: LogitLoss):
    """rows_and_grad with the loss's element-wise `rows` (value and autograd gradient) compiled by
    torch.compile: the row reductions and element-wise steps fuse into a few kernels instead of a
    tensor per step. One compiled function per loss object."""
    key = id(loss)
    cached = _COMPILED.get(key)
    if cached is None or cached[0] is not loss:
        rows = torch.compile(loss.rows, dynamic=None)

        def rows_and_grad(student, teacher, labels):
            with torch.enable_grad():
                leaf = student.detach().requires_grad_(True)
                values = rows(leaf, teacher, labels)
                (grad,) = torch.autograd.grad(values.sum(), leaf)
            return values.detach(), grad

        cached = _COMPILED[key] = (loss, rows_and_grad)
    return cached[1]


class _FusedLogitLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, teacher, labels, losses, chunk, compiled):  # noqa: D401 - autograd API
        n = hidden.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)  # gradients accumulate in at least float32
        # the projection products' dtype: autocast's when it is on for float32 weights (bfloat16 on
        # CUDA), else the weight's; the chunks themselves are always float32 or wider
        compute = _autocast_dtype(weight.device) if weight.dtype == torch.float32 else None
        compute = compute or weight.dtype
        w = weight.detach().to(compute)
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        terms = torch.zeros(len(losses), dtype=torch.float64, device=hidden.device)
        last_teacher_user = max((i for i, (_, _, loss) in enumerate(losses) if loss.needs_teacher), default=-1)
        rows = min(chunk, n)
        student_buffer = chunk_buffer(w, rows, acc)
        teacher_buffer = None
        if teacher.hidden is not None and last_teacher_user >= 0:
            t_acc = torch.promote_types(teacher.weight.dtype, torch.float32)
            t_compute = (_autocast_dtype(teacher.weight.device) if teacher.weight.dtype == torch.float32 else None) or teacher.weight.dtype
            teacher = TeacherRows.projected(teacher, teacher.weight.to(t_compute))
            teacher_buffer = chunk_buffer(teacher.weight, rows, t_acc)
        # a cross-entropy carried along by another loss runs in that loss's passes (no chunk copy, no passes of its own)
        carried = carried_cross_entropy(losses, compiled)
        order = [i for i in range(len(losses)) if carried is None or i != carried[1]]
        # copies for every loss but the last (each may overwrite its chunk), made once per call
        spare_student = [torch.empty_like(student_buffer) for _ in order[:-1]]
        spare_teacher: list[torch.Tensor] = []
        functions = [_compiled_rows_and_grad(loss) if compiled else loss.rows_and_grad for _, _, loss in losses]
        with torch.autocast(weight.device.type, enabled=False):
            for start in range(0, n, chunk):
                stop = min(n, start + chunk)
                h = hidden[start:stop].detach()
                logits = project(h, w, student_buffer)
                target = teacher.chunk(start, stop, teacher_buffer) if last_teacher_user >= 0 else None
                # the weighted gradient, kept as grad_logits x scale: the weights go into the products below
                grad_logits, scale = None, 0.0
                for position, i in enumerate(order):
                    _, weight_i, loss = losses[i]
                    # the last loss may overwrite the chunks in place; earlier ones get copies
                    own_logits = logits if position == len(order) - 1 else _copy_into(spare_student[position], logits)
                    own_target = None
                    if loss.needs_teacher:
                        if i == last_teacher_user or not isinstance(target, torch.Tensor):
                            own_target = target
                        else:
                            if not spare_teacher:
                                spare_teacher.append(torch.empty(target.numel(), dtype=target.dtype, device=target.device)
                                                     if teacher_buffer is None else torch.empty_like(teacher_buffer))
                            own_target = _copy_into(spare_teacher[0], target)
                    if carried is not None and i == carried[0]:
                        ce_weight = losses[carried[1]][1]
                        values, ce_values, g = loss.rows_and_grad_with_ce(own_logits, own_target, labels[start:stop],
                                                                          ce_weight / weight_i)
                        value = ce_values.sum().double()
                        terms[carried[1]] += value
                        total += ce_weight * value
                    else:
                        values, g = functions[i](own_logits, own_target, labels[start:stop])
                    del own_logits, own_target
                    value = values.sum().double()
                    terms[i] += value
                    total += weight_i * value
                    if weight_i != 0:
                        if grad_logits is None:
                            grad_logits, scale = g, weight_i
                        else:
                            grad_logits.add_(g, alpha=weight_i / scale)
                    del g, values
                del logits, target
                if grad_logits is not None:
                    if want_h:
                        grad_h[start:stop] = (grad_logits.to(compute) @ w).mul_(scale)
                    if want_w:
                        # float32 chunk gradient straight into the float32 accumulator; a low-precision
                        # product (autocast) goes through one [V, D] product in that dtype
                        if compute == acc or weight.device.type == "cpu":  # CPU: no fast half products on most
                            grad_w.addmm_(grad_logits.T, h.to(acc), alpha=scale)
                        else:
                            grad_w.add_(grad_logits.T.to(compute) @ h.to(compute), alpha=scale)
                del grad_logits, h
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
        return out_h, out_w, None, None, None, None, None


def _copy_into(buffer: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """A copy of `chunk` [c, V] (vocabulary-major or not) in the flat `buffer`, laid out the same way."""
    rows, vocab = chunk.shape
    if chunk.stride(0) == 1 and chunk.stride(1) == rows:  # vocabulary-major, as project() makes them
        return buffer[: rows * vocab].view(vocab, rows).copy_(chunk.T).T
    return buffer[: rows * vocab].view(rows, vocab).copy_(chunk)


def fused_logit_loss(hidden: torch.Tensor, weight: torch.Tensor, teacher: TeacherRows, labels: torch.Tensor,
                     losses: Sequence[tuple[str, float, LogitLoss]], chunk: int | None = None, *,
                     memory_budget_mib: float | None = None, compile: bool = False):
    """Weighted sum over counted rows of every logit loss, and each loss's own sum.

    `hidden` [N, D] are the student's final hidden states of the counted positions, `weight` [V, D]
    its output projection, `labels` [N]. Returns (total, {name: sum}) with `total` differentiable.

    `chunk`: positions per chunk; when given it wins over the budget. `memory_budget_mib`: MiB for
    the chunk-sized float32 tensors that exist at once (chunk_tensors(losses) of them); the chunk is
    the most positions that fit (a multiple of 32 from 32 on, at least 8); default
    DEFAULT_MEMORY_BUDGET_MIB on CPU, CUDA_MEMORY_BUDGET_MIB on CUDA. `compile`: run each loss's element-wise part (`rows` and its
    gradient) through torch.compile instead of the loss's own `rows_and_grad`.
    """
    losses = list(losses)
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk: positions per chunk must be a positive integer, got {chunk!r}")
    if memory_budget_mib is not None and not memory_budget_mib > 0:
        raise ValueError(f"memory_budget_mib: must be a positive number of MiB, got {memory_budget_mib!r}")
    if chunk is None:
        dense = teacher.sparse is None
        element_bytes = torch.promote_types(weight.dtype, torch.float32).itemsize
        chunk = budget_chunk(weight.shape[0], chunk_tensors(losses, dense, bool(compile)),
                             default_memory_budget(weight.device) if memory_budget_mib is None else memory_budget_mib,
                             element_bytes)
    total, terms = _FusedLogitLoss.apply(hidden, weight, teacher, labels, losses, chunk, bool(compile))
    return total, {name: terms[i].to(total.dtype) for i, (name, _, _) in enumerate(losses)}
