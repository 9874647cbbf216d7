"""Skip mapping: only the last k layers of the student pair with the last k of the teacher."""

from __future__ import annotations

from pydantic import Field

import kdistill


class LastK(kdistill.LayerMapper):
    """The student's last k layers with the teacher's last k, in order (output layers matter most)."""

    name = "last-k"

    class Options(kdistill.Options):
        k: int = Field(2, ge=1, description="how many of the last layers to pair")

    def pairs(self, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
        k = min(self.options.k, n_student, n_teacher)
        return [(n_student - k + i, n_teacher - k + i) for i in range(k)]


@kdistill.hookimpl
def kd_register_layer_mappers():
    return [LastK]
