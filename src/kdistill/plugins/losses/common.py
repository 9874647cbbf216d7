"""Helpers shared by the logit losses."""

from __future__ import annotations

import torch

from kdistill.core.components import Batch, ModelOutputs


def upcast(x: torch.Tensor) -> torch.Tensor:
    """Half precision to float32; float32 and float64 stay as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def counted_logits(student: ModelOutputs, teacher: ModelOutputs | None, batch: Batch):
    """Student and teacher logits of the positions that count, as float32 [N, V].

    Only counted rows are kept (padding costs nothing further) and half-precision inputs are
    upcast. Vocabularies padded to different sizes are cut to the shared leading tokens.
    """
    mask = batch.mask
    s = upcast(student.logits[mask])
    if teacher is None:
        return s, None
    t = upcast(teacher.logits[mask])
    if s.shape[-1] != t.shape[-1]:
        shared = min(s.shape[-1], t.shape[-1])
        s, t = s[..., :shared], t[..., :shared]
    return s, t
