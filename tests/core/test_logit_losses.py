"""Every logit loss against float64 references written independently (plain Python floats), dense and
sparse, plain and fused-chunked, with padding, vocabulary padding and gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch

import kdistill
from conftest import numeric_grad
from kdistill.core.fused import TeacherRows, fused_logit_loss
from kdistill.plugins.losses import common
from kdistill.plugins.losses.cross_entropy import CrossEntropy
from kdistill.plugins.losses.forward_kl import ForwardKL
from kdistill.plugins.losses.jsd import JSD
from kdistill.plugins.losses.logit_mse import LogitMSE
from kdistill.plugins.losses.reverse_kl import ReverseKL
from kdistill.plugins.losses.skew_kl import SkewKL
from kdistill.plugins.losses.tvd import TVD
from kdistill.testing import check_component

# --------------------------------------------------------------------------- references (floats only)


def softmax(row, temp):
    z = [x / temp for x in row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    s = sum(e)
    return [x / s for x in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_row(kind, s_row, t_row, label, opts):
    T = opts.get("temperature", 1.0)
    if kind == "cross-entropy":
        return -math.log(softmax(s_row, 1.0)[label])
    if kind == "logit-mse":
        return sum((a - b) ** 2 for a, b in zip(s_row, t_row)) / len(s_row)
    ps, pt = softmax(s_row, T), softmax(t_row, T)
    return ref_dist(kind, ps, pt, opts)


def ref_dist(kind, ps, pt, opts):
    T = opts.get("temperature", 1.0)
    if kind == "forward-kl":
        return kl(pt, ps) * T * T
    if kind == "reverse-kl":
        return kl(ps, pt) * T * T
    if kind == "jsd":
        b = opts["beta"]
        if b in (0, 1):  # TRL's convention at the ends: forward and reverse KL
            return (kl(pt, ps) if b == 0 else kl(ps, pt)) * T * T
        m = [b * x + (1 - b) * y for x, y in zip(pt, ps)]
        return (b * kl(pt, m) + (1 - b) * kl(ps, m)) * T * T
    if kind == "skew-kl":
        a = opts["alpha"]
        if opts["direction"] == "forward":
            return kl(pt, [a * x + (1 - a) * y for x, y in zip(pt, ps)]) * T * T
        return kl(ps, [a * x + (1 - a) * y for x, y in zip(ps, pt)]) * T * T
    if kind == "tvd":
        return 0.5 * sum(abs(x - y) for x, y in zip(pt, ps))
    raise KeyError(kind)


def ref_sum(kind, student, teacher, labels, opts):
    total = 0.0
    for b, row_labels in enumerate(labels):
        for s, y in enumerate(row_labels):
            if y != -100:
                total += ref_row(kind, student[b][s], teacher[b][s], y, opts)
    return total


CASES = [
    (ForwardKL, {"temperature": 2.0}),
    (ForwardKL, {"temperature": 0.7}),
    (ReverseKL, {"temperature": 1.5}),
    (JSD, {"temperature": 1.0, "beta": 0.3}),
    (JSD, {"temperature": 1.0, "beta": 0.0}),
    (JSD, {"temperature": 2.0, "beta": 1.0}),
    (SkewKL, {"temperature": 2.0, "alpha": 0.2, "direction": "forward"}),
    (SkewKL, {"temperature": 1.0, "alpha": 0.4, "direction": "reverse"}),
    (TVD, {"temperature": 1.3}),
    (LogitMSE, {}),
    (CrossEntropy, {}),
]
IDS = [f"{c.name}-{'-'.join(str(v) for v in o.values())}" for c, o in CASES]


def make(cls, opts):
    return cls(cls.Options(**opts))


def random_case(seed, b=2, s=4, v=7):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, s - 2:] = -100
    labels[-1, 0] = -100
    return student, teacher, labels


def dense(loss, student, teacher, labels):
    batch = kdistill.Batch(input_ids=labels.clamp(min=0), labels=labels)
    return loss(kdistill.ModelOutputs(logits=student), kdistill.ModelOutputs(logits=teacher), batch)


@pytest.mark.parametrize("cls,opts", CASES, ids=IDS)
def test_value_and_gradient_match_the_float64_reference(cls, opts):
    loss = make(cls, opts)
    student, teacher, labels = random_case(0)
    x = student.clone().requires_grad_(True)
    value = dense(loss, x, teacher, labels)
    ref = ref_sum(cls.name, student.tolist(), teacher.tolist(), labels.tolist(), opts)
    assert value.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    value.backward()
    expected = numeric_grad(lambda z: ref_sum(cls.name, z.tolist(), teacher.tolist(), labels.tolist(), opts), student.clone())
    assert torch.allclose(x.grad, expected, atol=1e-6)


@pytest.mark.parametrize("cls,opts", CASES, ids=IDS)
@pytest.mark.parametrize("chunk", [1, 3, 5, 64])
@pytest.mark.parametrize("block", [None, 1, 7], ids=["one-block", "block-1", "block-7"])
def test_fused_chunked_path_equals_the_plain_path(cls, opts, chunk, block, monkeypatch):
    """From hidden states and output projections, any chunk size, values and both gradients; the
    analytic losses' vocabulary blocks down to one token each, and blocks that do not divide V."""
    if block is not None:
        monkeypatch.setattr(common, "VOCAB_BLOCK_ELEMENTS", block)
    loss = make(cls, opts)
    g = torch.Generator().manual_seed(1)
    n, ds, dt, v = 2 * 5, 6, 9, 11
    hs = torch.randn(2, 5, ds, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, ds, generator=g, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(2, 5, dt, generator=g, dtype=torch.float64)
    wt = torch.randn(v, dt, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (2, 5), generator=g)
    labels[1, 3:] = -100
    plain = dense(loss, hs @ ws.T, ht @ wt.T, labels)
    plain.backward()
    gh, gw = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    mask = labels != -100
    teacher = TeacherRows(kdistill.ModelOutputs(final_hidden=ht, output_weight=wt), mask)
    total, terms = fused_logit_loss(hs[mask], ws, teacher, labels[mask], [(cls.name, 1.0, loss)], chunk=chunk)
    total.backward()
    assert total.item() == pytest.approx(plain.item(), rel=1e-6)
    assert terms[cls.name].item() == pytest.approx(plain.item(), rel=1e-6)
    assert torch.allclose(hs.grad, gh, atol=1e-9) and torch.allclose(ws.grad, gw, atol=1e-9)
    assert n == hs.shape[0] * hs.shape[1]


@pytest.mark.parametrize("temperatures", [(0.5,), (1.0,), (3.0,), (2.0, 1.0), (3.0, 1.0, 1.5), (1.5, 1.0, 0.5)],
                         ids=lambda t: "-".join(map(str, t)))
@pytest.mark.parametrize("block", [1, 5, 1 << 18])
def test_log_normalizer_against_a_float64_reference(temperatures, block, monkeypatch):
    """log sum exp(x / T) per row from vocabulary blocks, with -inf entries; a row of -inf gives +inf. Several
    temperatures in one pass (log_normalizers): some from their own exponentials, some (a ratio of 2 or 3 to the
    first) from powers of the first one's."""
    monkeypatch.setattr(common, "VOCAB_BLOCK_ELEMENTS", block)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 23, generator=g) * 8
    x[0, 3] = x[1, :11] = float("-inf")
    x[2] += 60.0
    x[3] = float("-inf")
    shift, log_totals = common.log_normalizers(x, temperatures)
    if len(temperatures) == 1:
        assert [t.tolist() for t in common.log_normalizer(x, temperatures[0])] == [shift.tolist(), log_totals[0].tolist()]
    for temperature, log_total in zip(temperatures, log_totals):
        for row in range(3):
            finite = [v / temperature for v in x[row].tolist() if v != float("-inf")]
            top = max(finite)
            expected = top + math.log(sum(math.exp(v - top) for v in finite))
            assert shift[row, 0].item() / temperature + log_total[row, 0].item() == pytest.approx(expected, rel=1e-6)
        assert log_total[3, 0].item() == float("inf")


