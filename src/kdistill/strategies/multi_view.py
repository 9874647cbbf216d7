"""Multi-view self-distillation: the teacher sees an augmented view, the student the original (design 5.1)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Literal

import torch
from pydantic import Field

import kdistill
from kdistill import KdistillError
from kdistill.toolkit import LossStep, StepOptions, frozen_outputs


def augment(ids: torch.Tensor, view: str, rate: float, span: int, window: int, mask_token: int, seed: int) -> torch.Tensor:
    """An augmented copy of `ids` [B, S]; positions keep their place, so labels stay aligned.

    mask: each token replaced by `mask_token` with probability `rate`; span: spans of `span` tokens
    masked, starting with probability rate / span; shuffle: tokens permuted within each window of
    `window` positions. Random draws depend only on the ids and `seed`, so a resumed run repeats them.
    """
    digest = hashlib.sha256(ids.detach().cpu().numpy().tobytes()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:7], "little") ^ seed)
    out = ids.detach().cpu().clone()
    b, s = out.shape
    if view == "mask":
        out[torch.rand(b, s, generator=g) < rate] = mask_token
    elif view == "span":
        starts = torch.rand(b, s, generator=g) < rate / span
        hit = torch.zeros_like(starts)
        for offset in range(span):
            hit[:, offset:] |= starts[:, :s - offset]
        out[hit] = mask_token
    elif view == "shuffle":
        for start in range(0, s, window):
            stop = min(s, start + window)
            for row in range(b):
                out[row, start:stop] = out[row, start:stop][torch.randperm(stop - start, generator=g)]
    else:  # pragma: no cover - the options model allows no other value
        raise ValueError(view)
    return out.to(ids.device)


class MultiView(kdistill.Strategy):
    """The teacher, by default the model itself without gradients, predicts from an augmented view of
    the input (masked tokens, masked spans or locally shuffled tokens); the student, from the original,
    learns to match it. Targets stay aligned: only the teacher's input changes."""

    name = "multi-view"
    needs_teacher = False

    class Options(StepOptions):
        view: Literal["mask", "span", "shuffle"] = Field("mask", description="how the teacher's view is made")
        rate: float = Field(0.15, gt=0, lt=1, description="share of tokens masked (mask, span)")
        span: int = Field(4, ge=1, description="span length (span)")
        window: int = Field(4, ge=2, description="positions shuffled together (shuffle)")
        mask_token: int | None = Field(None, description="token id for masked positions (default: the model's "
                                       "pad, else eos, else 0)")
        teacher: Literal["self", "external"] = Field("self", description="the model itself, or the recipe's teacher")
        seed: int = 0

    def setup(self, context):
        if any(isinstance(loss, kdistill.FeatureLoss) for _, _, loss in context.losses):
            raise KdistillError("losses: multi-view takes logit losses only")
        if self.options.teacher == "external" and context.teacher is None:
            raise KdistillError("strategy.options.teacher: 'external' needs a teacher section")
        super().setup(context)
        config = context.student.config
        o = self.options
        self.mask_token = next(t for t in (o.mask_token, config.pad_token_id, config.eos_token_id, 0) if t is not None)
        if isinstance(self.mask_token, list):
            self.mask_token = self.mask_token[0]
        self.step = LossStep(context, self.options, self.teacher_outputs)

    def trainable(self):
        return {"student": self.context.student, **self.step.modules()}

    def loss(self, batch):
        return self.step(batch)

    def view(self, ids: torch.Tensor) -> torch.Tensor:
        o = self.options
        return augment(ids, o.view, o.rate, o.span, o.window, self.mask_token, o.seed)

    def teacher_outputs(self, batch, needs):
        seen = self.view(batch.input_ids)
        if self.options.teacher == "self":
            return frozen_outputs(self.context.student, dataclasses.replace(batch, input_ids=seen), needs)
        return self.context.teacher.outputs(dataclasses.replace(batch, input_ids=seen), needs)


@kdistill.hookimpl
def kd_register_strategies():
    return [MultiView]
