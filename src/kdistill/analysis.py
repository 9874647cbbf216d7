"""Small calculations behind `kdistill temperatures`, `kl`, `flops` and `zero-memory`, and `sweep`.

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


def signed_sum(values: list[float], digits: int = 6) -> str:
    """`a + b - c` with each term's own sign: `0.1 - 0.086`, never `0.1 + -0.086`."""
    text = ""
    for i, value in enumerate(values):
        shown = f"{value:.{digits}f}"
        if i == 0:
            text = shown
        elif shown.startswith("-"):
            text += f" - {shown[1:]}"
        else:
            text += f" + {shown}"
    return text


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


@dataclass
class ZeroMemory:
    stage: int
    student_bytes: float  # per GPU: weights, gradients and optimizer state of the student
    teacher_bytes: float  # per GPU: the teacher's weights (inference only)

    @property
    def total(self) -> float:
        return self.student_bytes + self.teacher_bytes


def zero_memory(teacher_params: float, student_params: float, gpus: int, teacher_partitioned: bool) -> list[ZeroMemory]:
    """Model-state memory per GPU for each ZeRO stage, as the ZeRO paper counts it for mixed-precision
    Adam: per student parameter 2 bytes of bf16 weights, 2 of bf16 gradients and 12 of float32 optimizer
    state (master weights, momentum, variance). Stage 1 partitions the 12, stage 2 also the gradients,
    stage 3 also the weights. The teacher holds only bf16 weights (2 bytes per parameter), on every GPU
    or partitioned with ZeRO-3. Activations and buffers are not counted."""
    n = float(gpus)
    s = float(student_params)
    student = {0: 16 * s, 1: 4 * s + 12 * s / n, 2: 2 * s + 14 * s / n, 3: 16 * s / n}
    teacher = 2 * float(teacher_params) / (n if teacher_partitioned else 1)
    return [ZeroMemory(stage, student[stage], teacher) for stage in range(4)]


# --------------------------------------------------------------------------- over a recipe's models


def split_sweep(overrides: list[str]) -> tuple[str, list, list[str]]:
    """The one `--set KEY=V1,V2,...` with several values, its values, and the other overrides."""
    from kdistill.core.config import parse_yaml
    from kdistill.core.errors import KdistillError

    swept, rest = [], []
    for item in overrides:
        key, sep, text = item.partition("=")
        if sep and "," in text and not text.strip().startswith(("[", "{")):
            values = [parse_yaml(v.strip(), f"--set {key}") for v in text.split(",")]
            swept.append((key.strip(), values))
        else:
            rest.append(item)
    if len(swept) != 1:
        raise KdistillError("sweep: give exactly one --set KEY=V1,V2,... with several values")
    return swept[0][0], swept[0][1], rest


def sweep_validation(recipe, key: str, values: list, overrides: list[str]) -> list[float]:
    """The recipe's training loss on the validation split for each value of a loss option
    (models as the recipe builds them, no training): the design document's temperature search."""
    import torch

    from kdistill.core.config import load_recipe, resolve
    from kdistill.core.engine import Engine
    from kdistill.core.errors import KdistillError
    from kdistill.core.plugins import make_plugin_manager
    from kdistill.core.registry import Registry
    from kdistill.core.schedule import value_at

    if not key.startswith("losses["):
        raise KdistillError(f"sweep: a validation pass can vary only a loss option, not {key}; add --train for short runs")
    pm = make_plugin_manager()
    registry = Registry.from_plugins(pm)
    plans = [resolve(load_recipe(recipe, [*overrides, f"{key}={v}"]), registry) for v in values]
    engine = Engine(plans[0], pm, registry)
    engine.build()
    scores = []
    for plan in plans:
        steps = plan.recipe.train.steps  # a scheduled weight at its first step
        engine.context.losses = [(item.entry.name, value_at(item.weight, 0, steps), item.build()) for item in plan.components["losses"]]
        engine.strategy.setup(engine.context)
        total, count = 0.0, 0
        engine.student.eval()
        with torch.no_grad():
            for batch in engine.val_batches():
                engine.context.total_tokens = max(1, int(batch.mask.sum()))
                loss, _ = engine.strategy.loss(batch)
                total += float(loss)
                count += int(batch.mask.sum())
        scores.append(total / max(count, 1))
    return scores


def sweep_training(recipe, key: str, values: list, overrides: list[str], output_dir: str) -> tuple[list[float], str]:
    """A short run of the recipe per value; the score is the final value of its best metric."""
    from pathlib import Path

    from kdistill.core.engine import run_recipe

    scores, metric = [], "val/student_loss"
    for value in values:
        out = Path(output_dir) / "sweep" / f"{key}={value}"
        summary = run_recipe(recipe, overrides=[*overrides, f"{key}={value}", f"output_dir={out}"], overwrite=True)
        metric = summary.get("best_metric") or metric
        scores.append(float(summary["after"].get(metric, float("nan"))))
    return scores, metric
