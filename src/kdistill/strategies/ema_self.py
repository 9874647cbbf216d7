"""EMA self-distillation: the teacher is an exponential moving average of the student (design 5.2)."""

from __future__ import annotations

import copy

import torch
from pydantic import Field

import kdistill
from kdistill.toolkit import LossStep, StepOptions, frozen_outputs


class EMASelf(kdistill.Strategy):
    """The student learns from a moving average of its own weights, updated after every optimizer step;
    the average is a smoother, better calibrated model than any single step. The average is kept in
    checkpoints, so a resumed run continues it exactly. No external teacher runs."""

    name = "ema-self"
    no_lora = "its teacher is an average of the student's whole weights, not of adapters"
    needs_teacher = False

    class Options(StepOptions):
        decay: float = Field(0.99, gt=0, lt=1, description="weight of the old average at each update")

    def setup(self, context):
        if any(isinstance(loss, kdistill.FeatureLoss) for _, _, loss in context.losses):
            raise kdistill.KdistillError("losses: ema-self takes logit losses only")
        super().setup(context)
        self.ema = copy.deepcopy(context.student)
        self.ema.requires_grad_(False)
        self.ema.eval()
        self.step = LossStep(context, self.options, self.teacher_outputs)

    def trainable(self):
        return {"student": self.context.student, **self.step.modules(), "ema": self.ema}

    def loss(self, batch):
        return self.step(batch)

    def teacher_outputs(self, batch, needs):
        return frozen_outputs(self.ema, batch, needs)

    @torch.no_grad()
    def after_step(self) -> None:
        decay = self.options.decay
        for average, current in zip(self.ema.parameters(), self.context.student.parameters()):
            average.mul_(decay).add_(current.detach().to(average.dtype), alpha=1 - decay)


@kdistill.hookimpl
def kd_register_strategies():
    return [EMASelf]
