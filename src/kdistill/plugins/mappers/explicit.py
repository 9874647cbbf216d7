"""Pairs listed in the recipe: [[student layer, teacher layer], ...]."""

from __future__ import annotations

from pydantic import Field

import kdistill


class Explicit(kdistill.LayerMapper):
    """Exactly the (student layer, teacher layer) pairs the recipe lists."""

    name = "explicit"

    class Options(kdistill.Options):
        pairs: list[tuple[int, int]] = Field(min_length=1, description="[[student_layer, teacher_layer], ...]")

    def pairs(self, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
        return [tuple(p) for p in self.options.pairs]


@kdistill.hookimpl
def kd_register_layer_mappers():
    return [Explicit]
