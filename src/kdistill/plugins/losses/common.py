"""Helpers shared by the logit losses: shared vocabulary, log-probabilities, sparse bins, divergences."""

from __future__ import annotations

import math

import torch

import kdistill
from kdistill import SparseTargets

# Log-probabilities below this count as this: a -inf logit then gives a large but finite loss and
# gradient instead of inf or nan. exp(-100) is far below float32 resolution of a probability.
LOG_FLOOR = -100.0


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def tempered_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T), shifted by the row maximum first so that logits near the dtype's
    limit do not overflow when divided by a temperature below 1."""
    shift = logits.detach().amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    return torch.log_softmax((logits - shift) / temperature, dim=-1)


# Elements per block of the vocabulary that the analytic losses work through at a time. On CPU
# about 1 MiB of float32, so that a block's temporaries stay in cache. On CUDA as large as lets a
# block and its three temporaries fit in the GPU's L2 cache (a power of two between 4 and 64 MiB of
# float32; 8 MiB on a 40-50 MiB L2 such as A100, H100, H200), and never more than
# MAX_ACCELERATOR_BLOCKS blocks per chunk: each operation there is a kernel launch of several
# microseconds, so many small blocks would make a chunk launch-bound. Other accelerators: 16 MiB.
# Either way no temporary is as large as a chunk of logits.
VOCAB_BLOCK_ELEMENTS = 1 << 18
ACCELERATOR_VOCAB_BLOCK_ELEMENTS = 1 << 22
MAX_ACCELERATOR_BLOCKS = 8
_CUDA_BLOCK_ELEMENTS: dict[int, int] = {}


def vocab_block_elements(device: torch.device) -> int:
    """Elements per vocabulary block on this device (see VOCAB_BLOCK_ELEMENTS)."""
    if device.type == "cpu":
        return VOCAB_BLOCK_ELEMENTS
    if device.type != "cuda":
        return ACCELERATOR_VOCAB_BLOCK_ELEMENTS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_BLOCK_ELEMENTS:
        l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 0
        fit = max(1, l2 // 16)  # the block and three float32 temporaries, 4 bytes each
        elements = 1 << (fit.bit_length() - 1)  # a power of two at most `fit`
        _CUDA_BLOCK_ELEMENTS[index] = min(1 << 24, max(1 << 20, elements)) if l2 else ACCELERATOR_VOCAB_BLOCK_ELEMENTS
    return _CUDA_BLOCK_ELEMENTS[index]


def vocab_blocks(x: torch.Tensor):
    """Slices of the last (vocabulary) dimension of `x` [rows, V], a block's worth of elements at a
    time (at most MAX_ACCELERATOR_BLOCKS blocks off the CPU)."""
    rows, vocab = max(1, x.shape[0]), x.shape[-1]
    step = max(1, vocab_block_elements(x.device) // rows)
    if x.device.type != "cpu":
        step = max(step, -(-vocab // MAX_ACCELERATOR_BLOCKS))
    return [slice(start, min(vocab, start + step)) for start in range(0, vocab, step)]


def log_normalizer(x: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(shift, log_total) [rows, 1] with log softmax(x / T) = (x - shift) / T - log_total.

    One pass over blocks of the vocabulary, each block's maximum and sum of exponentials taken while
    it is in cache, then combined; no temporary as large as `x` exists (a fused chunk can be
    hundreds of MiB). A row of -inf everywhere gets log_total = +inf: its probabilities are all 0
    rather than nan.
    """
    shift, (log_total,) = log_normalizers(x, (temperature,))
    return shift, log_total


def integer_ratio(high: float, low: float) -> int | None:
    """n when high / low is 2 or 3: exp(y / low) is then exp(y / high) ** n, a multiplication instead of another
    exponential (the exponentials are most of a pass's time on CPU; a power above 3 costs as much as one)."""
    ratio = high / low
    return int(ratio) if ratio in (2.0, 3.0) else None


