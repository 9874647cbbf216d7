import torch

import kdistill
import kdistill_example
from kdistill.testing import check_component


def test_conformance():
    check_component(kdistill_example.LogitCosine, plugin=kdistill_example)


def test_value_against_a_hand_computation():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[0.0, 2.0], [3.0, 3.0]]])
    batch = kdistill.Batch(input_ids=torch.zeros(1, 2, dtype=torch.long), labels=torch.zeros(1, 2, dtype=torch.long))
    value = kdistill_example.LogitCosine()(kdistill.ModelOutputs(logits=s), kdistill.ModelOutputs(logits=t), batch)
    assert abs(value.item() - 1.0) < 1e-6  # orthogonal (1 - 0) plus parallel (1 - 1)
