"""Online distillation: teacher and student train together on the same batches (design section 4.2)."""

from __future__ import annotations

import torch
from pydantic import Field

import kdistill
from kdistill import KdistillError
from kdistill.toolkit import model_dtype, weighted_losses


class Online(kdistill.Strategy):
    """The teacher trains on hard labels while the student learns from the teacher's detached output,
    each at its own learning rate and clipped on its own; the teacher's distribution moves from soft to
    confident as it trains, a curriculum for the student."""

    name = "online"
    no_lora = "it trains the teacher too, and a LoRA student's adapters are the student's alone"

    class Options(kdistill.Options):
        teacher_lr_scale: float = Field(0.2, gt=0, description="the teacher's learning rate as a multiple of train.lr")
        teacher_weight: float = Field(1.0, ge=0, description="weight of the teacher's cross-entropy in the summed loss")

    def setup(self, context):
        super().setup(context)
        if any(not isinstance(loss, kdistill.LogitLoss) for _, _, loss in context.losses):
            raise KdistillError("losses: the online strategy takes logit losses only (the teacher's hidden states move)")
        teacher = context.teacher.model
        # bitsandbytes layers cannot train (a GGUF teacher is dequantized on loading and can)
        if any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in teacher.modules()):
            raise KdistillError("teacher.options.quantization: an online teacher trains, so it cannot be quantized")
        teacher.train()
        teacher.requires_grad_(True)
        self.teacher = teacher

    def trainable(self):
        return {"student": self.context.student, "teacher": self.teacher}

    def param_groups(self):
        return [{"name": "student", "params": list(self.context.student.parameters()), "lr_scale": 1.0},
                {"name": "teacher", "params": list(self.teacher.parameters()), "lr_scale": self.options.teacher_lr_scale}]

    def loss(self, batch):
        ctx = self.context
        kwargs = {**batch.model_inputs(model_dtype(ctx.student)), "use_cache": False}
        mask = batch.mask
        teacher_logits = self.teacher(**kwargs).logits
        teacher_ce = torch.nn.functional.cross_entropy(teacher_logits[mask].float(), batch.labels[mask], reduction="sum")
        student = kdistill.ModelOutputs(logits=ctx.student(**kwargs).logits)
        teacher = kdistill.ModelOutputs(logits=teacher_logits.detach())  # no gradient from the student's loss
        total, terms = weighted_losses(student, teacher, batch, ctx.losses)
        terms["teacher_ce"] = teacher_ce.detach()
        return total + self.options.teacher_weight * teacher_ce, terms


@kdistill.hookimpl
def kd_register_strategies():
    return [Online]
