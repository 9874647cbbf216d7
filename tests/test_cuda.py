"""The CUDA paths: the fused loss against the plain full-logits path and float64 in float32, bfloat16 and
under autocast; every logit loss's gradient against float64; vocabulary blocks and the memory budget;
the strategies' one-step smoke tests; checkpoint save/resume bit-exactness.

Tests marked `cuda` run on a GPU (benchmarks/gpu_check.py runs them with `-m cuda`) and are skipped
without one. Where a body is cheap it also runs on CPU (the `cpu` parameter), so the references and
helpers here are exercised on every commit.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import kdistill
from conftest import cut_after, numeric_grad, tiny_recipe
from kdistill.core import fused
from kdistill.core.fused import TeacherRows, budget_chunk, chunk_tensors, fused_logit_loss
from kdistill.plugins.losses import common
from kdistill.plugins.losses.cross_entropy import CrossEntropy
from kdistill.plugins.losses.forward_kl import ForwardKL
from kdistill.plugins.losses.jsd import JSD
from kdistill.plugins.losses.logit_mse import LogitMSE
from kdistill.plugins.losses.reverse_kl import ReverseKL
from kdistill.plugins.losses.skew_kl import SkewKL
from kdistill.plugins.losses.tvd import TVD

NEEDS_CUDA = "needs a CUDA GPU; benchmarks/gpu_check.py runs them"
HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)])
CPU_AND_CUDA = [pytest.param("cpu"), CUDA]
cuda_only = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason=NEEDS_CUDA)]

LOSS_CASES = [
    (ForwardKL, {"temperature": 2.0}),
    (ForwardKL, {"temperature": 0.7}),
    (ReverseKL, {"temperature": 1.5}),
    (JSD, {"temperature": 1.0, "beta": 0.3}),
    (SkewKL, {"temperature": 2.0, "alpha": 0.2, "direction": "forward"}),
    (SkewKL, {"temperature": 1.0, "alpha": 0.4, "direction": "reverse"}),
    (TVD, {"temperature": 1.3}),
    (LogitMSE, {}),
    (CrossEntropy, {}),
]
LOSS_IDS = [f"{c.name}-{'-'.join(str(v) for v in o.values())}" for c, o in LOSS_CASES]

STRATEGIES = {
    "offline": {},
    "online": {"teacher_lr_scale": 0.5},
    "mutual": {"peer_layers": [[1, 2]]},
    "ema-self": {"decay": 0.9},
    "multi-view": {"view": "mask", "rate": 0.2},
    "mtp-self": {"n_future": 2},
}


def make(cls, opts):
    return cls(cls.Options(**opts))


# --------------------------------------------------------------------------- float64 references


def reference_rows_and_grad(loss, student, teacher, labels):
    """Per-row values and d(sum)/d(student) in float64 on CPU, by autograd through the loss's `rows`."""
    s = student.detach().double().cpu().requires_grad_(True)
    t = teacher.detach().double().cpu() if teacher is not None else None
    values = loss.rows(s, t, labels.cpu())
    (grad,) = torch.autograd.grad(values.sum(), s)
    return values.detach(), grad


def reference_total(hidden, weight, t_hidden, t_weight, labels, losses):
    """Weighted sum over counted rows of every loss from hidden states, float64 on CPU, with the
    gradients of the student's hidden states and output weight."""
    h = hidden.detach().double().cpu().requires_grad_(True)
    w = weight.detach().double().cpu().requires_grad_(True)
    t = t_hidden.detach().double().cpu() @ t_weight.detach().double().cpu().T
    s = h @ w.T
    total = sum(wt * loss.rows(s, t, labels.cpu()).sum() for _, wt, loss in losses)
    total.backward()
    return total.item(), h.grad, w.grad


def case(device, n=37, d=24, dt=40, v=301, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g).mul_(0.7)
    weight = torch.randn(v, d, generator=g).mul_(d ** -0.5 * 3)
    t_hidden = torch.randn(n, dt, generator=g).mul_(0.7)
    t_weight = torch.randn(v, dt, generator=g).mul_(dt ** -0.5 * 3)
    labels = torch.randint(0, v, (n,), generator=g)
    return [x.to(device=device, dtype=dtype) for x in (hidden, weight, t_hidden, t_weight)] + [labels.to(device)]


def kl_ce():
    return [("forward-kl", 0.5, make(ForwardKL, {"temperature": 2.0})), ("cross-entropy", 0.5, CrossEntropy())]


def run_fused(hidden, weight, t_hidden, t_weight, labels, losses, **options):
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    rows = TeacherRows(kdistill.ModelOutputs(final_hidden=t_hidden, output_weight=t_weight),
                       torch.ones(hidden.shape[0], dtype=torch.bool, device=hidden.device))
    total, terms = fused_logit_loss(hidden, weight, rows, labels, losses, **options)
    total.backward()
    return total, terms, hidden.grad, weight.grad


