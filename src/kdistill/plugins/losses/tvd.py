"""Total variation distance between the tempered distributions (bounded in [0, 1])."""

from __future__ import annotations

import kdistill
from kdistill.plugins.losses.common import TemperatureOptions, shared_vocab, tempered_log_softmax, upcast


class TVD(kdistill.LogitLoss):
    """0.5 * sum |p_t - p_s| at temperature T (not scaled by T^2). Needs dense teacher logits."""

    name = "tvd"

    class Options(TemperatureOptions):
        pass

    def rows(self, student, teacher, labels):
        s, t = shared_vocab(student, upcast(teacher))
        temp = self.temperature
        return 0.5 * (tempered_log_softmax(t, temp).exp() - tempered_log_softmax(s, temp).exp()).abs().sum(-1)


@kdistill.hookimpl
def kd_register_losses():
    return [TVD]
