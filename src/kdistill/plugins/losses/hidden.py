"""Losses on mapped layers' hidden states (the student's projected to the teacher's width)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import kdistill
from kdistill.plugins.losses.common import upcast


def _per_position(student, teacher, batch, distance) -> torch.Tensor:
    """Sum over counted positions of the mean over layer pairs of `distance(s, t)` per position."""
    mask = batch.mask
    pairs = sorted(student.hidden_states)
    if not pairs:
        raise ValueError("no mapped hidden states reached the loss")
    total = 0.0
    for layer in pairs:
        s = upcast(student.hidden_states[layer][mask])
        t = upcast(teacher.hidden_states[layer][mask])  # no grad from the teacher; a learned mix's weights get one
        total = total + distance(s, t).sum()
    return total / len(pairs)


class HiddenCosineMSE(kdistill.FeatureLoss):
    """Mean squared error between L2-normalised student (projected) and teacher states, per dimension."""

    name = "hidden-cosine-mse"

    class Options(kdistill.Options):
        pass

    def __call__(self, student, teacher, batch):
        return _per_position(student, teacher, batch,
                             lambda s, t: (F.normalize(s, dim=-1) - F.normalize(t, dim=-1)).pow(2).mean(-1))


class HiddenMSE(kdistill.FeatureLoss):
    """Mean squared error between student (projected) and teacher states, per dimension."""

    name = "hidden-mse"

    class Options(kdistill.Options):
        pass

    def __call__(self, student, teacher, batch):
        return _per_position(student, teacher, batch, lambda s, t: (s - t).pow(2).mean(-1))


class HiddenCosine(kdistill.FeatureLoss):
    """1 - cosine similarity between student (projected) and teacher states."""

    name = "hidden-cosine"

    class Options(kdistill.Options):
        pass

    def __call__(self, student, teacher, batch):
        return _per_position(student, teacher, batch, lambda s, t: 1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8))


@kdistill.hookimpl
def kd_register_losses():
    return [HiddenCosineMSE, HiddenMSE, HiddenCosine]
