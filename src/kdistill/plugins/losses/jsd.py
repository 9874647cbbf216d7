"""Generalized Jensen-Shannon divergence with weight beta (as in GKD), scaled by T^2."""

from __future__ import annotations

from pydantic import Field

import kdistill
from kdistill.plugins.losses.common import Divergence, TemperatureOptions, kl_rows, mixture_log


class JSD(Divergence):
    """beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = beta p_t + (1 - beta) p_s, times T^2."""

    name = "jsd"

    class Options(TemperatureOptions):
        beta: float = Field(0.5, gt=0, lt=1, description="weight of the teacher in the mixture and of KL(p_t || m)")

    def divergence(self, log_ps, log_pt):
        beta = self.options.beta
        log_m = mixture_log(log_pt, log_ps, beta)
        return beta * kl_rows(log_pt, log_m) + (1 - beta) * kl_rows(log_ps, log_m)


@kdistill.hookimpl
def kd_register_losses():
    return [JSD]
