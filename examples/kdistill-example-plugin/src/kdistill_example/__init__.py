"""An example kdistill plugin: a loss matching the direction of student and teacher logits."""

from __future__ import annotations

import torch
from pydantic import Field

import kdistill


class LogitCosine(kdistill.Loss):
    """1 - cosine similarity between student and teacher logit vectors, per counted position."""

    name = "example-logit-cosine"

    class Options(kdistill.Options):
        eps: float = Field(1e-8, gt=0, description="guards the division for all-zero logit vectors")

    def __call__(self, student, teacher, batch):
        mask = batch.mask
        s = student.logits[mask].float()
        t = teacher.logits[mask].float()
        shared = min(s.shape[-1], t.shape[-1])
        cosine = torch.nn.functional.cosine_similarity(s[:, :shared], t[:, :shared], dim=-1, eps=self.options.eps)
        return (1.0 - cosine).sum()


@kdistill.hookimpl
def kd_register_losses():
    return [LogitCosine]