def run_plain(hidden, weight, t_hidden, t_weight, labels, losses):
    """The plain path: full logits [1, N, V] through each loss's __call__ (as the engine's full-logits path)."""
    hidden = hidden.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(True)
    logits = (hidden @ weight.T)[None]
    with torch.no_grad():
        t_logits = (t_hidden @ t_weight.T)[None]
    batch = kdistill.Batch(input_ids=labels[None].clamp(min=0), labels=labels[None])
    total = sum(w * loss(kdistill.ModelOutputs(logits=logits), kdistill.ModelOutputs(logits=t_logits), batch) for _, w, loss in losses)
    total.backward()
    return total, hidden.grad, weight.grad


def close(actual, expected, rel, what):
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().item() or 1.0
    err = (actual - expected).abs().max().item() / scale
    assert err <= rel, f"{what}: max error {err:.3g} of the largest value (allowed {rel:.3g})"


# --------------------------------------------------------------------------- the references themselves


def test_float64_reference_matches_central_differences():
    """reference_rows_and_grad, used against every device below, agrees with finite differences."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(2, 5, generator=g, dtype=torch.float64) * 2
    teacher = torch.randn(2, 5, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, 5, (2,), generator=g)
    for cls, opts in LOSS_CASES:
        loss = make(cls, opts)
        _, grad = reference_rows_and_grad(loss, student, teacher, labels)
        numeric = numeric_grad(lambda x, loss=loss: loss.rows(x, teacher, labels).sum().item(), student.clone())
        assert torch.allclose(grad, numeric, atol=1e-6), cls.name


# --------------------------------------------------------------------------- the fused path on the device


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "autocast"])
def test_fused_path_matches_the_plain_path_and_float64(device, dtype):
    """Forward KL (T=2) + cross-entropy from hidden states in chunks of 8 and at the default chunk,
    against the full-logits path in the same precision and float64 on CPU. bfloat16: weights and
    hidden states in bfloat16; autocast: float32 ones under torch.autocast(bfloat16), products in bfloat16."""
    dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    inputs = case(device, dtype=dt)
    losses = kl_ce()
    ref, ref_gh, ref_gw = reference_total(*inputs, losses)
    # float32: only summation order differs; bfloat16 products carry 8 bits of mantissa
    rel = 2e-5 if dtype == "float32" else 3e-2
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "autocast")
    for chunk in (8, None):
        with autocast:
            total, terms, gh, gw = run_fused(*inputs, losses, chunk=chunk)
        assert total.dtype == torch.float32 and gh.dtype == dt and gw.dtype == dt
        assert math.isclose(total.item(), ref, rel_tol=rel), (chunk, total.item(), ref)
        assert math.isclose(sum(w * terms[name].item() for name, w, _ in losses), ref, rel_tol=rel)
        close(gh, ref_gh, rel, f"hidden gradient, chunk {chunk}")
        close(gw, ref_gw, rel, f"weight gradient, chunk {chunk}")
    with autocast:
        plain, p_gh, p_gw = run_plain(*inputs, losses)
    assert math.isclose(plain.item(), ref, rel_tol=rel)
    close(p_gh, ref_gh, rel, "plain path's hidden gradient")
    close(p_gw, ref_gw, rel, "plain path's weight gradient")


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("cls,opts", LOSS_CASES, ids=LOSS_IDS)
def test_every_logit_loss_gradient_against_float64(device, cls, opts):
    """float32 on the device: the analytic or autograd `rows_and_grad` (the fused path's), the plain
    path's autograd, and the fused path from hidden states over several chunks, against float64."""
    loss = make(cls, opts)
    g = torch.Generator().manual_seed(5)
    student = (torch.randn(9, 257, generator=g) * 3).to(device)
    teacher = (torch.randn(9, 257, generator=g) * 3).to(device)
    labels = torch.randint(0, 257, (9,), generator=g).to(device)
    ref_values, ref_grad = reference_rows_and_grad(loss, student, teacher, labels)
    values, grad = loss.rows_and_grad(student.clone(), teacher.clone(), labels)
    assert values.device.type == device and grad.device.type == device
    close(values, ref_values, 1e-5, f"{cls.name} values")
    close(grad, ref_grad, 1e-5, f"{cls.name} gradient")
    leaf = student.clone().requires_grad_(True)
    loss.rows(leaf, teacher, labels).sum().backward()
    close(leaf.grad, ref_grad, 1e-5, f"{cls.name} autograd gradient")

    inputs = case(device, n=21, v=97, seed=6)
    ref, ref_gh, ref_gw = reference_total(*inputs, [(cls.name, 1.0, loss)])
    total, _, gh, gw = run_fused(*inputs, [(cls.name, 1.0, loss)], chunk=8)
    assert math.isclose(total.item(), ref, rel_tol=1e-5)
    close(gh, ref_gh, 1e-5, f"{cls.name} fused hidden gradient")
    close(gw, ref_gw, 1e-5, f"{cls.name} fused weight gradient")


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_vocabulary_blocks_cover_the_vocabulary_within_the_device_size(device):
    x = torch.zeros(64, 100_003, device=device)
    limit = common.vocab_block_elements(x.device)
    blocks = common.vocab_blocks(x)
    assert blocks[0].start == 0 and blocks[-1].stop == x.shape[1]
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))
    widest = limit if device == "cpu" else max(limit, -(-x.shape[1] // common.MAX_ACCELERATOR_BLOCKS) * x.shape[0])
    assert all((b.stop - b.start) * x.shape[0] <= widest for b in blocks)
    if device == "cuda":  # a block's three float32 temporaries and its input fit in the GPU's L2 cache
        l2 = getattr(torch.cuda.get_device_properties(x.device), "L2_cache_size", 0)
        assert limit >= common.VOCAB_BLOCK_ELEMENTS and (not l2 or limit * 4 * 4 <= max(l2, 16 * common.VOCAB_BLOCK_ELEMENTS))


@pytest.mark.parametrize("device", CPU_AND_CUDA)
@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_log_normalizer_over_device_sized_blocks_against_float64(device, temperature, monkeypatch):
    """Many blocks (a device-sized block is shrunk to 97 elements) and -inf entries, against float64."""
    monkeypatch.setattr(common, "vocab_block_elements", lambda device: 97)
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 1000, generator=g) * 5)
    x[0, :500] = float("-inf")
    x[1] = float("-inf")
    shift, log_total = common.log_normalizer(x.to(device), temperature)
    got = (shift / temperature + log_total).cpu().double().squeeze(-1)
    expected = torch.logsumexp(x.double() / temperature, dim=-1)
    assert torch.isinf(got[1]) and got[1] > 0 or torch.isneginf(expected[1])
    assert torch.allclose(got[[0, 2, 3, 4, 5]], expected[[0, 2, 3, 4, 5]], rtol=1e-6)


