"""Linear warmup, then cosine decay to `min_ratio` of the base value (the design's trainer)."""

from __future__ import annotations

import math

from pydantic import Field

import kdistill


class CosineWarmup(kdistill.Scheduler):
    """Warmup over `warmup_steps` steps, then a half cosine down to `min_ratio`."""

    name = "cosine-warmup"

    class Options(kdistill.Options):
        warmup_steps: int = Field(0, ge=0)
        min_ratio: float = Field(0.0, ge=0, le=1)

    def __call__(self, step: int, total_steps: int) -> float:
        warmup = self.options.warmup_steps
        if step < warmup:
            return (step + 1) / warmup  # never 0: the first step already learns
        progress = (step - warmup) / max(1, total_steps - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return self.options.min_ratio + (1.0 - self.options.min_ratio) * cosine


@kdistill.hookimpl
def kd_register_schedulers():
    return [CosineWarmup]
