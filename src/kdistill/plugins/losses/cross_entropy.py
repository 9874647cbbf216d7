"""Cross-entropy of the student on the hard labels (the data's next tokens)."""

from __future__ import annotations

import torch

import kdistill


class CrossEntropy(kdistill.LogitLoss):
    """Cross-entropy against the ground-truth next token; needs no teacher."""

    name = "cross-entropy"
    needs_teacher = False

    class Options(kdistill.Options):
        pass

    def rows(self, student, teacher, labels):
        return torch.nn.functional.cross_entropy(student, labels, reduction="none")

    def rows_and_grad(self, student, teacher, labels):
        # analytic: d/dz CE = softmax(z) - onehot(label)
        log_p = torch.log_softmax(student.detach(), dim=-1)
        values = -log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        grad = log_p.exp_()
        grad.scatter_add_(-1, labels.unsqueeze(-1), torch.full_like(values, -1.0).unsqueeze(-1))
        return values, grad


@kdistill.hookimpl
def kd_register_losses():
    return [CrossEntropy]