@pytest.mark.parametrize("layout", ["row-major", "vocabulary-major"])
@pytest.mark.parametrize("cls,opts", [(ForwardKL, {"temperature": 0.5}), (ForwardKL, {"temperature": 1.0}),
                                      (ForwardKL, {"temperature": 3.0}), (CrossEntropy, {})])
def test_analytic_path_with_minus_inf_logits_against_float64(cls, opts, layout, monkeypatch):
    """The in-place analytic path (what the fused path calls) on float32 chunks in either memory
    layout, over many vocabulary blocks, with -inf student and teacher logits, against float64:
    forward KL's value floors log p_s at LOG_FLOOR, its gradient is exactly T (p_s - p_t); a teacher
    row of -inf everywhere contributes 0 with a finite gradient."""
    monkeypatch.setattr(common, "VOCAB_BLOCK_ELEMENTS", 8)
    loss = make(cls, opts)
    g = torch.Generator().manual_seed(6)
    student = torch.randn(5, 19, generator=g) * 4
    teacher = torch.randn(5, 19, generator=g) * 4
    labels = torch.randint(0, 19, (5,), generator=g)
    student[0, 2] = student[3, 7] = teacher[1, 4] = teacher[3, 0] = float("-inf")
    teacher[4] = float("-inf")
    labels[0] = 1

    def laid_out(x):
        return x.clone() if layout == "row-major" else x.T.contiguous().T

    values, grad = loss.rows_and_grad(laid_out(student), laid_out(teacher), labels)
    s64, t64 = student.double(), teacher.double()
    if cls is CrossEntropy:
        expected_values = torch.logsumexp(s64, -1) - s64.gather(-1, labels[:, None])[:, 0]
        expected_grad = torch.softmax(s64, -1) - torch.nn.functional.one_hot(labels, 19)
    else:
        temp = opts["temperature"]
        log_ps = torch.log_softmax(s64 / temp, -1).clamp(min=common.LOG_FLOOR)
        log_pt = torch.log_softmax(t64[:4] / temp, -1)
        terms = torch.where(log_pt > float("-inf"), log_pt.exp() * (log_pt - log_ps[:4]), torch.zeros_like(log_pt))
        expected_values = torch.cat([terms.sum(-1) * temp * temp, torch.zeros(1, dtype=torch.float64)])
        p_t = torch.cat([torch.softmax(t64[:4] / temp, -1), torch.zeros(1, 19, dtype=torch.float64)])
        expected_grad = temp * (torch.softmax(s64 / temp, -1) - p_t)
    assert values[4].item() == pytest.approx(expected_values[4].item(), abs=1e-6)
    assert torch.allclose(values.double(), expected_values, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(grad).all() and torch.allclose(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


def test_fused_weighted_sum_of_several_losses():
    g = torch.Generator().manual_seed(2)
    hs = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(13, 5, generator=g, dtype=torch.float64, requires_grad=True)
    tl = torch.randn(7, 13, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 13, (7,), generator=g)
    losses = [("forward-kl", 0.7, make(ForwardKL, {"temperature": 2.0})), ("cross-entropy", 0.3, CrossEntropy()),
              ("jsd", 0.5, make(JSD, {"beta": 0.5}))]
    total, terms = fused_logit_loss(hs, ws, TeacherRows(kdistill.ModelOutputs(logits=tl), torch.ones(7, dtype=torch.bool)), labels, losses, chunk=2)
    ref = sum(w * dense(loss, (hs @ ws.T)[None], tl[None], labels[None]) for _, w, loss in losses)
    assert total.item() == pytest.approx(ref.item(), rel=1e-9)
    total.backward()
    gh, gw = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    ref.backward()
    assert torch.allclose(gh, hs.grad, atol=1e-9) and torch.allclose(gw, ws.grad, atol=1e-9)


def sparse_targets(teacher_logits, k, temp):
    log_pt = torch.log_softmax(teacher_logits / temp, dim=-1)
    top, ids = log_pt.topk(k, dim=-1)
    rest = 1 - top.exp().sum(-1)
    log_tail = torch.where(rest > 0, rest.clamp(min=1e-300).log(), torch.full_like(rest, float("-inf"))) if k < teacher_logits.shape[-1] \
        else torch.full_like(rest, float("-inf"))
    return kdistill.SparseTargets(ids=ids.to(torch.int32), logprobs=top, log_tail=log_tail, temperature=temp)


SPARSE = [c for c in CASES if c[0].supports_sparse]


@pytest.mark.parametrize("cls,opts", SPARSE, ids=[f"{c.name}-{'-'.join(str(v) for v in o.values())}" for c, o in SPARSE])
def test_sparse_with_k_equal_to_the_vocabulary_equals_dense(cls, opts):
    loss = make(cls, opts)
    student, teacher, labels = random_case(3)
    targets = sparse_targets(teacher, teacher.shape[-1], opts["temperature"])
    x1 = student.clone().requires_grad_(True)
    x2 = student.clone().requires_grad_(True)
    d = dense(loss, x1, teacher, labels)
    batch = kdistill.Batch(input_ids=labels.clamp(min=0), labels=labels)
    s = loss(kdistill.ModelOutputs(logits=x2), kdistill.ModelOutputs(sparse=targets), batch)
    assert s.item() == pytest.approx(d.item(), rel=1e-9)
    d.backward()
    s.backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-9)


@pytest.mark.parametrize("cls,opts", SPARSE, ids=[f"{c.name}-{'-'.join(str(v) for v in o.values())}" for c, o in SPARSE])
def test_sparse_top_k_matches_the_binned_reference(cls, opts):
    """k + 1 bins: the teacher's top-k tokens and one tail bin, for both distributions."""
    loss = make(cls, opts)
    student, teacher, labels = random_case(4)
    k, temp = 3, opts["temperature"]
    targets = sparse_targets(teacher, k, temp)
    batch = kdistill.Batch(input_ids=labels.clamp(min=0), labels=labels)
    value = loss(kdistill.ModelOutputs(logits=student), kdistill.ModelOutputs(sparse=targets), batch)
    ref = 0.0
    for b in range(labels.shape[0]):
        for s in range(labels.shape[1]):
            if labels[b, s] == -100:
                continue
            pt, ps = softmax(teacher[b, s].tolist(), temp), softmax(student[b, s].tolist(), temp)
            top = sorted(range(len(pt)), key=lambda i: -pt[i])[:k]
            bins_t = [pt[i] for i in top] + [1 - sum(pt[i] for i in top)]
            bins_s = [ps[i] for i in top] + [1 - sum(ps[i] for i in top)]
            ref += ref_dist(cls.name, bins_s, bins_t, opts)
    assert value.item() == pytest.approx(ref, rel=1e-7)


def test_sparse_targets_at_another_temperature_are_refused():
    student, teacher, labels = random_case(5)
    targets = sparse_targets(teacher, 3, 1.0)
    batch = kdistill.Batch(input_ids=labels.clamp(min=0), labels=labels)
    with pytest.raises(ValueError) as err:
        make(ForwardKL, {"temperature": 2.0})(kdistill.ModelOutputs(logits=student), kdistill.ModelOutputs(sparse=targets), batch)
    assert str(err.value) == "top-k targets were computed at temperature 1.0; the loss asks for 2.0"


def binned_forward_kl(student_rows, ids, bins_t, temp):
    """Plain-float forward KL to k bins and a tail bin, times T^2 (the tail's student mass summed, not 1 - top)."""
    total = 0.0
    for row, row_ids, row_bins in zip(student_rows, ids, bins_t):
        ps = softmax(row, temp)
        bins_s = [ps[i] for i in row_ids] + [sum(p for i, p in enumerate(ps) if i not in set(row_ids))]
        total += kl(row_bins, bins_s) * temp * temp
    return total


@pytest.mark.parametrize("layout", ["row-major", "vocabulary-major"])
@pytest.mark.parametrize("temp", [1.0, 2.0])
@pytest.mark.parametrize("kind", ["top-k", "sampled"])
def test_forward_kl_on_sparse_targets_fused_against_a_float64_reference(kind, temp, layout, monkeypatch):
    """The analytic sparse path of forward KL (the one a cached teacher's steps take), chunked over many
    vocabulary blocks in either layout: value against plain floats, gradient against central differences
    of that reference; top-k targets with their tail, and sampled targets (frequencies over distinct ids
    with fillers drawn 0 times, no tail)."""
    monkeypatch.setattr(common, "VOCAB_BLOCK_ELEMENTS", 4)
    g = torch.Generator().manual_seed(11)
    rows, v, k = 6, 13, 4
    student = torch.randn(rows, v, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(rows, v, generator=g, dtype=torch.float64) * 2
    if kind == "top-k":
        targets = sparse_targets(teacher, k, temp)
    else:
        from kdistill.plugins.teachers.cache_store import decode_sampled, sampled_draws

        draws, _ = sampled_draws(teacher, k, temp, g)
        sampled = decode_sampled(draws, temp, v)  # without the entropy: the KL to the draws
        targets = kdistill.SparseTargets(sampled.ids, sampled.logprobs.double(), sampled.log_tail.double(), temp,
                                         kind="sampled")
        assert all(len(set(r)) == k for r in targets.ids.tolist())
    ids = targets.ids.long().tolist()
    bins_t = [[math.exp(x) for x in lp] + [math.exp(t)] for lp, t in zip(targets.logprobs.tolist(), targets.log_tail.tolist())]
    loss = make(ForwardKL, {"temperature": temp})
    chunk = student.clone() if layout == "row-major" else student.T.contiguous().T
    values, grad = loss.rows_and_grad(chunk, targets, None)
    assert values.sum().item() == pytest.approx(binned_forward_kl(student.tolist(), ids, bins_t, temp), rel=1e-9)
    expected = numeric_grad(lambda z: binned_forward_kl(z.tolist(), ids, bins_t, temp), student.clone())
    assert torch.allclose(grad, expected, atol=1e-6)
    # and through the fused path from hidden states, in chunks of 4 rows
    hs = torch.randn(rows, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(rows, dtype=torch.bool)
    total, _ = fused_logit_loss(hs, ws, TeacherRows(kdistill.ModelOutputs(sparse=targets), mask), torch.zeros(rows, dtype=torch.long),
                                [("forward-kl", 1.0, loss)], chunk=4)
    total.backward()
    plain = loss(kdistill.ModelOutputs(logits=(hs @ ws.T)[None]), kdistill.ModelOutputs(sparse=kdistill.SparseTargets(
        targets.ids[None], targets.logprobs[None], targets.log_tail[None], temp, kind=kind)),
        kdistill.Batch(input_ids=torch.zeros(1, rows, dtype=torch.long), labels=torch.zeros(1, rows, dtype=torch.long)))
    assert total.item() == pytest.approx(plain.item(), rel=1e-9)
    gh, gw = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    plain.backward()
    assert torch.allclose(gh, hs.grad, atol=1e-9) and torch.allclose(gw, ws.grad, atol=1e-9)


def ref_cross_entropy(student_rows, labels):
    return sum(-math.log(softmax(row, 1.0)[y]) for row, y in zip(student_rows, labels))


@pytest.mark.parametrize("layout", ["row-major", "vocabulary-major"])
@pytest.mark.parametrize("temp", [1.0, 2.0, 1.5])
@pytest.mark.parametrize("kind", ["dense", "top-k", "sampled"])
def test_forward_kl_carrying_the_cross_entropy_against_a_float64_reference(kind, temp, layout, monkeypatch):
    """rows_and_grad_with_ce (what the fused path calls for forward KL + cross-entropy, in forward KL's own two
    passes): forward KL's rows and the cross-entropy's rows against plain floats, the gradient against central
    differences of forward KL + ce_scale x cross-entropy; some labels among the teacher's k tokens, some not."""
    monkeypatch.setattr(common, "VOCAB_BLOCK_ELEMENTS", 4)
    g = torch.Generator().manual_seed(12)
    rows, v, k, ce_scale = 6, 13, 4, 0.6
    student = torch.randn(rows, v, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(rows, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (rows,), generator=g)
    loss = make(ForwardKL, {"temperature": temp})
    if kind == "dense":
        targets = teacher

        def kl_ref(z):
            return sum(kl(softmax(t, temp), softmax(r, temp)) for r, t in zip(z.tolist(), teacher.tolist())) * temp * temp
    else:
        if kind == "top-k":
            targets = sparse_targets(teacher, k, temp)
        else:
            from kdistill.plugins.teachers.cache_store import decode_sampled, sampled_draws

            sampled = decode_sampled(sampled_draws(teacher, k, temp, g)[0], temp, v)
            targets = kdistill.SparseTargets(sampled.ids, sampled.logprobs.double(), sampled.log_tail.double(), temp,
                                             kind="sampled")
        labels[:2] = targets.ids[:2, 1].long()  # two labels among the k tokens
        outside = next(j for j in range(v) if j not in targets.ids[3].tolist() and j != labels[3])
        student[3, outside] = float("-inf")  # a -inf logit in the tail: probability 0, gradient 0
        ids = targets.ids.long().tolist()
        bins_t = [[math.exp(x) for x in lp] + [math.exp(t)] for lp, t in zip(targets.logprobs.tolist(), targets.log_tail.tolist())]

        def kl_ref(z):
            return binned_forward_kl(z.tolist(), ids, bins_t, temp)
    chunk = student.clone() if layout == "row-major" else student.T.contiguous().T
    values, ce_values, grad = loss.rows_and_grad_with_ce(chunk, targets, labels, ce_scale)
    assert values.sum().item() == pytest.approx(kl_ref(student), rel=1e-9)
    assert ce_values.tolist() == pytest.approx([ref_cross_entropy([r], [y]) for r, y in zip(student.tolist(), labels.tolist())],
                                               rel=1e-9)
    expected = numeric_grad(lambda z: kl_ref(z) + ce_scale * ref_cross_entropy(z.tolist(), labels.tolist()), student.clone())
    assert torch.allclose(grad, expected, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "dense-padded", "top-k"])
def test_the_fused_path_lets_forward_kl_carry_the_cross_entropy(kind, monkeypatch):
    """Forward KL + cross-entropy on the fused path: the cross-entropy loss's own rows_and_grad is never called
    (forward KL carries it), and total, each term and both gradients equal the plain path's over full logits; also
    with a teacher whose vocabulary is padded to more tokens (forward KL's autograd path, the cross-entropy over the
    student's vocabulary beside it)."""
    monkeypatch.setattr(common, "VOCAB_BLOCK_ELEMENTS", 8)
    g = torch.Generator().manual_seed(13)
    rows, v, d = 9, 23, 5
    hs = torch.randn(rows, d, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(rows, v + 3 if kind == "dense-padded" else v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (rows,), generator=g)
    dense = kind.startswith("dense")
    targets = teacher if dense else sparse_targets(teacher, 5, 2.0)
    outputs = kdistill.ModelOutputs(logits=teacher) if dense else kdistill.ModelOutputs(sparse=targets)
    losses = [("cross-entropy", 0.3, CrossEntropy()), ("forward-kl", 0.7, make(ForwardKL, {"temperature": 2.0}))]

    def refused(*args):
        raise AssertionError("the cross-entropy ran on its own")
    monkeypatch.setattr(CrossEntropy, "rows_and_grad", refused)
    total, terms = fused_logit_loss(hs, ws, TeacherRows(outputs, torch.ones(rows, dtype=torch.bool)), labels, losses, chunk=4)
    monkeypatch.undo()
    plain_outputs = kdistill.ModelOutputs(logits=teacher[None]) if dense else kdistill.ModelOutputs(
        sparse=kdistill.SparseTargets(targets.ids[None], targets.logprobs[None], targets.log_tail[None], 2.0))
    batch = kdistill.Batch(input_ids=labels[None], labels=labels[None])
    parts = {name: loss(kdistill.ModelOutputs(logits=(hs @ ws.T)[None]), plain_outputs, batch) for name, _, loss in losses}
    ref = sum(w * parts[name] for name, w, _ in losses)
    assert total.item() == pytest.approx(ref.item(), rel=1e-9)
    assert {name: t.item() for name, t in terms.items()} == pytest.approx({name: t.item() for name, t in parts.items()}, rel=1e-9)
    total.backward()
    gh, gw = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    ref.backward()
    assert torch.allclose(gh, hs.grad, atol=1e-9) and torch.allclose(gw, ws.grad, atol=1e-9)


def test_sampled_targets_give_the_full_forward_kl_gradient_in_expectation():
    """Random-sampling KD: averaged over draws, forward KL's gradient on sampled targets (counts / k) is the
    one on the full distribution, within 5 standard errors per logit; the top-k targets' gradient (same k) is
    biased far beyond that, so the check tells the two apart."""
    from kdistill.plugins.teachers.cache_store import decode_sampled, sampled_draws

    g = torch.Generator().manual_seed(12)
    temp, k, v, draws = 2.0, 4, 40, 3000
    student = torch.randn(1, v, generator=g, dtype=torch.float64)
    teacher = torch.randn(1, v, generator=g, dtype=torch.float64) * 3
    loss = make(ForwardKL, {"temperature": temp})
    _, full = loss.rows_and_grad(student.clone(), teacher.clone(), None)
    sampled = decode_sampled(sampled_draws(teacher.expand(draws, v), k, temp, g)[0], temp, v)
    targets = kdistill.SparseTargets(sampled.ids, sampled.logprobs.double(), sampled.log_tail.double(), temp, kind="sampled")
    _, grads = loss.rows_and_grad(student.expand(draws, v).clone(), targets, None)
    error = grads.mean(0) - full[0]
    standard_error = grads.std(0) / math.sqrt(draws)
    assert (error.abs() <= 5 * standard_error + 1e-12).all()
    _, top_k = loss.rows_and_grad(student.clone(), sparse_targets(teacher, k, temp), None)
    assert ((top_k[0] - full[0]).abs() > 5 * standard_error).any()


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_forward_kl_value_on_sampled_targets_with_the_teachers_entropy_estimates_the_full_kl(temp, monkeypatch):
    """With the teacher's entropy (what a sampled cache stores), forward KL's value on sampled targets is
    T^2 (-H(teacher) - sum p^ log p_s), against a float64 reference, the same on the fused path from hidden
    states and on the plain one; averaged over draws it is the full KL within 5 standard errors, where the KL
    to the draws (no entropy) is above it by far more. The gradient is the one without the entropy."""
    from kdistill.plugins.teachers.cache_store import counted, decode_sampled, sampled_draws

    monkeypatch.setattr(common, "VOCAB_BLOCK_ELEMENTS", 4)
    g = torch.Generator().manual_seed(14)
    k, v, draws = 8, 40, 2000
    student = torch.randn(1, v, generator=g, dtype=torch.float64)
    teacher = torch.randn(1, v, generator=g, dtype=torch.float64) * 3
    loss = make(ForwardKL, {"temperature": temp})
    full, _ = loss.rows_and_grad(student.clone(), teacher.clone(), None)
    drawn, entropy = sampled_draws(teacher.expand(draws, v), k, temp, g)
    ids, counts = counted(drawn, v)
    with_h, without = (decode_sampled(drawn, temp, v, h) for h in (entropy, None))
    values, grad = loss.rows_and_grad(student.expand(draws, v).clone(), with_h, None)
    plain_values, plain_grad = loss.rows_and_grad(student.expand(draws, v).clone(), without, None)
    assert torch.equal(grad, plain_grad)
    # the reference, row by row in floats
    p_t = [math.exp(x / temp) for x in teacher[0].tolist()]
    p_t = [x / sum(p_t) for x in p_t]
    h_t = -sum(x * math.log(x) for x in p_t)
    log_z = math.log(sum(math.exp(x / temp) for x in student[0].tolist()))
    log_ps = [x / temp - log_z for x in student[0].tolist()]
    for row in range(3):
        expected = temp * temp * (-h_t - sum(c / k * log_ps[i] for i, c in zip(ids[row].tolist(), counts[row].tolist())))
        assert values[row].item() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    error = values.mean() - full[0]
    assert abs(error) <= 5 * values.std() / math.sqrt(draws)
    assert plain_values.mean() - full[0] > 20 * values.std() / math.sqrt(draws)
    # fused from hidden states, in chunks of 4 rows, equals the plain loss on the same targets
    rows = 6
    targets = kdistill.SparseTargets(with_h.ids[:rows], with_h.logprobs[:rows].double(), with_h.log_tail[:rows].double(),
                                     temp, kind="sampled", entropy=with_h.entropy[:rows].double())
    hs = torch.randn(rows, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ws = torch.randn(v, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(rows, dtype=torch.bool)
    total, _ = fused_logit_loss(hs, ws, TeacherRows(kdistill.ModelOutputs(sparse=targets), mask),
                                torch.zeros(rows, dtype=torch.long), [("forward-kl", 1.0, loss)], chunk=4)
    batched = kdistill.SparseTargets(targets.ids[None], targets.logprobs[None], targets.log_tail[None], temp,
                                     kind="sampled", entropy=targets.entropy[None])
    plain = loss(kdistill.ModelOutputs(logits=(hs @ ws.T)[None]), kdistill.ModelOutputs(sparse=batched),
                 kdistill.Batch(input_ids=torch.zeros(1, rows, dtype=torch.long), labels=torch.zeros(1, rows, dtype=torch.long)))
    assert total.item() == pytest.approx(plain.item(), rel=1e-9)


def test_systematic_draws_take_every_token_floor_or_ceil_of_k_p_times_and_fill_with_ids_not_drawn():
    """k systematic draws: in id order, each token drawn floor(k p) or ceil(k p) times (p at T, float64
    reference; a token of no mass never), the entropy of softmax(logits / T); chunks of a few rows give the same
    draws as one chunk. `counted` turns them into k distinct ids: the drawn ones with their counts, then the
    smallest ids not drawn with count 0."""
    from kdistill.plugins.teachers.cache_store import counted, sampled_draws

    logits = torch.tensor([[10.0, 9.0, 0.0, -1.0, -50.0, 8.0, -math.inf]])
    for temp in (1.0, 2.0):
        p = [math.exp(x / temp) for x in logits[0].tolist()]
        p = [x / sum(p) for x in p]
        for seed in range(20):
            draws, entropy = sampled_draws(logits, 4, temp, torch.Generator().manual_seed(seed))
            assert draws.tolist()[0] == sorted(draws.tolist()[0])
            for token in range(7):
                assert math.floor(4 * p[token]) <= draws[0].tolist().count(token) <= math.ceil(4 * p[token])
            assert entropy.item() == pytest.approx(-sum(x * math.log(x) for x in p if x > 0), abs=1e-6)
    g = torch.Generator().manual_seed(13)
    many = torch.randn(50, 300, generator=g) * 3
    whole, h_whole = sampled_draws(many, 16, 2.0, torch.Generator().manual_seed(1))
    chunked, h_chunked = sampled_draws(many, 16, 2.0, torch.Generator().manual_seed(1), chunk_elements=3 * 300)
    assert torch.equal(whole, chunked) and torch.allclose(h_whole, h_chunked)
    ids, counts = counted(torch.tensor([[1, 1, 3, 5, 5, 5]]), 10)
    assert ids.tolist() == [[1, 3, 5, 0, 2, 4]] and counts.tolist() == [[2, 1, 3, 0, 0, 0]]


@pytest.mark.parametrize("cls,opts", CASES, ids=IDS)
def test_accumulating_micro_batches_equals_one_large_batch(cls, opts):
    loss = make(cls, opts)
    student, teacher, labels = random_case(6, b=4)
    x = student.clone().requires_grad_(True)
    count = int((labels != -100).sum())
    (dense(loss, x, teacher, labels) / count).backward()
    big = x.grad.clone()
    x.grad = None
    for part in range(2):  # the engine divides each micro-batch's sum by the whole step's count
        rows = slice(2 * part, 2 * part + 2)
        (dense(loss, x[rows], teacher[rows], labels[rows]) / count).backward()
    assert torch.allclose(x.grad, big, atol=1e-12)


@pytest.mark.parametrize("cls,opts", CASES, ids=IDS)
def test_padded_vocabularies_use_the_shared_tokens(cls, opts):
    loss = make(cls, opts)
    student, teacher, labels = random_case(7)
    padded = torch.cat([student, torch.randn(*student.shape[:2], 3, dtype=torch.float64)], dim=-1)  # student vocab 7 + 3
    ref = ref_sum(cls.name, student.tolist(), teacher.tolist(), labels.tolist(), opts) if cls is not CrossEntropy \
        else ref_sum(cls.name, padded.tolist(), padded.tolist(), labels.tolist(), opts)  # CE uses the full student vocabulary
    assert dense(loss, padded, teacher, labels).item() == pytest.approx(ref, rel=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls,opts", CASES, ids=IDS)
def test_finite_with_half_precision_minus_inf_and_all_padding(cls, opts, dtype):
    loss = make(cls, opts)
    student, teacher, labels = random_case(8)
    s = (student * 20).to(dtype)
    t = (teacher * 20).to(dtype)
    s[0, 0, 1] = float("-inf")
    t[0, 1, 2] = float("-inf")
    t[1, 2, 0] = torch.finfo(dtype).max
    x = s.clone().requires_grad_(True)
    value = dense(loss, x, t, labels)
    value.backward()
    assert value.dtype in (torch.float32, torch.float64) and torch.isfinite(value)
    assert torch.isfinite(x.grad).all()
    x.grad = None
    empty = dense(loss, x, t, torch.full_like(labels, -100))
    empty.backward()
    assert empty.item() == 0.0 and x.grad.abs().max().item() == 0.0


@pytest.mark.parametrize("cls,opts", CASES, ids=IDS)
def test_conformance_kit(cls, opts):
    import importlib

    check_component(cls, plugin=importlib.import_module(cls.__module__))


def test_conformance_kit_refuses_a_carried_cross_entropy_at_the_wrong_scale():
    from kdistill.testing import check_carried_cross_entropy

    check_carried_cross_entropy(ForwardKL, ForwardKL.Options(temperature=2.0))  # forward KL itself passes

    class Unscaled(ForwardKL):
        name = "unscaled-kl"

        def rows_and_grad_with_ce(self, student, teacher, labels, ce_scale):
            return super().rows_and_grad_with_ce(student, teacher, labels, 1.0)

    with pytest.raises(AssertionError) as err:
        check_carried_cross_entropy(Unscaled, Unscaled.Options(temperature=2.0))
    assert str(err.value) == ("unscaled-kl: rows_and_grad_with_ce's gradient must be the loss's own plus ce_scale x the "
                              "cross-entropy's")


TEMPERED = [(cls, opts) for cls, opts in CASES if "temperature" in opts]


@pytest.mark.parametrize("temperature", [0.05, 0.3, 1.0, 4.0, 10.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls,opts", TEMPERED, ids=[f"{c.name}-{i}" for i, (c, o) in enumerate(TEMPERED)])
def test_finite_at_extreme_temperatures_and_values_near_the_type_limit(cls, opts, dtype, temperature):
    loss = make(cls, {**opts, "temperature": temperature})
    student, teacher, labels = random_case(9)
    big = torch.finfo(dtype).max
    s = (student * 30).to(dtype)
    t = (teacher * 30).to(dtype)
    s[0, 0, 1], s[1, 1, 3], s[1, 2, 4] = float("-inf"), big, -big
    t[0, 1, 2], t[1, 2, 0], t[1, 3, 5] = float("-inf"), big, -big
    x = s.clone().requires_grad_(True)
    value = dense(loss, x, t, labels)
    value.backward()
    assert torch.isfinite(value) and value.item() >= -1e-6
    assert torch.isfinite(x.grad).all()
    x.grad = None
    empty = dense(loss, x, t, torch.full_like(labels, -100))
    empty.backward()
    assert empty.item() == 0.0 and x.grad.abs().max().item() == 0.0
