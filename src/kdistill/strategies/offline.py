"""Offline distillation: a frozen teacher, a trained student (the classic setting)."""

from __future__ import annotations

import logging

from pydantic import Field

import kdistill
from kdistill.core.fused import TeacherRows, final_hidden, fused_logit_loss, fused_supported

log = logging.getLogger("kdistill")


class Offline(kdistill.Strategy):
    """The teacher is frozen; the student minimises the weighted sum of the recipe's losses.

    Logit losses run on the fused path (chunks of positions straight from hidden states, no full
    logits) whenever the student's head is a plain linear layer; otherwise on full logits.
    """

    name = "offline"

    class Options(kdistill.Options):
        fused: bool = Field(True, description="compute logit losses in chunks from hidden states when the model allows")
        chunk_tokens: int | None = Field(None, ge=1, description="positions per chunk on the fused path (default: ~32 MiB of logits)")

    def setup(self, context):
        super().setup(context)
        self._teacher_needed = any(loss.needs_teacher for _, _, loss in context.losses)
        self._logit_losses = [item for item in context.losses if isinstance(item[2], kdistill.LogitLoss)]
        self._other_losses = [item for item in context.losses if not isinstance(item[2], kdistill.LogitLoss)]
        # a plain loss reading full logits would need them anyway: then the plain path is cheaper
        self.use_fused = (self.options.fused and bool(self._logit_losses) and fused_supported(context.student)
                          and not any(loss.needs_logits for _, _, loss in self._other_losses))
        log.info("logit losses on the %s path", "fused, chunked" if self.use_fused else "full-logits")

    def trainable(self):
        return {"student": self.context.student}

    def loss(self, batch):
        ctx = self.context
        want_teacher = self._teacher_needed and ctx.teacher is not None
        if not self.use_fused:
            teacher_out = ctx.teacher.outputs(batch, ctx.needs) if want_teacher else None
            out = ctx.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            return self._weighted(kdistill.ModelOutputs(logits=out.logits), teacher_out, batch, ctx.losses)
        needs = kdistill.Needs(logits=False, final_hidden=True)
        teacher_out = ctx.teacher.outputs(batch, needs) if want_teacher else None
        student_out = final_hidden(ctx.student, batch.input_ids, batch.attention_mask)
        mask = batch.mask
        total, terms = fused_logit_loss(student_out.final_hidden[mask], student_out.output_weight, TeacherRows(teacher_out, mask),
                                        batch.labels[mask], self._logit_losses, self.options.chunk_tokens)
        if self._other_losses:
            extra, extra_terms = self._weighted(student_out, teacher_out, batch, self._other_losses)
            total, terms = total + extra, {**terms, **extra_terms}
        return total, terms

    @staticmethod
    def _weighted(student_out, teacher_out, batch, losses):
        total = 0.0
        terms = {}
        for name, weight, loss in losses:
            value = loss(student_out, teacher_out, batch)
            terms[name] = value.detach()
            total = total + weight * value
        return total, terms


@kdistill.hookimpl
def kd_register_strategies():
    return [Offline]
