"""Offline distillation: a frozen teacher, a trained student (the classic setting)."""

from __future__ import annotations

import kdistill


class Offline(kdistill.Strategy):
    """The teacher is frozen; the student minimises the weighted sum of the recipe's losses."""

    name = "offline"

    class Options(kdistill.Options):
        pass

    def setup(self, context):
        super().setup(context)
        self._teacher_needed = any(loss.needs_teacher for _, _, loss in context.losses)

    def trainable(self):
        return {"student": self.context.student}

    def loss(self, batch):
        ctx = self.context
        teacher_out = ctx.teacher.outputs(batch, ctx.needs) if (self._teacher_needed and ctx.teacher) else None
        out = ctx.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        student_out = kdistill.ModelOutputs(logits=out.logits)
        total = 0.0
        terms = {}
        for name, weight, loss in ctx.losses:
            value = loss(student_out, teacher_out, batch)
            terms[name] = value.detach()
            total = total + weight * value
        return total, terms


@kdistill.hookimpl
def kd_register_strategies():
    return [Offline]
