"""Uniform layer mapping: student layer s pairs with teacher layer round(s * n_t / n_s)."""

from __future__ import annotations

import math

import kdistill


class UniformMapper(kdistill.LayerMapper):
    """Spreads the student's layers evenly over the teacher's depth (rounding halves up)."""

    name = "uniform"

    class Options(kdistill.Options):
        pass

    def pairs(self, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
        if n_student < 1 or n_teacher < 1:
            raise ValueError(f"layer counts must be positive (student {n_student}, teacher {n_teacher})")
        return [(s, min(math.floor(s * n_teacher / n_student + 0.5), n_teacher - 1)) for s in range(n_student)]


@kdistill.hookimpl
def kd_register_layer_mappers():
    return [UniformMapper]
