"""Cross-entropy of the student on the hard labels (the data's next tokens)."""

from __future__ import annotations

import torch

import kdistill
from kdistill.plugins.losses.common import cross_entropy_rows_and_grad


class CrossEntropy(kdistill.LogitLoss):
    """Cross-entropy against the ground-truth next token; needs no teacher."""

    name = "cross-entropy"
    needs_teacher = False
    is_cross_entropy = True

    class Options(kdistill.Options):
        pass

    def rows(self, student, teacher, labels):
        return torch.nn.functional.cross_entropy(student, labels, reduction="none")

    def rows_and_grad(self, student, teacher, labels):
        return cross_entropy_rows_and_grad(student, labels)


@kdistill.hookimpl
def kd_register_losses():
    return [CrossEntropy]
