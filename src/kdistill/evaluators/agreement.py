"""How closely the student follows the teacher on the validation split, position by position."""

from __future__ import annotations

import torch
from pydantic import Field

import kdistill
from kdistill.toolkit import model_dtype


def agreement_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, k: int, temperature: float) -> dict[str, float]:
    """Sums over rows of [N, V] logits: top-1 match, top-k overlap share, KL(t || s), correlation."""
    s, t = student_logits.double(), teacher_logits.double()
    shared = min(s.shape[-1], t.shape[-1])
    s, t = s[:, :shared], t[:, :shared]
    k = min(k, shared)
    top1 = (s.argmax(-1) == t.argmax(-1)).double().sum().item()
    top_s, top_t = s.topk(k, dim=-1).indices, t.topk(k, dim=-1).indices
    overlap = (top_s.unsqueeze(-1) == top_t.unsqueeze(-2)).any(-1).double().sum(-1) / k
    log_ps, log_pt = torch.log_softmax(s / temperature, -1), torch.log_softmax(t / temperature, -1)
    pt, ps = log_pt.exp(), log_ps.exp()
    kl = torch.where(pt > 0, pt * (log_pt - log_ps), torch.zeros_like(pt)).sum(-1)
    pc, sc = pt - pt.mean(-1, keepdim=True), ps - ps.mean(-1, keepdim=True)
    corr = (pc * sc).sum(-1) / (pc.norm(dim=-1) * sc.norm(dim=-1)).clamp(min=1e-300)
    return {"top1": top1, "topk": overlap.sum().item(), "kl": kl.sum().item(), "corr": corr.sum().item(), "n": float(len(s))}


class Agreement(kdistill.Evaluator):
    """Top-1 agreement, top-k overlap (share of the teacher's k most likely tokens that are among the
    student's k), mean KL(teacher || student) and the Pearson correlation of the two probability
    vectors, averaged over every counted validation position (not the last one only)."""

    name = "agreement"

    class Options(kdistill.ConstantTemperatureOptions):  # the temperature of the KL and the correlation
        k: int = Field(5, ge=1, description="size of the top-k sets compared")

    provides = ("val/agreement_top1", "val/agreement_topk", "val/kl_teacher_student", "val/prob_correlation")

    def evaluate(self, context):
        if context.teacher is None or context.teacher.model is None:
            return {}
        totals = {"top1": 0.0, "topk": 0.0, "kl": 0.0, "corr": 0.0, "n": 0.0}
        student, teacher = context.student, context.teacher.model
        was_training = student.training
        student.eval()
        with torch.no_grad():
            for batch in context.val_batches():
                kwargs = {**batch.model_inputs(model_dtype(student)), "use_cache": False}
                mask = batch.mask
                sums = agreement_sums(student(**kwargs).logits[mask], teacher(**kwargs).logits[mask], self.options.k,
                                      self.options.temperature)
                for key in totals:
                    totals[key] += sums[key]
        student.train(was_training)
        n = max(totals["n"], 1.0)
        return {"val/agreement_top1": totals["top1"] / n, "val/agreement_topk": totals["topk"] / n,
                "val/kl_teacher_student": totals["kl"] / n, "val/prob_correlation": totals["corr"] / n}


@kdistill.hookimpl
def kd_register_evaluators():
    return [Agreement]
