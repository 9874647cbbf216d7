"""Deep mutual learning: peers teach each other (design section 4.3)."""

from __future__ import annotations

import torch
from pydantic import Field

import kdistill
from kdistill import KdistillError
from kdistill.toolkit import model_dtype, student_from_teacher


class Mutual(kdistill.Strategy):
    """Two or more peers train together, each on the recipe's losses with every other peer's detached
    distribution as its teacher (averaged over the others); a loss without a teacher (cross-entropy)
    applies to each peer once. The student is peer 0; the other peers are cut from the recipe's
    teacher (`peer_layers`) or built fresh from the student's config."""

    name = "mutual"
    no_lora = "its peers are full copies of the student, trained in full"
    needs_teacher = False

    class Options(kdistill.Options):
        peer_layers: list[list[int]] | None = Field(None, description="for each extra peer, the teacher layers it is "
                                                    "cut from (needs a teacher section)")
        peers: int = Field(2, ge=2, description="peers including the student, when peer_layers is not given")
        seed: int = Field(1, description="seeds the fresh peers' initialisation")

    def setup(self, context):
        super().setup(context)
        if any(not isinstance(loss, kdistill.LogitLoss) for _, _, loss in context.losses):
            raise KdistillError("losses: mutual takes logit losses only")
        student = context.student
        param = next(student.parameters())
        o = self.options
        extra = []
        if o.peer_layers is not None:
            if context.teacher is None or context.teacher.model is None:
                raise KdistillError("strategy.options.peer_layers: cutting peers from teacher layers needs a teacher section")
            for layers in o.peer_layers:
                extra.append(student_from_teacher(context.teacher.model, layers, "float32"))
        else:
            from transformers import AutoModelForCausalLM

            for i in range(o.peers - 1):
                torch.manual_seed(o.seed + i)
                extra.append(AutoModelForCausalLM.from_config(student.config))
        for peer in extra:
            peer.to(device=param.device, dtype=param.dtype)
            peer.train()
        self.peers = [student] + extra

    def trainable(self):
        return {"student" if i == 0 else f"peer{i}": peer for i, peer in enumerate(self.peers)}

    def loss(self, batch):
        outputs = [kdistill.ModelOutputs(logits=peer(**batch.model_inputs(model_dtype(peer)), use_cache=False).logits) for peer in self.peers]
        detached = [kdistill.ModelOutputs(logits=o.logits.detach()) for o in outputs]
        total, terms = 0.0, {}
        for i, own in enumerate(outputs):
            others = [detached[j] for j in range(len(outputs)) if j != i]
            for name, weight, loss in self.context.losses:
                if loss.needs_teacher:
                    value = sum(loss(own, other, batch) for other in others) / len(others)
                else:
                    value = loss(own, None, batch)
                terms[name if i == 0 else f"peer{i}_{name}"] = value.detach()
                total = total + weight * value
        return total, terms


@kdistill.hookimpl
def kd_register_strategies():
    return [Mutual]
