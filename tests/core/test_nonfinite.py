"""Non-finite weights are never trained on or saved (hardening, second pass)."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import engine_for
from kdistill.core.backends import refuse_non_finite
from kdistill.core.errors import RunFailed
from kdistill.evaluators.perplexity import perplexity


def every_saved_tensor_is_finite(run):
    files = list(run.rglob("*.safetensors"))
    return files, all(bool(torch.isfinite(t).all()) for f in files for t in load_file(str(f)).values() if t.is_floating_point())


@pytest.mark.parametrize("lr", [1e6, 1e39])
def test_a_diverging_run_stops_before_anything_non_finite_is_saved(recipe_factory, tmp_path, lr):
    """lr 1e6: a finite first step, then NaN (1e3 did that within 6 steps on one CPU and stayed finite, if huge, on
    an AVX-512 one); lr 1e39: the first update itself overflows float32."""
    raw = recipe_factory(steps=6, lr=lr, grad_clip=None, save_every=1, keep_checkpoints=10)
    with pytest.raises(RunFailed) as info:
        engine_for(raw).run()
    message = info.value.problems[0]
    assert "stopping before it" in message and info.value.exit_code == 1, message
    if lr == 1e39:  # torch refuses to cast the learning rate to float32
        assert message.startswith("the optimizer overflowed at learning rate ") and "(train.lr too large" in message, message
    files, finite = every_saved_tensor_is_finite(tmp_path / "run")
    assert finite, files
    assert not (tmp_path / "run" / "final").exists()


def test_an_update_that_makes_a_weight_non_finite_stops_the_step(recipe_factory):
    engine = engine_for(recipe_factory(steps=2))
    engine.build()
    original = engine.optimizer.step

    def overflowing_step(*args, **kwargs):
        original(*args, **kwargs)
        with torch.no_grad():
            next(engine.student.parameters()).view(-1)[0] = float("inf")
    engine.optimizer.step = overflowing_step
    with pytest.raises(RunFailed) as info:
        engine.train_step(0)
    first = next(name for name, _ in engine.student.named_parameters())
    assert info.value.problems == [f"step 1: the update made student.{first} non-finite (train.lr 0.001 too large?); "
                                   "stopping before it is saved (last checkpoint kept)"]


def test_gradients_are_checked_without_clipping(recipe_factory, tmp_path):
    raw = recipe_factory(steps=3, grad_clip=None, save_every=1, on_nonfinite="skip")
    engine = engine_for(raw)
    engine.build()
    before = {k: v.clone() for k, v in engine.student.state_dict().items()}
    for p in engine.student.parameters():
        p.register_hook(lambda g: g * float("inf"))
    with pytest.warns(UserWarning, match="step 1: the gradient norm is (inf|nan); skipping the step"):
        metrics = engine.train_step(0)
    assert metrics["train/skipped_steps"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in engine.student.state_dict().items())


def test_a_run_that_skips_most_of_its_steps_fails_saying_why(recipe_factory, tmp_path):
    raw = recipe_factory(steps=4, on_nonfinite="skip", eval_every=0)
    raw["evaluators"] = []
    engine = engine_for(raw)
    original = engine.build

    def all_nan():
        original()
        step_loss = engine.strategy.loss

        def loss(batch):
            total, terms = step_loss(batch)
            return total * float("nan"), terms
        engine.strategy.loss = loss
    engine.build = all_nan
    with pytest.warns(UserWarning), pytest.raises(RunFailed) as info:
        engine.run()
    assert info.value.problems == ["step 3: 3 of 4 steps skipped, more than train.max_skipped_share (0.5); the run is not trained"]
    assert not (tmp_path / "run" / "final").exists()


def test_nothing_non_finite_is_written(tmp_path):
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(RunFailed) as info:
        refuse_non_finite({"student": layer}, tmp_path / "final")
    assert info.value.problems == [f"{tmp_path / 'final'}: not written, parameter student.weight is not finite"]


def test_the_perplexity_of_a_diverged_model_is_inf_not_an_overflow():
    assert perplexity(800.0) == math.inf and perplexity(math.log(7.0)) == pytest.approx(7.0)
