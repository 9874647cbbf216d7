"""Cross-entropy of the student on the hard labels (the data's next tokens)."""

from __future__ import annotations

import torch

import kdistill
from kdistill.plugins.losses.common import log_normalizer


class CrossEntropy(kdistill.LogitLoss):
    """Cross-entropy against the ground-truth next token; needs no teacher."""

    name = "cross-entropy"
    needs_teacher = False

    class Options(kdistill.Options):
        pass

    def rows(self, student, teacher, labels):
        return torch.nn.functional.cross_entropy(student, labels, reduction="none")

    def rows_and_grad(self, student, teacher, labels):
        # analytic and in place: value logsumexp(z) - z_y, gradient softmax(z) - onehot(y); the
        # normalizer comes from vocabulary blocks, so no temporary as large as the chunk exists
        z = student.detach()
        index = labels.unsqueeze(-1)
        shift, log_total = log_normalizer(z, 1.0)
        lse = shift + log_total
        values = (lse - z.gather(-1, index)).squeeze(-1)
        grad = z.sub_(lse).exp_()
        grad.scatter_add_(-1, index, torch.full_like(lse, -1.0))
        return values, grad


@kdistill.hookimpl
def kd_register_losses():
    return [CrossEntropy]
