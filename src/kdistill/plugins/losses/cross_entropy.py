"""Cross-entropy of the student on the hard labels (the data's next tokens)."""

from __future__ import annotations

import torch

import kdistill
from kdistill.plugins.losses.common import counted_logits


class CrossEntropy(kdistill.Loss):
    """Cross-entropy against the ground-truth next token; needs no teacher."""

    name = "cross-entropy"
    needs_teacher = False

    class Options(kdistill.Options):
        pass

    def __call__(self, student, teacher, batch):
        s, _ = counted_logits(student, None, batch)
        return torch.nn.functional.cross_entropy(s, batch.labels[batch.mask], reduction="sum")


@kdistill.hookimpl
def kd_register_losses():
    return [CrossEntropy]
