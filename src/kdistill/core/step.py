"""The recipe's losses on one micro-batch, for strategies to compose.

`LossStep` runs what the offline strategy always did: logit losses on the fused path (chunks of
positions straight from hidden states, no full logits) whenever the student's head is a plain
linear layer, otherwise on full logits; feature losses on the mapped layers' states, captured
with forward hooks. Where the teacher's outputs come from is the strategy's choice (a frozen
teacher, an EMA copy, an augmented view), passed in as a function: strategies get the fused path
by composition, not by subclassing one another.
"""

from __future__ import annotations

import logging
from typing import Callable

from pydantic import Field
from torch import nn

from kdistill.core.capture import capture, num_layers
from kdistill.core.components import Batch, FeatureLoss, LayerMap, LogitLoss, ModelOutputs, Needs, Options, TrainContext
from kdistill.core.errors import KdistillError
from kdistill.core.fused import TeacherRows, final_hidden, fused_logit_loss, fused_supported, model_dtype
from kdistill.core.models import LM

log = logging.getLogger("kdistill")

TeacherOutputs = Callable[[Batch, Needs], ModelOutputs]


class StepOptions(Options):
    """Options of every strategy that computes the recipe's losses with a `LossStep`."""

    fused: bool = Field(True, description="compute logit losses in chunks from hidden states when the model allows")
    chunk_tokens: int | None = Field(None, ge=1, description="positions per chunk on the fused path; "
                                     "when given it wins over memory_budget_mib")
    memory_budget_mib: float | None = Field(None, gt=0, description="MiB for the fused path's chunk-sized tensors, "
                                            "from which the chunk is chosen (default: 192 on CPU, 1024 on CUDA)")
    compile: bool = Field(False, description="run each logit loss's element-wise part through torch.compile")


def use_eager_attention(model: LM, who: str) -> None:
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
        projectors = [nn.Linear(d_student, d_teacher, bias=False) for _ in range(n_layers)]
        if d_student == d_teacher:  # start from the identity: a student cut from the teacher already matches
            for projector in projectors:
                nn.init.eye_(projector.weight)
        self.projectors = nn.ModuleList(projectors)
        self.mixer = mixer


def weighted_losses(student_out: ModelOutputs, teacher_out: ModelOutputs | None, batch: Batch, losses):
    """The weighted sum of `losses` [(name, weight, loss)] and each one's detached value."""
    total = 0.0
    terms = {}
    for name, weight, loss in losses:
        value = loss(student_out, teacher_out, batch)
        terms[name] = value.detach()
        total = total + weight * value
    return total, terms


class LossStep:
    """The weighted sum of the recipe's losses on a micro-batch, and each term.

    `teacher_outputs(batch, needs)` says what the losses compare the student with (default: the
    recipe's teacher; None when there is none). `modules()` names what the step itself trains
    (feature projectors), for the strategy's `trainable`. `last_student` keeps the student's
    outputs of the last call, for strategies that add heads on top (mtp-self).
    """

    def __init__(self, context: TrainContext, options: StepOptions, teacher_outputs: TeacherOutputs | None = None):
        self.context, self.options = context, options
        if teacher_outputs is None and context.teacher is not None:
            teacher_outputs = context.teacher.outputs
        self.teacher_outputs = teacher_outputs
        self.last_student: ModelOutputs | None = None
        self._teacher_needed = any(loss.needs_teacher for _, _, loss in context.losses)
        # a plain loss reading full logits would need them anyway: then the plain path is cheaper
        self.use_fused = (options.fused and bool(self._logit_losses) and fused_supported(context.student)
                          and not any(loss.needs_logits for _, _, loss in self._other_losses))
        log.info("logit losses on the %s path", "fused, chunked" if self.use_fused else "full-logits")
        self.bridge: FeatureBridge | None = None
        self.layer_map: LayerMap | None = None
        self._s_hidden: tuple[int, ...] = ()
        self._s_attention: tuple[int, ...] = ()
        self._t_hidden: tuple[int, ...] = ()
        self._t_attention: tuple[int, ...] = ()
        if self._feature_losses:
            self._setup_features(context)

    # read from the context at every call: the engine sets scheduled weights before each step
    @property
    def _logit_losses(self):
        return [item for item in self.context.losses if isinstance(item[2], LogitLoss)]

    @property
    def _feature_losses(self):
        return [item for item in self.context.losses if isinstance(item[2], FeatureLoss)]

    @property
    def _other_losses(self):
        return [item for item in self.context.losses if not isinstance(item[2], (LogitLoss, FeatureLoss))]

    def _setup_features(self, context: TrainContext) -> None:
        if context.teacher is None or context.layer_mapper is None:
            raise KdistillError("losses: feature losses need a teacher and a layer_mapper")
        student: LM = context.student
        teacher: LM = context.teacher.model
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

    def modules(self) -> dict[str, nn.Module]:
        """What the step trains besides the student (checkpointed with it)."""
        if self.bridge is not None and any(True for _ in self.bridge.parameters()):
            return {"bridge": self.bridge}
        return {}

    def __call__(self, batch: Batch):
        student = self.context.student
        if self.use_fused and not fused_supported(student):  # e.g. partitioned by ZeRO-3 after setup
            self.use_fused = False
            log.info("logit losses on the full-logits path (the output projection is partitioned)")
        needs = Needs(logits=not self.use_fused, final_hidden=self.use_fused,
                      hidden_layers=self._t_hidden, attention_layers=self._t_attention)
        teacher_out = self.teacher_outputs(batch, needs) if self._teacher_needed and self.teacher_outputs is not None else None
        with capture(student, self._s_hidden, self._s_attention) as captured:
            if self.use_fused:
                student_out = final_hidden(student, batch)
            else:
                out = student(**batch.model_inputs(model_dtype(student)), use_cache=False)
                student_out = ModelOutputs(logits=out.logits)
        self.last_student = student_out
        total, terms = 0.0, {}
        if self.use_fused:
            mask, hidden, weight = batch.mask, student_out.final_hidden, student_out.output_weight
            assert hidden is not None and weight is not None  # final_hidden() gives both
            o = self.options
            total, terms = fused_logit_loss(hidden[mask], weight, TeacherRows(teacher_out, mask), batch.labels[mask],
                                            self._logit_losses, o.chunk_tokens, memory_budget_mib=o.memory_budget_mib,
                                            compile=o.compile)
            rest = self._other_losses
        else:
            rest = self._logit_losses + self._other_losses
        if rest:
            extra, extra_terms = weighted_losses(student_out, teacher_out, batch, rest)
            total, terms = total + extra, {**terms, **extra_terms}
        if self._feature_losses:
            s_feat, t_feat = self._features(captured, teacher_out)
            extra, extra_terms = weighted_losses(s_feat, t_feat, batch, self._feature_losses)
            total, terms = total + extra, {**terms, **extra_terms}
        return total, terms

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
        return (ModelOutputs(hidden_states=s_hidden, attentions=s_attn),
                ModelOutputs(hidden_states=t_hidden, attentions=t_attn))
