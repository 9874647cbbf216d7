"""Linear warmup, then linear decay to `min_ratio` at the last step."""

from __future__ import annotations

from pydantic import Field

import kdistill


class Linear(kdistill.Scheduler):
    """Warmup over `warmup_steps`, then a straight line down to `min_ratio`."""

    name = "linear"

    class Options(kdistill.Options):
        warmup_steps: int = Field(0, ge=0)
        min_ratio: float = Field(0.0, ge=0, le=1)

    def __call__(self, step: int, total_steps: int) -> float:
        warmup = self.options.warmup_steps
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - (1.0 - self.options.min_ratio) * progress


@kdistill.hookimpl
def kd_register_schedulers():
    return [Linear]
