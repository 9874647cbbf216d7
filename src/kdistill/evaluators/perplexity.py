"""Validation perplexity of the student and, once per run, of the teacher."""

from __future__ import annotations

import math

import torch

import kdistill
from kdistill.toolkit import model_dtype


def mean_nll(model, batches) -> tuple[float, int]:
    """Mean negative log-likelihood per counted token (float64 accumulation) and the count."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch.model_inputs(model_dtype(model)), use_cache=False).logits
            mask = batch.mask
            total += torch.nn.functional.cross_entropy(logits[mask].float(), batch.labels[mask], reduction="sum").double().item()
            count += int(mask.sum())
    model.train(was_training)
    return (total / count if count else float("nan")), count


def perplexity(loss: float) -> float:
    """exp(loss); inf for a loss past exp's range (a diverged model), never an OverflowError."""
    return math.exp(loss) if loss < 709.0 else math.inf


class Perplexity(kdistill.Evaluator):
    """exp(mean next-token cross-entropy) on the validation split, for student and teacher."""

    name = "perplexity"
    provides = ("val/student_loss", "val/student_ppl", "val/teacher_loss", "val/teacher_ppl")
    best_metric = "val/student_loss"

    class Options(kdistill.Options):
        teacher: bool = True

    def evaluate(self, context):
        loss, _ = mean_nll(context.student, context.val_batches())
        out = {"val/student_loss": loss, "val/student_ppl": perplexity(loss)}
        if self.options.teacher and context.teacher is not None and context.teacher.model is not None:
            if not hasattr(self, "_teacher_loss"):  # the teacher is frozen: measure it once
                self._teacher_loss, _ = mean_nll(context.teacher.model, context.val_batches())
            out.update({"val/teacher_loss": self._teacher_loss, "val/teacher_ppl": perplexity(self._teacher_loss)})
        return out


@kdistill.hookimpl
def kd_register_evaluators():
    return [Perplexity]
