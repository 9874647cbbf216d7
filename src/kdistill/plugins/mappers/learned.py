"""Learned mapping: each student layer matches a trained softmax-weighted mix of teacher layers."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

import kdistill
from kdistill.toolkit import check_pairs


class LayerMixer(nn.Module):
    """targets[i] = sum_j softmax(logits[i])_j * teacher_state_j; trained with the student."""

    def __init__(self, n_targets: int, n_sources: int):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(n_targets, n_sources))  # starts as an even mix

    def forward(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        weights = torch.softmax(self.logits, dim=-1)
        stacked = torch.stack(states, dim=0)  # [sources, B, S, D]
        mixed = torch.einsum("ts,sbld->tbld", weights.to(stacked.dtype), stacked)
        return list(mixed.unbind(0))


class Learned(kdistill.LayerMapper):
    """Every chosen student layer learns which teacher layers to match (weights kept in checkpoints)."""

    name = "learned"

    class Options(kdistill.Options):
        student_layers: list[int] | None = Field(None, description="student layers to distill (default: all)")
        teacher_layers: list[int] | None = Field(None, description="teacher layers to mix (default: all)")

    def build(self, n_student: int, n_teacher: int) -> kdistill.LayerMap:
        students = self.options.student_layers if self.options.student_layers is not None else list(range(n_student))
        teachers = self.options.teacher_layers if self.options.teacher_layers is not None else list(range(n_teacher))
        check_pairs([(s, teachers[0] if teachers else -1) for s in students], n_student, n_teacher, self.name)
        check_pairs([(students[0], t) for t in teachers[:1]], n_student, n_teacher, self.name)
        bad = [t for t in teachers if not 0 <= t < n_teacher]
        if bad or len(set(teachers)) != len(teachers):
            raise kdistill.KdistillError(f"layer_mapper: teacher layers {teachers} must be distinct and within 0-{n_teacher - 1}")
        return kdistill.LayerMap(tuple(students), tuple(teachers), mixer=LayerMixer(len(students), len(teachers)))


@kdistill.hookimpl
def kd_register_layer_mappers():
    return [Learned]
