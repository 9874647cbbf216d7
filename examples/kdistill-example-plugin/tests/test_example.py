import kdistill_example
import torch

import kdistill
from kdistill.testing import check_component


def test_conformance():
    check_component(kdistill_example.LogitCosine, plugin=kdistill_example)


def test_value_against_a_hand_computation():
    s = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[0.0, 2.0], [3.0, 3.0]]])
    batch = kdistill.Batch(input_ids=torch.zeros(1, 2, dtype=torch.long), labels=torch.zeros(1, 2, dtype=torch.long))
    value = kdistill_example.LogitCosine()(kdistill.ModelOutputs(logits=s), kdistill.ModelOutputs(logits=t), batch)
    assert abs(value.item() - 1.0) < 1e-6  # orthogonal (1 - 0) plus parallel (1 - 1)


def test_padding_counts_for_nothing():
    s = torch.tensor([[[1.0, 0.0], [5.0, -3.0]]])
    t = torch.tensor([[[0.0, 2.0], [1.0, 1.0]]])
    labels = torch.tensor([[0, -100]])  # the second position is padding
    batch = kdistill.Batch(input_ids=labels.clamp(min=0), labels=labels)
    value = kdistill_example.LogitCosine()(kdistill.ModelOutputs(logits=s), kdistill.ModelOutputs(logits=t), batch)
    assert abs(value.item() - 1.0) < 1e-6


def test_listed_by_kdistill_plugins():
    """Installed (pip install ./examples/kdistill-example-plugin), kdistill finds it through its entry point."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "kdistill.cli", "plugins"], capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if "example-logit-cosine" in line)
    assert [c.strip() for c in row.strip("│ ").split("│")][:4] == ["loss", "example-logit-cosine", "example", "kdistill-example-plugin"]