# --------------------------------------------------------------------------- chunk size: memory budget


def test_budget_chunk_fits_the_budget_and_explicit_chunks_win(monkeypatch):
    for vocab in (97, 32_000, 128_256, 262_144):
        for tensors in (1, 2, 3, 7):
            rows = budget_chunk(vocab, tensors, 64)
            assert rows >= 8 and (rows < 32 or rows % 32 == 0)
            assert rows == 8 or rows * tensors * vocab * 4 <= 64 * 2**20
            assert (rows + 32) * tensors * vocab * 4 > 64 * 2**20 or rows < 32  # the largest multiple of 32 that fits
    assert chunk_tensors(kl_ce()) == 2  # student chunk, teacher chunk; forward KL carries the cross-entropy (no copy)
    assert chunk_tensors(kl_ce(), compiled=True) == 3  # compiled: a copy for forward KL
    assert chunk_tensors([("forward-kl", 1.0, make(ForwardKL, {}))]) == 2
    assert chunk_tensors([("cross-entropy", 1.0, CrossEntropy())]) == 1
    assert chunk_tensors([("jsd", 1.0, make(JSD, {"beta": 0.5}))]) == 2 + fused.AUTOGRAD_CHUNK_TEMPORARIES

    seen = []
    original = fused._FusedLogitLoss.apply

    def spy(*args):
        seen.append(args[5])
        return original(*args)
    monkeypatch.setattr(fused._FusedLogitLoss, "apply", spy)
    inputs = case("cpu", n=300, v=1000)
    budget = 2 * 100 * 1000 * 4 / 2**20  # room for 100 positions of 2 chunk-sized tensors
    a = run_fused(*inputs, kl_ce(), memory_budget_mib=budget)
    b = run_fused(*inputs, kl_ce(), chunk=17, memory_budget_mib=budget)
    c = run_fused(*inputs, kl_ce())
    assert seen == [96, 17, budget_chunk(1000, 2, fused.DEFAULT_MEMORY_BUDGET_MIB)]
    for x, y in ((a, b), (a, c)):
        assert math.isclose(x[0].item(), y[0].item(), rel_tol=1e-6)
        close(x[2], y[2], 1e-5, "hidden gradient")
        close(x[3], y[3], 1e-5, "weight gradient")


