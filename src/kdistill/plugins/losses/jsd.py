"""Generalized Jensen-Shannon divergence with weight beta (as in GKD), scaled by T^2.

beta follows TRL's convention: 0 is forward KL(teacher || student), 1 reverse KL(student || teacher) (the
limits, normalized, of the mixture's divergence at its ends)."""

from __future__ import annotations

from pydantic import Field

import kdistill
from kdistill.plugins.losses.common import Divergence, TemperatureOptions, kl_rows, mixture_log


class JSD(Divergence):
    """beta KL(p_t || m) + (1 - beta) KL(p_s || m) with m = beta p_t + (1 - beta) p_s, times T^2; beta 0 is
    forward KL, beta 1 reverse KL."""

    name = "jsd"

    class Options(TemperatureOptions):
        beta: float = Field(0.5, ge=0, le=1, description="weight of the teacher in the mixture and of KL(p_t || m); "
                            "0 is forward KL(p_t || p_s), 1 reverse KL(p_s || p_t) (TRL's convention)")

    def divergence(self, log_ps, log_pt):
        beta = self.options.beta
        if beta == 0:
            return kl_rows(log_pt, log_ps)
        if beta == 1:
            return kl_rows(log_ps, log_pt)
        log_m = mixture_log(log_pt, log_ps, beta)
        return beta * kl_rows(log_pt, log_m) + (1 - beta) * kl_rows(log_ps, log_m)


@kdistill.hookimpl
def kd_register_losses():
    return [JSD]
