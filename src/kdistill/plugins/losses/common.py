"""Helpers shared by the logit losses."""

from __future__ import annotations

import torch

from kdistill.core.components import Batch, ModelOutputs


def counted_logits(student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
    """Student and teacher logits of the positions that count, as float32 [N, V].

    Only counted rows are kept (padding costs nothing further) and half-precision inputs are
    upcast. Vocabularies padded to different sizes are cut to the shared leading tokens.
    """
    mask = batch.mask
    s = student.logits[mask].float()
    if teacher is None:
        return s, None
    t = teacher.logits[mask].float()
    if s.shape[-1] != t.shape[-1]:
        shared = min(s.shape[-1], t.shape[-1])
        s, t = s[..., :shared], t[..., :shared]
    return s, t
