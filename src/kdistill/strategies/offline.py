"""Offline distillation: a frozen teacher, a trained student (the classic setting)."""

from __future__ import annotations

import kdistill
from kdistill.toolkit import LossStep, StepOptions


class Offline(kdistill.Strategy):
    """The teacher is frozen; the student minimises the weighted sum of the recipe's losses.

    Logit losses run on the fused path (chunks of positions straight from hidden states, no full
    logits) whenever the student's head is a plain linear layer; otherwise on full logits. Feature
    losses get the mapped layers' states through forward hooks, nothing more.
    """

    name = "offline"
    is_default = True

    class Options(StepOptions):
        pass

    def setup(self, context):
        super().setup(context)
        self.step = LossStep(context, self.options)

    def trainable(self):
        return {"student": self.context.student, **self.step.modules()}

    def loss(self, batch):
        return self.step(batch)


@kdistill.hookimpl
def kd_register_strategies():
    return [Offline]
