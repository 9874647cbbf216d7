"""The core: plugin manager, registry, recipe resolution, YAML and overrides."""

from __future__ import annotations

import types

import pydantic
import pytest

import kdistill
from conftest import tiny_recipe
from kdistill.core.config import apply_overrides, load_recipe, parse_yaml, resolve
from kdistill.core.errors import ConfigError, RegistryError
from kdistill.core.plugins import make_plugin_manager
from kdistill.core.registry import Registry


def plugin_module(name: str, **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, classes in hooks.items():
        setattr(module, hook, kdistill.hookimpl(lambda classes=classes: list(classes)))
    return module


class ShadowKL(kdistill.Loss):
    name = "forward-kl"


class Halved(kdistill.Scheduler):
    name = "halved"

    class Options(kdistill.Options):
        factor: float = 0.5

    def __call__(self, step, total_steps):
        return self.options.factor


def test_builtin_components_are_registered_from_entry_points():
    registry = Registry.from_plugins()
    expected = {("teacher", "hf"), ("loss", "forward-kl"), ("loss", "cross-entropy"), ("layer_mapper", "uniform"),
                ("scheduler", "cosine-warmup"), ("scheduler", "constant"), ("scheduler", "linear"),
                ("evaluator", "perplexity"), ("strategy", "offline"), ("data_source", "text-files"),
                ("tracker", "mlflow"), ("tracker", "jsonl")}
    found = {(e.kind, e.name) for e in registry}
    assert expected <= found
    entry = registry.get("loss", "forward-kl")
    assert entry.plugin == "kdistill.losses.forward_kl" and entry.distribution == "kdistill"


def test_duplicate_name_names_both_providers():
    pm = make_plugin_manager(extra_plugins=[("shadow", plugin_module("shadow", kd_register_losses=[ShadowKL]))])
    with pytest.raises(RegistryError) as err:
        Registry.from_plugins(pm)
    assert str(err.value) == ("loss 'forward-kl' is provided twice: by plugin 'kdistill.losses.forward_kl' (kdistill 0.1.0) "
                              "and by plugin 'shadow' ((in-process))")


def test_unknown_name_lists_installed_and_close_matches():
    registry = Registry.from_plugins()
    with pytest.raises(RegistryError) as err:
        registry.get("scheduler", "cosine-warmpu")
    installed = ", ".join(registry.names("scheduler"))
    assert "linear" in installed and "constant" in installed
    assert str(err.value) == f"unknown scheduler 'cosine-warmpu'; did you mean 'cosine-warmup'? Installed: {installed}"


def test_blocking_environment_variable_removes_a_plugin(monkeypatch):
    monkeypatch.setenv("KDISTILL_BLOCK_PLUGINS", "kdistill.schedulers.linear, kdistill.trackers.jsonl")
    names = {e.name for e in Registry.from_plugins()}
    assert "linear" not in names and "jsonl" not in names and "constant" in names


def test_unknown_hook_is_refused():
    module = types.ModuleType("typo")
    module.kd_register_loss = kdistill.hookimpl(lambda: [])  # misspelled hook name
    import pluggy

    with pytest.raises(pluggy.PluginValidationError):
        make_plugin_manager(extra_plugins=[("typo", module)])


def test_registry_is_read_only():
    registry = Registry.from_plugins()
    with pytest.raises(TypeError):
        registry.by_kind["loss"]["x"] = None  # type: ignore[index]
    with pytest.raises(TypeError):
        registry.by_kind["loss"] = {}  # type: ignore[index]


def test_in_process_plugin_component_is_usable_in_a_recipe(tiny_assets, tmp_path):
    pm = make_plugin_manager(extra_plugins=[("halved", plugin_module("halved", kd_register_schedulers=[Halved]))])
    raw = tiny_recipe(tiny_assets, tmp_path / "out")
    raw["scheduler"] = {"name": "halved", "options": {"factor": 0.25}}
    plan = resolve(raw, Registry.from_plugins(pm))
    scheduler = plan.one("scheduler").build()
    assert scheduler(3, 10) == 0.25


def test_three_mistakes_reported_at_once(tiny_assets, tmp_path):
    raw = tiny_recipe(tiny_assets, tmp_path / "out")
    raw["losses"][0]["name"] = "forward-kll"
    raw["losses"][1]["options"] = {"smoothing": 0.1}
    raw["train"]["lr"] = "fast"
    with pytest.raises(ConfigError) as err:
        resolve(raw, Registry.from_plugins())
    assert err.value.problems == [
        "train.lr: Input should be a valid number, unable to parse string as a number (got 'fast')",
        f"losses[0].name: unknown loss 'forward-kll'; did you mean 'forward-kl'? Installed: {', '.join(Registry.from_plugins().names('loss'))}",
        "losses[1].options.smoothing: unknown field [loss 'cross-entropy' from plugin 'kdistill.losses.cross_entropy' (kdistill 0.1.0)]",
    ]


def test_option_types_and_ranges_checked_by_the_components_model(tiny_assets, tmp_path):
    raw = tiny_recipe(tiny_assets, tmp_path / "out")
    raw["losses"][0]["options"] = {"temperature": -1}
    with pytest.raises(ConfigError) as err:
        resolve(raw, Registry.from_plugins())
    assert err.value.problems == [
        "losses[0].options.temperature: Input should be greater than 0 (got -1) "
        "[loss 'forward-kl' from plugin 'kdistill.losses.forward_kl' (kdistill 0.1.0)]"]


def test_student_needs_exactly_one_source(tiny_assets, tmp_path):
    raw = tiny_recipe(tiny_assets, tmp_path / "out")
    raw["student"] = {"model": "a", "config": "b"}
    with pytest.raises(ConfigError) as err:
        resolve(raw, Registry.from_plugins())
    assert err.value.problems == ["student: Value error, give exactly one of model, config, from_teacher (got model, config)"]


def test_offline_without_teacher_is_refused(tiny_assets, tmp_path):
    raw = tiny_recipe(tiny_assets, tmp_path / "out")
    del raw["teacher"]
    raw["student"] = {"model": tiny_assets["teacher"]}
    with pytest.raises(ConfigError) as err:
        resolve(raw, Registry.from_plugins())
    assert err.value.problems == ["teacher: strategy 'offline' needs a teacher; add a teacher section",
                                  "losses[0].name: loss 'forward-kl' needs a teacher"]


def test_yaml_scientific_notation_is_a_float_and_duplicates_are_refused():
    assert parse_yaml("lr: 1e-4\nx: 3E5\ny: 1.5e+2\nz: '1e-4'") == {"lr": 1e-4, "x": 3e5, "y": 150.0, "z": "1e-4"}
    with pytest.raises(ConfigError) as err:
        parse_yaml("a: 1\na: 2\n", "r.yaml")
    assert str(err.value) == "r.yaml:2:1: invalid YAML: duplicate key 'a'"
    with pytest.raises(ConfigError) as err:  # found by the fuzz test: a '?' makes a list a key
        parse_yaml("a:\n  - 0\n?  - 3\n", "r.yaml")
    assert str(err.value) == "r.yaml:3:4: invalid YAML: a key must be a string or number, not a list"


def test_yaml_is_read_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("student: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError) as err:
        load_recipe(path)
    assert "could not determine a constructor" in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_overrides_set_nested_values_and_parse_them():
    raw = {"losses": [{"name": "forward-kl", "options": {"temperature": 1.0}}], "train": {"steps": 5}}
    out = apply_overrides(raw, ["losses[0].options.temperature=3", "train.lr=2e-4", "output_dir=x/y"])
    assert out["losses"][0]["options"]["temperature"] == 3
    assert out["train"]["lr"] == 2e-4 and out["output_dir"] == "x/y"
    assert raw["losses"][0]["options"]["temperature"] == 1.0  # the input is not changed
    with pytest.raises(ConfigError) as err:
        apply_overrides(raw, ["losses[3].weight=1"])
    assert str(err.value) == "--set losses[3].weight: index [3] is out of range"
    with pytest.raises(ConfigError) as err:
        apply_overrides(raw, ["train.steps"])
    assert str(err.value) == "--set train.steps: expected KEY=VALUE"


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_recipe(tmp_path / "nope.yaml")
    assert str(err.value) == f"{tmp_path / 'nope.yaml'}: no such recipe file"


def test_options_are_frozen_and_forbid_extras():
    options = kdistill.Options
    assert options.model_config["extra"] == "forbid" and options.model_config["frozen"] is True
    opts = Halved.Options(factor=0.1)
    with pytest.raises(pydantic.ValidationError):
        opts.factor = 0.3  # type: ignore[misc]
