"""Every hook spec is documented in docs/ and exercised here."""

from __future__ import annotations

import inspect
import types
from pathlib import Path

import torch

import kdistill
from conftest import tiny_recipe
from kdistill.core import hookspecs
from kdistill.core.config import resolve
from kdistill.core.engine import Engine
from kdistill.core.plugins import make_plugin_manager
from kdistill.core.registry import Registry

DOCS = Path(__file__).resolve().parents[2] / "docs"
SPECS = sorted(name for name, fn in vars(hookspecs).items() if name.startswith("kd_") and callable(fn))


def signature_text(name: str) -> str:
    sig = inspect.signature(getattr(hookspecs, name))
    text = f"{name}{sig}"
    return text.replace("'", "")


def test_every_hookspec_is_documented_with_its_signature():
    docs = "\n".join(p.read_text() for p in DOCS.rglob("*.md"))
    missing = [signature_text(name) for name in SPECS if signature_text(name) not in docs]
    assert not missing, f"hooks not documented with their exact signature in docs/: {missing}"


class Doubling(kdistill.Scheduler):
    name = "test-doubling"

    def __call__(self, step, total_steps):
        return 1.0


class Scaled(kdistill.Loss):
    """Cross-entropy times a factor: used to prove a hook-registered loss takes part."""

    name = "test-scaled-ce"
    needs_teacher = False

    class Options(kdistill.Options):
        factor: float = 1.0

    def __call__(self, student, teacher, batch):
        m = batch.mask
        return self.options.factor * torch.nn.functional.cross_entropy(student.logits[m], batch.labels[m], reduction="sum")


def make_recorder():
    calls: dict[str, list] = {}
    module = types.ModuleType("recorder")

    @kdistill.hookimpl
    def kd_run_started(recipe, output_dir):
        calls.setdefault("kd_run_started", []).append({"recipe": recipe, "output_dir": output_dir})

    @kdistill.hookimpl
    def kd_step_finished(step, metrics):
        calls.setdefault("kd_step_finished", []).append({"step": step, "metrics": metrics})

    @kdistill.hookimpl
    def kd_run_finished(output_dir, metrics, status):
        calls.setdefault("kd_run_finished", []).append({"output_dir": output_dir, "status": status, "metrics": metrics})

    module.kd_run_started, module.kd_step_finished, module.kd_run_finished = kd_run_started, kd_step_finished, kd_run_finished

    def wrap(hook, classes):
        def impl():
            calls.setdefault(hook, []).append({})
            return classes
        return kdistill.hookimpl(specname=hook)(impl)

    module.reg_sched = wrap("kd_register_schedulers", [Doubling])
    module.reg_loss = wrap("kd_register_losses", [Scaled])
    for hook in ("kd_register_teachers", "kd_register_layer_mappers", "kd_register_evaluators",
                 "kd_register_strategies", "kd_register_data_sources", "kd_register_trackers",
                 "kd_register_generators"):
        setattr(module, hook.replace("kd_", "r_"), wrap(hook, []))
    return module, calls


def test_every_hook_is_called_in_a_run(tiny_assets, tmp_path):
    module, calls = make_recorder()
    pm = make_plugin_manager(extra_plugins=[("recorder", module)])
    registry = Registry.from_plugins(pm)
    raw = tiny_recipe(tiny_assets, tmp_path / "run", steps=3)
    raw["scheduler"] = {"name": "test-doubling"}
    raw["losses"].append({"name": "test-scaled-ce", "weight": 0.1, "options": {"factor": 2.0}})
    Engine(resolve(raw, registry), pm, registry).run()
    assert sorted(calls) == [name for name in SPECS if name != "kd_register_commands"]  # the command line's hook
    assert [c["step"] for c in calls["kd_step_finished"]] == [1, 2, 3]
    assert "train/test-scaled-ce" in calls["kd_step_finished"][0]["metrics"]
    assert calls["kd_run_started"][0]["output_dir"] == str(tmp_path / "run")
    assert calls["kd_run_finished"][0]["status"] == "FINISHED"
    assert calls["kd_run_finished"][0]["metrics"]["train/loss"] == calls["kd_step_finished"][-1]["metrics"]["train/loss"]


def test_plugins_add_commands_and_a_failing_one_is_named(recwarn):
    import typer
    from typer.testing import CliRunner

    from kdistill.cli import add_plugin_commands

    greeter, broken = types.ModuleType("greeter"), types.ModuleType("broken")

    @kdistill.hookimpl
    def kd_register_commands(app):
        @app.command("hello")
        def hello(name: str = "world") -> None:
            print(f"hello {name}")
    greeter.kd_register_commands = kd_register_commands

    @kdistill.hookimpl(specname="kd_register_commands")
    def fails(app):
        raise RuntimeError("no luck")
    broken.fails = fails

    app = typer.Typer()

    @app.command("other")
    def other() -> None:
        print("other")
    pm = make_plugin_manager(extra_plugins=[("greeter", greeter), ("broken", broken)], load_entry_points=False)
    add_plugin_commands(app, pm)
    result = CliRunner().invoke(app, ["hello", "--name", "kd"])
    assert result.exit_code == 0 and result.stdout == "hello kd\n"
    assert [str(w.message) for w in recwarn] == ["plugin 'broken': kd_register_commands failed: RuntimeError: no luck"]


def test_the_built_in_commands_come_from_their_components():
    from kdistill.cli import app

    owners = {c.name or c.callback.__name__.replace("_", "-"): c.callback.__module__ for c in app.registered_commands}
    assert owners["cache-teacher"] == "kdistill.plugins.teachers.cached"
    assert owners["analyze"] == owners["teacher-check"] == "kdistill.plugins.teachers.analysis"
    assert owners["run"] == "kdistill.cli"
