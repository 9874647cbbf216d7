"""Multi-token-prediction self-distillation (design 5.3, DeepSeek-V3 style), with causal auxiliary layers."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

import kdistill
from kdistill import KdistillError
from kdistill.toolkit import LossStep, StepOptions


class MTPHeads(nn.Module):
    """Auxiliary layers that predict 2, 3, ... tokens ahead from the model's final hidden states.

    Each is a pre-norm transformer layer with a causal mask, applied in sequence (head k reads head
    k-1's states), then a layer norm; logits come from the model's own output projection. The causal
    mask matters: the design document's unmasked encoder layers let position i see the tokens it is
    asked to predict.
    """

    def __init__(self, width: int, attention_heads: int, n_future: int, ff_mult: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.TransformerEncoderLayer(width, attention_heads, dim_feedforward=ff_mult * width, dropout=0.0,
                                                                batch_first=True, norm_first=True) for _ in range(n_future))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(n_future))

    def forward(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        length = hidden.shape[1]
        causal = torch.triu(torch.full((length, length), float("-inf"), device=hidden.device, dtype=hidden.dtype), diagonal=1)
        states, h = [], hidden
        for layer, norm in zip(self.layers, self.norms):
            h = layer(h, src_mask=causal, is_causal=True)
            states.append(norm(h))
        return states


class MTPSelf(kdistill.Strategy):
    """The recipe's losses on the main next-token head (as `offline`, with or without a teacher), plus
    auxiliary heads predicting the tokens 2, 3, ... ahead: each trained on the hard label and distilled
    from the main head's prediction for the same token (detached), at the main head's later position."""

    name = "mtp-self"
    needs_teacher = False

    class Options(StepOptions, kdistill.TemperatureOptions):
        n_future: int = Field(2, ge=1, description="auxiliary heads (predicting 2 .. n_future + 1 tokens ahead)")
        aux_weight: float = Field(0.3, ge=0, description="weight of the auxiliary heads' cross-entropy")
        distill_weight: float = Field(0.1, ge=0, description="weight of distilling the main head into the auxiliary heads")
        temperature: kdistill.Scheduled = Field(2.0, description="temperature of that distillation (scaled by T^2), "
                                                "or a schedule of it over the steps")

    def setup(self, context):
        super().setup(context)
        self.step = LossStep(context, self.options)
        if not self.step.use_fused:
            raise KdistillError("strategy: mtp-self needs a student whose logits are a plain output projection "
                                "(and strategy.options.fused true)")
        config = context.student.config
        param = next(context.student.parameters())
        self.heads = MTPHeads(config.hidden_size, config.num_attention_heads, self.options.n_future).to(param.device, param.dtype)

    def trainable(self):
        return {"student": self.context.student, **self.step.modules(), "mtp": self.heads}

    def loss(self, batch):
        total, terms = self.step(batch)
        hidden, weight = self.step.last_student.final_hidden, self.step.last_student.output_weight
        aux_ce, aux_kl = self.auxiliary(hidden, weight, batch.labels)
        o = self.options
        terms.update({"mtp_ce": aux_ce.detach(), "mtp_distill": aux_kl.detach()})
        return total + o.aux_weight * aux_ce + o.distill_weight * aux_kl, terms

    def auxiliary(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
        """(summed cross-entropy, summed T^2-scaled KL) of the auxiliary heads over their counted positions."""
        T = kdistill.value_at(self.options.temperature, self.context.step, self.context.total_steps)
        with torch.no_grad():
            main = hidden.detach() @ weight.detach().T  # main[:, i] predicts labels[:, i]
        ce = kl = hidden.new_zeros((), dtype=torch.float32)
        for k, states in enumerate(self.heads(hidden), start=1):
            if labels.shape[1] <= k:
                break
            target = labels[:, k:]  # head k at position i predicts labels[:, i + k], the main head's at i + k
            mask = target != kdistill.IGNORE_INDEX
            logits = (states[:, :-k][mask] @ weight.T).float()
            ce = ce + torch.nn.functional.cross_entropy(logits, target[mask], reduction="sum")
            teacher = torch.log_softmax(main[:, k:][mask].float() / T, dim=-1)
            student = torch.log_softmax(logits / T, dim=-1)
            kl = kl + (teacher.exp() * (teacher - student)).sum() * T * T
        return ce, kl


@kdistill.hookimpl
def kd_register_strategies():
    return [MTPSelf]
