"""Small calculations behind `kdistill temperatures`, `kdistill kl` and `kdistill flops`.

Plain float64 arithmetic on a few numbers: what a reader of a distillation paper checks by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def softmax(logits: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [x / temperature for x in logits]
    top = max(scaled)
    exps = [math.exp(x - top) for x in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def entropy(probs: list[float]) -> float:
    """In nats; 0 log 0 counts 0."""
    return -sum(p * math.log(p) for p in probs if p > 0)


def temperature_table(logits: list[float], temperatures: list[float]) -> list[tuple[float, list[float], float]]:
    """(T, softmax(logits / T), its entropy in nats) for each T."""
    if any(t <= 0 for t in temperatures):
        raise ValueError("temperatures must be positive")
    return [(t, softmax(logits, t), entropy(softmax(logits, t))) for t in temperatures]


@dataclass
class KLSteps:
    temperature: float
    teacher_probs: list[float]
    student_log_probs: list[float]
    terms: list[float]  # p_t(i) * (log p_t(i) - log p_s(i))
    kl: float
    loss: float  # kl * T^2


def kl_steps(teacher_logits: list[float], student_logits: list[float], temperature: float) -> KLSteps:
    """The distillation loss between two logit vectors, one step at a time."""
    if len(teacher_logits) != len(student_logits):
        raise ValueError(f"the teacher gives {len(teacher_logits)} logits and the student {len(student_logits)}")
    if temperature <= 0:
        raise ValueError("the temperature must be positive")
    pt = softmax(teacher_logits, temperature)
    ps = softmax(student_logits, temperature)
    log_ps = [math.log(p) for p in ps]
    terms = [p * (math.log(p) - lq) if p > 0 else 0.0 for p, lq in zip(pt, log_ps)]
    kl = sum(terms)
    return KLSteps(temperature, pt, log_ps, terms, kl, kl * temperature ** 2)


@dataclass
class Flops:
    teacher_per_token: float
    student_per_token: float
    distill_total: float
    pretrain_total: float

    @property
    def ratio(self) -> float:
        return self.distill_total / self.pretrain_total


def distillation_flops(teacher_params: float, student_params: float, distill_tokens: float, pretrain_tokens: float) -> Flops:
    """Teacher forward 2P per token, student forward and backward 6P per token; pretraining the
    student from scratch costs 6P per token over `pretrain_tokens`."""
    teacher = 2 * teacher_params
    student = 6 * student_params
    return Flops(teacher, student, (teacher + student) * distill_tokens, student * pretrain_tokens)
