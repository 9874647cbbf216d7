"""forward-kl and cross-entropy against float64 references written independently (plain loops)."""

from __future__ import annotations

import math

import pytest
import torch

import kdistill
from conftest import numeric_grad
from kdistill.plugins.losses.cross_entropy import CrossEntropy
from kdistill.plugins.losses.forward_kl import ForwardKL
from kdistill.testing import check_component


def reference_forward_kl(student, teacher, labels, temperature):
    """Sum over counted positions of T^2 * sum_v p_t(v) log(p_t(v)/p_s(v)), element by element, float64."""
    total = 0.0
    for b in range(len(student)):
        for s in range(len(student[b])):
            if labels[b][s] == -100:
                continue
            zs = [x / temperature for x in student[b][s]]
            zt = [x / temperature for x in teacher[b][s]]
            ms, mt = max(zs), max(zt)
            log_norm_s = ms + math.log(sum(math.exp(x - ms) for x in zs))
            log_norm_t = mt + math.log(sum(math.exp(x - mt) for x in zt))
            for xs, xt in zip(zs, zt):
                log_pt, log_ps = xt - log_norm_t, xs - log_norm_s
                total += math.exp(log_pt) * (log_pt - log_ps)
    return total * temperature ** 2


def reference_cross_entropy(student, labels):
    total = 0.0
    for b in range(len(student)):
        for s in range(len(student[b])):
            y = labels[b][s]
            if y == -100:
                continue
            row = student[b][s]
            m = max(row)
            total += m + math.log(sum(math.exp(x - m) for x in row)) - row[y]
    return total


def random_case(seed, b=3, s=6, v=13, pad=True):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (b, s), generator=g)
    if pad:
        labels[0, s - 2:] = -100
        labels[-1, :2] = -100
    return student, teacher, labels


def ours(loss, student, teacher, labels):
    batch = kdistill.Batch(input_ids=labels.clamp(min=0), labels=labels)
    return loss(kdistill.ModelOutputs(logits=student), kdistill.ModelOutputs(logits=teacher), batch)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_kl_value_and_gradient_match_float64_reference(temperature, seed):
    student, teacher, labels = random_case(seed, b=2, s=4, v=7)
    loss = ForwardKL(ForwardKL.Options(temperature=temperature))
    ref = reference_forward_kl(student.tolist(), teacher.tolist(), labels.tolist(), temperature)
    x = student.clone().requires_grad_(True)
    value = ours(loss, x, teacher, labels)
    assert value.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    value.backward()
    expected = numeric_grad(lambda z: reference_forward_kl(z.tolist(), teacher.tolist(), labels.tolist(), temperature), student.clone())
    assert torch.allclose(x.grad, expected, atol=1e-6)
    # float32 inputs agree with the float64 reference to float32 precision
    x32 = student.float().requires_grad_(True)
    value32 = ours(loss, x32, teacher.float(), labels)
    value32.backward()
    assert value32.item() == pytest.approx(ref, rel=1e-5)
    assert torch.allclose(x32.grad.double(), expected, atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_cross_entropy_value_and_gradient_match_float64_reference(seed):
    student, _, labels = random_case(seed, b=2, s=4, v=7)
    x = student.clone().requires_grad_(True)
    value = ours(CrossEntropy(), x, None, labels)
    ref = reference_cross_entropy(student.tolist(), labels.tolist())
    assert value.item() == pytest.approx(ref, rel=1e-10)
    value.backward()
    expected = numeric_grad(lambda z: reference_cross_entropy(z.tolist(), labels.tolist()), student.clone())
    assert torch.allclose(x.grad, expected, atol=1e-6)


@pytest.mark.parametrize("loss", [ForwardKL(ForwardKL.Options(temperature=2.0)), CrossEntropy()], ids=["forward-kl", "cross-entropy"])
def test_padding_does_not_change_the_loss(loss):
    student, teacher, labels = random_case(3)
    base = ours(loss, student, teacher, labels)
    # append padded positions with arbitrary logits: the sum and so the per-token mean are unchanged
    g = torch.Generator().manual_seed(9)
    extra = 5
    s2 = torch.cat([student, torch.randn(3, extra, 13, generator=g, dtype=torch.float64) * 50], dim=1)
    t2 = torch.cat([teacher, torch.randn(3, extra, 13, generator=g, dtype=torch.float64) * 50], dim=1)
    l2 = torch.cat([labels, torch.full((3, extra), -100)], dim=1)
    assert ours(loss, s2, t2, l2).item() == pytest.approx(base.item(), rel=1e-12)


def test_kl_is_zero_for_identical_distributions_and_finite_at_minus_inf():
    student, _, labels = random_case(4)
    loss = ForwardKL(ForwardKL.Options(temperature=2.0))
    assert abs(ours(loss, student, student.clone(), labels).item()) < 1e-12
    teacher = student.clone()
    teacher[..., 0] = float("-inf")  # the teacher rules a token out entirely
    x = student.clone().requires_grad_(True)
    value = ours(loss, x, teacher, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()


def test_half_precision_inputs_are_upcast():
    student, teacher, labels = random_case(5)
    loss = ForwardKL(ForwardKL.Options(temperature=1.0))
    value = ours(loss, student.to(torch.bfloat16), teacher.to(torch.bfloat16), labels)
    assert value.dtype == torch.float32
    ref = ours(loss, student.to(torch.bfloat16).double(), teacher.to(torch.bfloat16).double(), labels)
    assert value.item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("cls", [ForwardKL, CrossEntropy])
def test_builtin_losses_pass_the_conformance_kit(cls):
    import kdistill.plugins.losses.cross_entropy as ce_module
    import kdistill.plugins.losses.forward_kl as kl_module

    check_component(cls, plugin=kl_module if cls is ForwardKL else ce_module)
