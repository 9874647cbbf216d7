"""Offline distillation: a frozen teacher, a trained student (the classic setting)."""

from __future__ import annotations

import logging

from pydantic import Field
from torch import nn

import kdistill
from kdistill.core.capture import capture, num_layers
from kdistill.core.errors import KdistillError
from kdistill.core.fused import TeacherRows, final_hidden, fused_logit_loss, fused_supported

log = logging.getLogger("kdistill")


def use_eager_attention(model: nn.Module, who: str) -> None:
    """Attention maps exist only with the eager implementation (sdpa returns none)."""
    if getattr(model.config, "_attn_implementation", None) != "eager":
        if hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation("eager")
        else:  # pragma: no cover - older transformers
            model.config._attn_implementation = "eager"
        log.warning("%s: eager attention switched on for this run (an attention loss needs attention maps)", who)


class FeatureBridge(nn.Module):
    """What feature distillation trains besides the student: one projector per mapped student
    layer (student width -> teacher width) and a learned mapper's mixing weights. Saved in
    checkpoints; not part of the saved student."""

    def __init__(self, n_layers: int, d_student: int, d_teacher: int, mixer: nn.Module | None):
        super().__init__()
        self.projectors = nn.ModuleList(nn.Linear(d_student, d_teacher, bias=False) for _ in range(n_layers))
        if d_student == d_teacher:  # start from the identity: a student cut from the teacher already matches
            for projector in self.projectors:
                nn.init.eye_(projector.weight)
        self.mixer = mixer


class Offline(kdistill.Strategy):
    """The teacher is frozen; the student minimises the weighted sum of the recipe's losses.

    Logit losses run on the fused path (chunks of positions straight from hidden states, no full
    logits) whenever the student's head is a plain linear layer; otherwise on full logits. Feature
    losses get the mapped layers' states through forward hooks, nothing more.
    """

    name = "offline"

    class Options(kdistill.Options):
        fused: bool = Field(True, description="compute logit losses in chunks from hidden states when the model allows")
        chunk_tokens: int | None = Field(None, ge=1, description="positions per chunk on the fused path (default: ~96 MiB of float32 logits, a multiple of 32)")

    def setup(self, context):
        super().setup(context)
        self._teacher_needed = any(loss.needs_teacher for _, _, loss in context.losses)
        self._logit_losses = [item for item in context.losses if isinstance(item[2], kdistill.LogitLoss)]
        self._feature_losses = [item for item in context.losses if isinstance(item[2], kdistill.FeatureLoss)]
        self._other_losses = [item for item in context.losses if not isinstance(item[2], (kdistill.LogitLoss, kdistill.FeatureLoss))]
        # a plain loss reading full logits would need them anyway: then the plain path is cheaper
        self.use_fused = (self.options.fused and bool(self._logit_losses) and fused_supported(context.student)
                          and not any(loss.needs_logits for _, _, loss in self._other_losses))
        log.info("logit losses on the %s path", "fused, chunked" if self.use_fused else "full-logits")
        self.bridge = None
        self.layer_map = None
        self._s_hidden = self._s_attention = self._t_hidden = self._t_attention = ()
        if self._feature_losses:
            self._setup_features(context)

    def _setup_features(self, context):
        student, teacher = context.student, context.teacher.model
        self.layer_map = context.layer_mapper.build(num_layers(student), num_layers(teacher))
        uses = {loss.uses for _, _, loss in self._feature_losses}
        if "hidden" in uses:
            self._s_hidden, self._t_hidden = self.layer_map.student_layers, self.layer_map.teacher_layers
            d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
            self.bridge = FeatureBridge(len(self._s_hidden), d_s, d_t, self.layer_map.mixer)
            self.bridge.to(device=next(student.parameters()).device, dtype=next(student.parameters()).dtype)
        if "attention" in uses:
            if self.layer_map.mixer is not None:
                raise KdistillError("layer_mapper: attention-kl needs fixed layer pairs (uniform, last-k or explicit), not a learned mix")
            heads_s, heads_t = student.config.num_attention_heads, teacher.config.num_attention_heads
            if heads_t % heads_s:
                raise KdistillError(f"attention-kl: the teacher's {heads_t} attention heads do not split evenly "
                                    f"into the student's {heads_s}")
            self._s_attention, self._t_attention = self.layer_map.student_layers, self.layer_map.teacher_layers
            use_eager_attention(student, "student")
            use_eager_attention(teacher, "teacher")

    def trainable(self):
        modules = {"student": self.context.student}
        if self.bridge is not None and any(True for _ in self.bridge.parameters()):
            modules["bridge"] = self.bridge
        return modules

    def loss(self, batch):
        ctx = self.context
        if self.use_fused and not fused_supported(ctx.student):  # e.g. partitioned by ZeRO-3 after setup
            self.use_fused = False
            log.info("logit losses on the full-logits path (the output projection is partitioned)")
        want_teacher = self._teacher_needed and self.has_teacher()
        needs = kdistill.Needs(logits=not self.use_fused, final_hidden=self.use_fused,
                               hidden_layers=self._t_hidden, attention_layers=self._t_attention)
        teacher_out = self.teacher_outputs(batch, needs) if want_teacher else None
        with capture(ctx.student, self._s_hidden, self._s_attention) as captured:
            if self.use_fused:
                student_out = final_hidden(ctx.student, batch.input_ids, batch.attention_mask)
            else:
                out = ctx.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                student_out = kdistill.ModelOutputs(logits=out.logits)
        self.last_student = student_out  # for strategies that add heads on top (mtp-self)
        total, terms = 0.0, {}
        if self.use_fused:
            mask = batch.mask
            total, terms = fused_logit_loss(student_out.final_hidden[mask], student_out.output_weight, TeacherRows(teacher_out, mask),
                                            batch.labels[mask], self._logit_losses, self.options.chunk_tokens)
            rest = self._other_losses
        else:
            rest = self._logit_losses + self._other_losses
        if rest:
            extra, extra_terms = self._weighted(student_out, teacher_out, batch, rest)
            total, terms = total + extra, {**terms, **extra_terms}
        if self._feature_losses:
            s_feat, t_feat = self._features(captured, teacher_out)
            extra, extra_terms = self._weighted(s_feat, t_feat, batch, self._feature_losses)
            total, terms = total + extra, {**terms, **extra_terms}
        return total, terms

    def has_teacher(self) -> bool:
        return self.context.teacher is not None

    def teacher_outputs(self, batch, needs):
        """What the losses compare the student with; self-distillation strategies override this."""
        return self.context.teacher.outputs(batch, needs)

    def _features(self, captured, teacher_out):
        s_hidden, t_hidden, s_attn, t_attn = {}, {}, {}, {}
        if self._s_hidden:
            targets = self.layer_map.targets(teacher_out.hidden_states)
            for i, layer in enumerate(self._s_hidden):
                s_hidden[layer] = self.bridge.projectors[i](captured["hidden"][layer])
                t_hidden[layer] = targets[i]
        for s_layer, t_layer in zip(self._s_attention, self._t_attention):
            s_attn[s_layer] = captured["attention"][s_layer]
            t_attn[s_layer] = teacher_out.attentions[t_layer]
        return (kdistill.ModelOutputs(hidden_states=s_hidden, attentions=s_attn),
                kdistill.ModelOutputs(hidden_states=t_hidden, attentions=t_attn))

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
