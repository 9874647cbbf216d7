"""Loss weights and temperatures that follow a schedule over the steps, and the one owner of temperature."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import kdistill
from conftest import cut_after, engine_for
from kdistill.core.config import resolve
from kdistill.core.errors import ConfigError
from kdistill.core.registry import Registry
from kdistill.plugins.losses.forward_kl import ForwardKL


def scheduled_recipe(recipe_factory, steps=5, **train):
    raw = recipe_factory(steps=steps, save_every=1, keep_checkpoints=10, eval_every=0, **train)
    raw["evaluators"] = []
    raw["losses"][0]["weight"] = {"schedule": "linear", "start": 0.2, "end": 1.0}
    raw["losses"][0]["options"]["temperature"] = {"schedule": "cosine", "start": 4.0, "end": 1.0}
    return raw


def test_schedules_move_from_start_to_end():
    linear = kdistill.Schedule(schedule="linear", start=4.0, end=1.0)
    cosine = kdistill.Schedule(schedule="cosine", start=4.0, end=1.0)
    assert [linear.at(s, 4) for s in range(4)] == pytest.approx([4.0, 3.0, 2.0, 1.0], abs=1e-12)
    expected = [4.0 - 3.0 * (1 - math.cos(math.pi * s / 3)) / 2 for s in range(4)]
    assert [cosine.at(s, 4) for s in range(4)] == pytest.approx(expected, abs=1e-12)
    assert kdistill.value_at(2.5, 3, 4) == 2.5 and kdistill.Schedule(schedule="constant", start=3.0).at(7, 9) == 3.0


@pytest.mark.parametrize(("where", "value", "message"), [
    ("options.temperature", {"schedule": "linear", "start": 2.0, "end": -1.0},
     "losses[0].options.temperature: Input should be greater than 0"),
    ("options.temperature", {"schedule": "linear", "start": 2.0},
     "losses[0].options.temperature: Value error, a linear schedule needs `end`"),
    ("weight", {"schedule": "cosine", "start": -0.5, "end": 1.0}, "losses[0].weight: Input should be greater than or equal to 0"),
    ("weight", {"schedule": "exponential", "start": 1.0, "end": 0.0}, "losses[0].weight.schedule: Input should be 'constant', "
     "'linear' or 'cosine'"),
])
def test_a_bad_schedule_is_refused_naming_the_field(recipe_factory, where, value, message):
    raw = recipe_factory()
    if where == "weight":
        raw["losses"][0]["weight"] = value
    else:
        raw["losses"][0]["options"]["temperature"] = value
    with pytest.raises(ConfigError) as info:
        resolve(raw, Registry.from_plugins())
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_scheduled_weight_and_temperature_take_each_steps_value_and_are_logged(recipe_factory, tmp_path):
    raw = scheduled_recipe(recipe_factory)
    engine = engine_for(raw)
    seen = []
    original, original_with_ce = ForwardKL.rows_and_grad, ForwardKL.rows_and_grad_with_ce

    def spy(self, student, teacher, labels):
        seen.append(self.temperature)
        return original(self, student, teacher, labels)

    def spy_with_ce(self, student, teacher, labels, ce_scale):  # the fused path's call with a cross-entropy carried
        seen.append(self.temperature)
        return original_with_ce(self, student, teacher, labels, ce_scale)
    ForwardKL.rows_and_grad, ForwardKL.rows_and_grad_with_ce = spy, spy_with_ce
    try:
        engine.run()
    finally:
        ForwardKL.rows_and_grad, ForwardKL.rows_and_grad_with_ce = original, original_with_ce
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row["metrics"] for row in logged if "schedule/forward-kl.weight" in row.get("metrics", {})}
    weights = [0.2 + 0.8 * s / 4 for s in range(5)]
    temperatures = [4.0 - 3.0 * (1 - math.cos(math.pi * s / 4)) / 2 for s in range(5)]
    assert [by_step[s + 1]["schedule/forward-kl.weight"] for s in range(5)] == pytest.approx(weights, abs=1e-12)
    assert [by_step[s + 1]["schedule/forward-kl.temperature"] for s in range(5)] == pytest.approx(temperatures, abs=1e-12)
    assert "schedule/cross-entropy.weight" not in by_step[1]  # a plain number is not a schedule
    assert sorted(set(seen), reverse=True) == pytest.approx(temperatures, abs=1e-12)  # the loss computed at each


def test_a_scheduled_run_resumes_exactly(recipe_factory, tmp_path):
    raw = scheduled_recipe(recipe_factory)
    engine_for(raw).run()
    again = cut_after(raw, tmp_path / "resumed", "step-00000003")
    engine_for(again).run(resume=True)
    a = load_file(str(tmp_path / "run" / "checkpoints" / "step-00000005" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "checkpoints" / "step-00000005" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_constant_schedule_is_the_plain_number(recipe_factory, tmp_path):
    plain = recipe_factory(steps=3, eval_every=0)
    plain["evaluators"] = []
    engine_for(plain).run()
    same = json.loads(json.dumps(plain))
    same["output_dir"] = str(tmp_path / "same")
    same["losses"][0]["weight"] = {"schedule": "constant", "start": plain["losses"][0]["weight"]}
    same["losses"][0]["options"]["temperature"] = {"schedule": "constant", "start": 2.0}
    engine_for(same).run()
    a = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "same" / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_temperature_has_one_owner():
    from kdistill.evaluators.agreement import Agreement
    from kdistill.plugins.teachers.cached import CachedTeacher
    from kdistill.strategies.mtp_self import MTPSelf

    for cls in (ForwardKL, MTPSelf):
        assert issubclass(cls.Options, kdistill.TemperatureOptions)
    for cls in (CachedTeacher, Agreement):
        assert issubclass(cls.Options, kdistill.ConstantTemperatureOptions)
    with pytest.raises(ValueError, match="greater than 0"):
        Agreement.Options(temperature=0)


def test_a_cached_teacher_refuses_a_scheduled_temperature(tiny_assets, tmp_path, recipe_factory):
    from kdistill.plugins.teachers.cached import CachedTeacher

    teacher = CachedTeacher(CachedTeacher.Options(path=str(tmp_path), temperature=2.0))
    loss = ForwardKL(ForwardKL.Options(temperature={"schedule": "linear", "start": 2.0, "end": 1.0}))
    with pytest.raises(ConfigError) as info:
        teacher.prepare(None, None, [("forward-kl", 1.0, loss)])
    assert info.value.problems == ["losses: 'forward-kl' schedules its temperature but the cached teacher's targets are at "
                                   "one temperature, 2.0 (teacher.options.temperature)"]


def test_a_constant_schedule_is_accepted_by_a_cached_teacher(tmp_path):
    from kdistill.plugins.teachers.cached import CachedTeacher

    teacher = CachedTeacher(CachedTeacher.Options(path=str(tmp_path), temperature=2.0))
    loss = ForwardKL(ForwardKL.Options(temperature={"schedule": "constant", "start": 2.0}))

    class Stop(Exception):
        pass

    class NoCache:
        def check(self, expected):
            raise Stop  # the temperatures passed; the manifest check comes next

    teacher.cache = NoCache()

    class Data:
        def fingerprint(self):
            return "f"

    from kdistill.plugins.teachers import cached

    original = cached.vocab_digest
    cached.vocab_digest = lambda tokenizer: "v"
    try:
        with pytest.raises(Stop):
            teacher.prepare(Data(), None, [("forward-kl", 1.0, loss)])
    finally:
        cached.vocab_digest = original
