"""A constant multiplier, with an optional linear warmup."""

from __future__ import annotations

from pydantic import Field

import kdistill


class Constant(kdistill.Scheduler):
    """The base value throughout (after an optional linear warmup)."""

    name = "constant"
    is_default = True

    class Options(kdistill.Options):
        warmup_steps: int = Field(0, ge=0)

    def __call__(self, step: int, total_steps: int) -> float:
        warmup = self.options.warmup_steps
        return (step + 1) / warmup if step < warmup else 1.0


@kdistill.hookimpl
def kd_register_schedulers():
    return [Constant]
