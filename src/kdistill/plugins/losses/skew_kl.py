"""Skew KL (DistiLLM): KL against a mixture that keeps the divergence bounded and smooth."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

import kdistill
from kdistill.plugins.losses.common import Divergence, TemperatureOptions, kl_rows, mixture_log


class SkewKL(Divergence):
    """forward: KL(p_t || a p_t + (1-a) p_s); reverse: KL(p_s || a p_s + (1-a) p_t); times T^2."""

    name = "skew-kl"

    class Options(TemperatureOptions):
        alpha: float = Field(0.1, ge=0, lt=1, description="share of the first distribution in the mixture (0 gives plain KL)")
        direction: Literal["forward", "reverse"] = "forward"

    def divergence(self, log_ps, log_pt):
        alpha = self.options.alpha
        if self.options.direction == "forward":
            return kl_rows(log_pt, mixture_log(log_pt, log_ps, alpha) if alpha > 0 else log_ps)
        return kl_rows(log_ps, mixture_log(log_ps, log_pt, alpha) if alpha > 0 else log_pt)


@kdistill.hookimpl
def kd_register_losses():
    return [SkewKL]
