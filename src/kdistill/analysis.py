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


def teacher_report(plan, text: str, top_k: int = 10, max_batches: int | None = None):
    """The teacher's top-k next tokens after `text`, its entropy there, and the per-position
    entropies (nats) over the recipe's validation split. Returns (rows, entropy, entropies)."""
    import torch

    from kdistill.core.errors import KdistillError

    resolved = plan.one("teacher")
    if resolved is None:
        raise KdistillError("teacher: the recipe has no teacher to analyse")
    teacher = resolved.build()
    teacher.load(torch.device("cpu"))
    model, tok = teacher.model, teacher.tokenizer
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise KdistillError("--text: gives no tokens")
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, -1].double()
    probs = torch.softmax(logits, -1)
    top = probs.topk(top_k)
    rows = [(i + 1, tok.decode([int(t)]), float(p)) for i, (p, t) in enumerate(zip(top.values, top.indices))]
    here = float(-(probs * probs.clamp(min=1e-300).log()).sum())
    data = plan.one("data").build()
    data.setup(tok, plan.recipe.train.seed)
    entropies: list[float] = []
    with torch.no_grad():
        for n, batch in enumerate(data.val_batches(plan.recipe.train.eval_batch_size or plan.recipe.train.batch_size)):
            if max_batches is not None and n >= max_batches:
                break
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits[batch.mask].double()
            logp = torch.log_softmax(out, -1)
            entropies += (-(logp.exp() * logp).sum(-1)).tolist()
    return rows, here, entropies


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

    if not key.startswith("losses["):
        raise KdistillError(f"sweep: a validation pass can vary only a loss option, not {key}; add --train for short runs")
    pm = make_plugin_manager()
    registry = Registry.from_plugins(pm)
    plans = [resolve(load_recipe(recipe, [*overrides, f"{key}={v}"]), registry) for v in values]
    engine = Engine(plans[0], pm, registry)
    engine._build()
    scores = []
    for plan in plans:
        engine.context.losses = [(item.entry.name, item.weight, item.build()) for item in plan.components["losses"]]
        engine.strategy.setup(engine.context)
        total, count = 0.0, 0
        engine.student.eval()
        with torch.no_grad():
            for batch in engine._val_batches():
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


def teacher_check(plan, max_batches: int | None = None) -> dict[str, float]:
    """A quantized `hf` teacher beside its full-precision self on the validation split: perplexity of
    each, KL(full || quantized) and top-1 agreement per position, and the weights' memory."""
    import torch

    from kdistill.core.errors import ConfigError
    from kdistill.evaluators.agreement import agreement_sums
    from kdistill.plugins.teachers.hf import HFTeacher

    resolved = plan.one("teacher")
    if resolved is None or not issubclass(resolved.entry.cls, HFTeacher):
        raise ConfigError("teacher: teacher-check compares an `hf` teacher loaded quantized with its full-precision self")
    if resolved.options.quantization == "none":
        raise ConfigError("teacher.options.quantization: the recipe's teacher is not quantized (set nf4, fp4 or int8); "
                          "nothing to compare")
    if plan.recipe.train.num_threads:
        torch.set_num_threads(plan.recipe.train.num_threads)
    device = torch.device("cpu")
    full = HFTeacher(resolved.options.model_copy(update={"quantization": "none"}))
    full.load(device)
    quant = resolved.build()
    quant.load(device)
    data = plan.one("data").build()
    data.setup(full.tokenizer, plan.recipe.train.seed)
    sums = {"nll_full": 0.0, "nll_quant": 0.0, "kl": 0.0, "agree": 0.0}
    count = 0
    with torch.no_grad():
        for n, batch in enumerate(data.val_batches(plan.recipe.train.eval_batch_size or plan.recipe.train.batch_size)):
            if max_batches is not None and n >= max_batches:
                break
            kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
            mask = batch.mask
            a, b = full.model(**kwargs).logits[mask].double(), quant.model(**kwargs).logits[mask].double()
            labels = batch.labels[mask]
            sums["nll_full"] += float(torch.nn.functional.cross_entropy(a, labels, reduction="sum"))
            sums["nll_quant"] += float(torch.nn.functional.cross_entropy(b, labels, reduction="sum"))
            agreement = agreement_sums(b, a, k=1, temperature=1.0)  # KL(full || quantized), top-1 match
            sums["kl"] += agreement["kl"]
            sums["agree"] += agreement["top1"]
            count += int(mask.sum())
    if count == 0:
        raise ConfigError("data: the validation split is empty; teacher-check needs validation data")
    return {"positions": count, "full_ppl": math.exp(sums["nll_full"] / count), "quant_ppl": math.exp(sums["nll_quant"] / count),
            "kl_full_quant": sums["kl"] / count, "top1_agreement": sums["agree"] / count,
            "full_mib": full.model.get_memory_footprint() / 2**20, "quant_mib": quant.model.get_memory_footprint() / 2**20,
            "quantization": resolved.options.quantization}