@pytest.mark.parametrize("options,field", [({"chunk": 0}, "chunk"), ({"chunk": 2.5}, "chunk"),
                                           ({"memory_budget_mib": 0}, "memory_budget_mib"),
                                           ({"memory_budget_mib": -3.0}, "memory_budget_mib")])
def test_bad_chunk_options_are_refused_naming_the_field(options, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        run_fused(*case("cpu", n=4, v=10), kl_ce(), **options)


@pytest.mark.parametrize("device", [CUDA])
def test_fused_peak_memory_stays_within_the_budget_on_cuda(device):
    """max_memory_allocated above the inputs: the two gradients, the chunk tensors the budget allows and
    the vocabulary blocks' temporaries; the full logits would be 4 x [N, V] float32 (more than 10x that)."""
    n, v, d = 4096, 32_000, 256
    inputs = case(device, n=n, d=d, dt=d, v=v)
    hidden = inputs[0].requires_grad_(True)
    weight = inputs[1].requires_grad_(True)
    rows = TeacherRows(kdistill.ModelOutputs(final_hidden=inputs[2], output_weight=inputs[3]),
                       torch.ones(n, dtype=torch.bool, device=device))
    budget = 16.0
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    total, _ = fused_logit_loss(hidden, weight, rows, inputs[4], kl_ce(), memory_budget_mib=budget)
    total.backward()
    torch.cuda.synchronize()
    extra = (torch.cuda.max_memory_allocated() - base) / 2**20
    gradients = (n * d + v * d) * 4 / 2**20 * 2  # accumulators, then the .grad tensors handed over
    blocks = 4 * min(common.vocab_block_elements(hidden.device), budget_chunk(v, 2, budget) * v) * 4 / 2**20
    assert extra <= gradients + budget + blocks + 8, extra
    assert extra < 4 * n * v * 4 / 2**20 / 10


@pytest.mark.parametrize("device", [CUDA])
def test_compiled_element_wise_part_matches_float64_on_cuda(device):
    """compile=True (torch.compile of each loss's rows and gradient) against float64; the CPU
    measurement of this path is in docs/performance.md (compiling costs too long for the CPU suite)."""
    inputs = case(device)
    losses = kl_ce()
    ref, ref_gh, ref_gw = reference_total(*inputs, losses)
    total, _, gh, gw = run_fused(*inputs, losses, chunk=8, compile=True)
    assert math.isclose(total.item(), ref, rel_tol=2e-5)
    close(gh, ref_gh, 2e-5, "hidden gradient")
    close(gw, ref_gw, 2e-5, "weight gradient")


# --------------------------------------------------------------------------- whole runs on the device


def run_recipe(assets, out, device, strategy="offline", **train):
    raw = tiny_recipe(assets, out, **{"steps": 1, "eval_every": 0, "device": device, "num_threads": 1, **train})
    raw["strategy"] = {"name": strategy, "options": STRATEGIES[strategy]}
    raw["evaluators"] = []
    return raw


def step_losses(out):
    return {r["step"]: r["metrics"]["train/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in r.get("metrics", {})}


# on CPU the test suite's own strategy tests cover this; the resume test below runs the same helpers on CPU
@pytest.mark.parametrize("device,strategy", [pytest.param("cuda", s, marks=cuda_only) for s in STRATEGIES])
def test_strategy_trains_one_step(tiny_assets, tmp_path, device, strategy):
    raw = run_recipe(tiny_assets, tmp_path / "run", device, strategy)
    summary = kdistill.run(raw)
    losses = step_losses(tmp_path / "run")
    assert list(losses) == [1] and math.isfinite(losses[1]) and losses[1] > 0
    assert load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert summary["final_model"]


@pytest.mark.parametrize("device", [CUDA])
def test_bfloat16_student_trains_one_step(tiny_assets, tmp_path, device):
    raw = run_recipe(tiny_assets, tmp_path / "run", device, steps=2)
    raw["student"]["dtype"] = "bfloat16"
    kdistill.run(raw)
    losses = step_losses(tmp_path / "run")
    assert sorted(losses) == [1, 2] and all(math.isfinite(x) for x in losses.values())


@pytest.mark.parametrize("device", CPU_AND_CUDA)
def test_resume_from_a_checkpoint_is_bit_exact(tiny_assets, tmp_path, device):
    """4 steps saving every 2; a copy cut back to step 2 and resumed ends with the same step-4 weights."""
    raw = run_recipe(tiny_assets, tmp_path / "run", device, steps=4, save_every=2, keep_checkpoints=3)
    kdistill.run(raw)
    again = cut_after(raw, tmp_path / "resumed", "step-00000004")
    kdistill.run(again, resume=True)
    a = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full, resumed = step_losses(tmp_path / "run"), step_losses(tmp_path / "resumed")
    assert resumed[3] == full[3] and resumed[4] == full[4]
