"""Reverse KL(student || teacher) at a temperature, scaled by T^2 (mode-seeking, as in MiniLLM)."""

from __future__ import annotations

import kdistill
from kdistill.plugins.losses.common import Divergence, kl_rows


class ReverseKL(Divergence):
    """KL(student || teacher) on temperature-softened distributions, times T^2 (mode-seeking)."""

    name = "reverse-kl"

    def divergence(self, log_ps, log_pt):
        return kl_rows(log_ps, log_pt)


@kdistill.hookimpl
def kd_register_losses():
    return [ReverseKL]
