"""Reverse KL estimated from the sampled tokens alone: the on-policy loss that needs only the teacher's
log-probability of each token the student sampled."""

from __future__ import annotations

import torch

import kdistill
from kdistill import ConfigError, SparseTargets
from kdistill.plugins.losses.common import LOG_FLOOR, upcast


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per row (differentiable)."""
    return (logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)).clamp_min(LOG_FLOOR)


class SampledReverseKL(kdistill.LogitLoss):
    """Per token y the student sampled: log p_s(y) - log p_t(y), a one-sample estimate of KL(student ||
    teacher) at that position. Its gradient is the policy-gradient (REINFORCE) one, with the per-token
    reverse KL as the (negative) reward: (log p_s(y) - log p_t(y)) * d log p_s(y); in expectation over
    y ~ p_s that is the gradient of the full reverse KL. Unbiased only on the student's own samples at
    temperature 1 (strategy on-policy); it needs the teacher's log-probability of the sampled token only,
    which a served teacher returns."""

    name = "sampled-reverse-kl"
    supports_sparse = True

    class Options(kdistill.Options):
        pass

    def rows(self, student, teacher, labels):
        log_ps = label_logprobs(upcast(student), labels)
        if isinstance(teacher, SparseTargets):
            if teacher.label_logprobs is not None:  # the teacher gave each actual next token's (a served one)
                return self._estimate(log_ps, upcast(teacher.label_logprobs))
            if teacher.temperature != 1:
                raise ConfigError(f"losses: sampled-reverse-kl needs the teacher's log-probabilities at temperature 1, "
                                 f"not {teacher.temperature}")
            found = teacher.ids.long() == labels.unsqueeze(-1)
            if not bool(found.any(-1).all()):
                raise ConfigError("losses: sampled-reverse-kl: a sampled token is not among the teacher's top-k "
                                  "log-probabilities (it needs the log-probability of every token it is given)")
            log_pt = torch.where(found, upcast(teacher.logprobs), torch.zeros_like(upcast(teacher.logprobs))).sum(-1)
        elif teacher is not None:
            log_pt = label_logprobs(upcast(teacher).detach(), labels)
        else:
            raise ValueError("loss 'sampled-reverse-kl' needs a teacher")
        return self._estimate(log_ps, log_pt)

    @staticmethod
    def _estimate(log_ps: torch.Tensor, log_pt: torch.Tensor) -> torch.Tensor:
        penalty = (log_ps - log_pt).detach()
        surrogate = penalty * log_ps
        return penalty + surrogate - surrogate.detach()  # the value: the estimate; the gradient: REINFORCE's


@kdistill.hookimpl
def kd_register_losses():
    return [SampledReverseKL]