def log_normalizers(x: torch.Tensor, temperatures) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """log_normalizer at several temperatures in the same single pass over `x`: one shift [rows, 1]
    (the row maximum) and a log_total [rows, 1] per temperature, so that a loss and the cross-entropy
    it carries along (rows_and_grad_with_ce) read the chunk once. A temperature the first one divides by
    2 or 3 (integer_ratio) takes powers of the first one's exponentials."""
    blocks = vocab_blocks(x)
    maxima = torch.empty(x.shape[0], len(blocks), dtype=x.dtype, device=x.device)
    sums = [torch.empty_like(maxima) for _ in temperatures]
    scratch = torch.empty_like(x[:, blocks[0]])
    other = torch.empty_like(scratch) if len(temperatures) > 1 else scratch
    first, rest = temperatures[0], list(enumerate(temperatures))[1:]
    powers = {j: integer_ratio(first, t) for j, t in rest}
    for i, b in enumerate(blocks):
        width = b.stop - b.start
        block, part, spare = x[:, b], scratch[:, :width], other[:, :width]
        block_max = block.amax(dim=-1, keepdim=True)
        maxima[:, i : i + 1] = block_max
        torch.sub(block, block_max.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0), out=part)
        for j, t in rest:  # the others' own exponentials first, while `part` is still x - max
            if powers[j] is None:
                torch.sum(torch.div(part, t, out=spare).exp_(), dim=-1, out=sums[j][:, i])
        if first != 1.0:
            part.div_(first)
        torch.sum(part.exp_(), dim=-1, out=sums[0][:, i])
        for j, _ in rest:
            if powers[j] is not None:
                torch.sum(torch.pow(part, powers[j], out=spare), dim=-1, out=sums[j][:, i])
    shift = maxima.amax(dim=-1, keepdim=True)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    offsets = maxima.sub_(shift)
    log_totals = []
    for temperature, row_sums in zip(temperatures, sums):
        # each block's sum rescaled from its own maximum to the row's; an all -inf block weighs 0
        total = row_sums.mul_(offsets.div(temperature).exp_()).sum(dim=-1, keepdim=True)
        log_totals.append(torch.where(total > 0, total.log(), torch.full_like(total, float("inf"))))
    return shift, log_totals


def cross_entropy_rows_and_grad(student: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy on the hard labels, analytic and in place: value logsumexp(z) - z_y, gradient
    softmax(z) - onehot(y), written over `student`; the normalizer comes from vocabulary blocks, so no
    temporary as large as the chunk exists."""
    z = student.detach()
    index = labels.unsqueeze(-1)
    shift, log_total = log_normalizer(z, 1.0)
    lse = shift + log_total
    values = (lse - z.gather(-1, index)).squeeze(-1)
    grad = z.sub_(lse).exp_()
    grad.scatter_add_(-1, index, torch.full_like(lse, -1.0))
    return values, grad


def shared_vocab(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vocabularies padded to different sizes (same tokenizer) are cut to the shared leading tokens."""
    if student.shape[-1] == teacher.shape[-1]:
        return student, teacher
    shared = min(student.shape[-1], teacher.shape[-1])
    return student[..., :shared], teacher[..., :shared]


def distribution_bins(student: torch.Tensor, teacher: torch.Tensor | SparseTargets, temperature: float):
    """Student and teacher log-probabilities at `temperature` over the same bins.

    Dense teacher: the shared vocabulary. Sparse teacher: its k tokens plus one tail bin holding
    all other tokens' mass, for both sides, so every divergence below applies unchanged and equals
    the dense one when k covers the vocabulary.
    """
    if not isinstance(teacher, SparseTargets):
        s, t = shared_vocab(student, upcast(teacher))
        return tempered_log_softmax(s, temperature), tempered_log_softmax(t, temperature)
    if not math.isclose(teacher.temperature, temperature, rel_tol=1e-6):
        raise ValueError(f"top-k targets were computed at temperature {teacher.temperature}; the loss asks for {temperature}")
    log_ps = tempered_log_softmax(student, temperature)
    ids = teacher.ids.long()
    top = log_ps.gather(-1, ids)
    rest = log_ps.scatter(-1, ids, float("-inf"))
    empty = torch.isneginf(rest).all(dim=-1, keepdim=True)
    tail = torch.where(empty, float("-inf"), torch.logsumexp(rest.masked_fill(empty, 0.0), dim=-1, keepdim=True))
    log_pt = torch.cat([upcast(teacher.logprobs), upcast(teacher.log_tail).unsqueeze(-1)], dim=-1)
    return torch.cat([top, tail], dim=-1), log_pt


def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row; bins where p is 0 count 0; q is floored at LOG_FLOOR."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q.clamp(min=LOG_FLOOR), torch.zeros_like(log_p))
    return (p * diff).sum(-1)


def mixture_log(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(weight_a * a + (1 - weight_a) * b), computed in log space.

    Where both are 0 the result is -inf with a zero gradient (torch.logaddexp's gradient is nan there).
    """
    a, b = log_a + math.log(weight_a), log_b + math.log1p(-weight_a)
    both = torch.isneginf(a) & torch.isneginf(b)
    return torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0)).masked_fill(both, float("-inf"))


TemperatureOptions = kdistill.TemperatureOptions  # the one declaration, in kdistill's core


class Divergence(kdistill.LogitLoss):
    """A divergence between the tempered distributions, times T^2; dense or top-k teacher."""

    supports_sparse = True

    class Options(TemperatureOptions):
        pass

    def divergence(self, log_ps: torch.Tensor, log_pt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rows(self, student, teacher, labels):
        temp = self.temperature
        log_ps, log_pt = distribution_bins(student, teacher, temp)
        return self.divergence(log_ps, log_pt) * (temp * temp)
