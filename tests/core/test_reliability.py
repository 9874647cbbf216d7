"""Faults tried on purpose: killed saves, corrupt and hostile checkpoints, custom code, NaN steps,
failing plugins. docs/reliability.md lists each promise with the test that checks it."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import kdistill
from conftest import engine_for, nan_at, write_recipe
from kdistill.cli import app
from kdistill.core import checkpoint as ckpt
from kdistill.core.config import resolve
from kdistill.core.engine import Engine
from kdistill.core.errors import ComponentError, ConfigError
from kdistill.core.models import load_causal_lm
from kdistill.core.plugins import make_plugin_manager
from kdistill.core.registry import Registry

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# Runs `kdistill run RECIPE` with the checkpoint writers patched to SIGKILL the process right after
# FILE of step STEP's checkpoint is written ("rename": after the folder got its final name).
KILLER = """
import os, signal, sys
import kdistill.core.checkpoint as ck
target, step, recipe = sys.argv[1], int(sys.argv[2]), sys.argv[3]
def maybe_die(path):
    if path.parent.name.startswith(f".tmp-step-{step:08d}") and path.name == target:
        os.kill(os.getpid(), signal.SIGKILL)
save_tensors, write_bytes, prune = ck._save_tensors, ck._write_bytes, ck.prune
def _save_tensors(tensors, path):
    save_tensors(tensors, path); maybe_die(path)
def _write_bytes(path, data):
    write_bytes(path, data); maybe_die(path)
def _prune(root, keep):
    if target == "rename" and (root / f"step-{step:08d}").exists():
        os.kill(os.getpid(), signal.SIGKILL)
    prune(root, keep)
ck._save_tensors, ck._write_bytes, ck.prune = _save_tensors, _write_bytes, _prune
from kdistill.cli import app
sys.argv = ["kdistill", "run", recipe]
app()
"""

CHECKPOINT_FILES = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json",
                    "COMPLETE"]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    x, y = weights(a), weights(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


# ---------------------------------------------------------------------------------------- crash safety


def test_sigkill_after_each_checkpoint_file_resumes_from_the_last_complete_one(recipe_factory, tmp_path):
    settings = dict(steps=3, save_every=1, keep_checkpoints=2, eval_every=0)
    reference = recipe_factory(**settings)
    engine_for(reference).run()
    for target in CHECKPOINT_FILES + ["rename"]:
        raw = recipe_factory(**settings)
        raw["output_dir"] = str(tmp_path / f"killed-{target}")
        path = write_recipe(tmp_path / f"killed-{target}.yaml", raw)
        proc = subprocess.run([sys.executable, "-c", KILLER, target, "2", str(path)], capture_output=True, text=True,
                              env=ENV, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (target, proc.stderr[-2000:])
        root = Path(raw["output_dir"]) / "checkpoints"
        # nothing partly written ever sits under a final name
        for folder in ckpt.list_checkpoints(root):
            assert ckpt.check_complete(folder) is None, (target, folder)
        assert not (root.parent / "final").exists()
        if target == "rename":
            assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000001", "step-00000002"]
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # nothing to skip, so no warning
                engine_for(raw).run(resume=True)
        else:
            interrupted = ckpt.interrupted_saves(root)
            assert [p.name.rsplit("-", 1)[0] for p in interrupted] == [".tmp-step-00000002"], target
            assert (interrupted[0] / target).is_file()
            with pytest.warns(UserWarning) as caught:
                engine_for(raw).run(resume=True)
            messages = [str(w.message) for w in caught if "skipping" in str(w.message)]
            assert messages == [f"skipping incomplete checkpoint {interrupted[0]}: an interrupted save (never completed)"]
            assert not interrupted[0].exists(), "the next save removes the interrupted one"
        state = json.loads((root / "step-00000003" / "state.json").read_text())
        assert state["step"] == 3
        assert same_weights(Path(reference["output_dir"]) / "final", root.parent / "final"), target


def test_pruning_never_removes_the_last_complete_checkpoint(recipe_factory, tmp_path):
    engine_for(recipe_factory(steps=3, save_every=1, keep_checkpoints=1)).run()
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003"]
    broken = root / "step-00000004"  # a newer folder that never completed
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    ckpt.prune(root, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000003", "step-00000004"]
    assert ckpt.latest_complete(root)[0] == root / "step-00000003"


# ---------------------------------------------------------------------------------------- corruption


def two_checkpoints(recipe_factory, tmp_path):
    """A run that died after its second checkpoint, before its final model (a finished run resumes to nothing)."""
    raw = recipe_factory(steps=2, save_every=1, eval_every=0)
    engine_for(raw).run()
    shutil.rmtree(tmp_path / "run" / "final")
    return raw, tmp_path / "run" / "checkpoints"


def test_one_byte_truncation(recipe_factory, tmp_path):
    raw, root = two_checkpoints(recipe_factory, tmp_path)
    newest = root / "step-00000002"
    target = newest / "model.safetensors"
    size = target.stat().st_size
    with open(target, "r+b") as handle:
        handle.truncate(size - 1)
    reason = f"{target} has {size - 1} bytes, expected {size}"
    code, err = cli("run", write_recipe(tmp_path / "r.yaml", raw), "--resume-from", newest)
    assert code == 2
    assert err == f"error: --resume-from: {newest} is not a complete checkpoint ({reason})\n"
    with pytest.warns(UserWarning, match=f"skipping incomplete checkpoint {newest}: {reason}"):
        summary = engine_for(raw).run(resume=True)
    assert summary["after"]["train/loss"] > 0


def test_safetensors_header_with_a_wrong_length(recipe_factory, tmp_path):
    raw, root = two_checkpoints(recipe_factory, tmp_path)
    newest = root / "step-00000002"
    target = newest / "optimizer.safetensors"
    data = bytearray(target.read_bytes())
    data[:8] = (len(data) * 4).to_bytes(8, "little")  # same size on disk, header says more than there is
    target.write_bytes(bytes(data))
    ckpt.mark_complete(newest, 2)  # a marker that matches (sizes and hashes): only reading finds it
    assert ckpt.check_complete(newest) is None and ckpt.verify_contents(newest) is None
    code, err = cli("run", write_recipe(tmp_path / "r.yaml", raw), "--resume-from", newest)
    assert code == 2
    assert err.startswith(f"error: {target}: cannot restore the checkpoint: SafetensorError: ")
    assert len(err.splitlines()) == 1
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest}: {target}: cannot restore the checkpoint"):
        engine_for(raw).run(resume=True)
    state = json.loads((newest / "state.json").read_text())  # rewritten by the resumed run from step 1
    assert state["step"] == 2 and ckpt.check_complete(newest) is None


def test_missing_state_file(recipe_factory, tmp_path):
    raw, root = two_checkpoints(recipe_factory, tmp_path)
    newest = root / "step-00000002"
    (newest / "state.json").unlink()
    code, err = cli("run", write_recipe(tmp_path / "r.yaml", raw), "--resume-from", newest)
    assert (code, err) == (2, f"error: --resume-from: {newest} is not a complete checkpoint ({newest / 'state.json'} is missing)\n")
    with pytest.warns(UserWarning, match="state.json is missing"):
        engine_for(raw).run(resume=True)


def test_resume_with_nothing_to_resume_is_an_error(recipe_factory, tmp_path):
    raw = recipe_factory(steps=2)
    code, err = cli("run", write_recipe(tmp_path / "r.yaml", raw), "--resume")
    assert (code, err) == (2, f"error: --resume: no complete checkpoint under {tmp_path / 'run' / 'checkpoints'}\n")
    assert not (tmp_path / "run").exists()
    code, err = cli("run", write_recipe(tmp_path / "r.yaml", raw), "--resume-from", tmp_path / "nowhere")
    assert (code, err) == (2, f"error: --resume-from: {tmp_path / 'nowhere'} is not a complete checkpoint (no such folder)\n")


def test_a_changed_recipe_is_refused_listing_the_fields_unless_forced(recipe_factory, tmp_path):
    raw, root = two_checkpoints(recipe_factory, tmp_path)
    changed = json.loads(json.dumps(raw))
    changed["train"].update(steps=3, batch_size=2, seed=5)
    changed["data"]["options"]["seq_len"] = 16
    path = write_recipe(tmp_path / "r.yaml", changed)
    code, err = cli("run", path, "--resume")
    assert code == 2
    lines = err.splitlines()
    assert lines[0] == (f"error: --resume: the recipe differs from {root / 'step-00000002'} in data.options.seq_len, "
                        "train.batch_size, train.seed, train.steps (pass --force to resume anyway)")
    assert lines[1].startswith(f"error: --resume: the data differs from the data of {root / 'step-00000002'}")
    assert len(lines) == 2
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001", "step-00000002"]
    with pytest.warns(UserWarning, match="resuming anyway"):
        summary = engine_for(changed).run(resume=True, force=True)
    assert summary["after"]["train/loss"] > 0
    assert json.loads((root / "step-00000003" / "state.json").read_text())["step"] == 3


# ---------------------------------------------------------------------------------------- untrusted files


def test_a_pickle_in_the_state_file_is_refused(recipe_factory, tmp_path):
    raw, root = two_checkpoints(recipe_factory, tmp_path)
    newest = root / "step-00000002"
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    (newest / "state.json").write_bytes(pickle.dumps(Payload()))
    ckpt.mark_complete(newest, 2)  # a marker that matches (sizes and hashes): only the reader refuses it
    code, err = cli("run", write_recipe(tmp_path / "r.yaml", raw), "--resume-from", newest)
    assert code == 2
    assert err.startswith(f"error: {newest / 'state.json'}: cannot restore the checkpoint: UnicodeDecodeError")
    assert not sentinel.exists()


@pytest.fixture
def custom_code_folder(tiny_assets, tmp_path):
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(tiny_assets["teacher"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').close()\n")
    return folder


def test_a_model_folder_with_custom_code_is_refused(custom_code_folder, recipe_factory, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_causal_lm(str(custom_code_folder), "teacher.options.model")
    assert str(err.value) == (f"teacher.options.model: {custom_code_folder} contains custom code (modeling_evil.py, "
                              "auto_map in config.json); it runs only with trust_remote_code: true in the recipe")
    raw = recipe_factory(steps=1)
    raw["teacher"]["options"]["model"] = str(custom_code_folder)
    code, out = cli("run", write_recipe(tmp_path / "r.yaml", raw))
    assert code == 2 and out == f"error: {err.value}\n"
    assert not (tmp_path / "run").exists() and not (tmp_path / "pwned").exists()


def test_only_safetensors_weights_are_read(tiny_assets, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_assets["teacher"], folder)
    (folder / "model.safetensors").unlink()
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ConfigError) as err:
        load_causal_lm(str(folder), "student.model")
    assert str(err.value) == (f"student.model: {folder} has no safetensors weights (pytorch_model.bin would need "
                              "unpickling, which kdistill never does; convert them to safetensors first)")
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------- numerics


def test_a_nan_step_is_skipped_when_the_recipe_says_so(recipe_factory, tmp_path):
    raw = recipe_factory(steps=3, save_every=1, keep_checkpoints=3, eval_every=0, on_nonfinite="skip")
    with pytest.warns(UserWarning, match=r"^step 2: the loss is nan; skipping the step \(train.on_nonfinite: skip\)$"):
        summary = nan_at(engine_for(raw), 2).run()
    root = tmp_path / "run" / "checkpoints"
    assert same_weights(root / "step-00000001", root / "step-00000002"), "a skipped step leaves the weights alone"
    assert not same_weights(root / "step-00000002", root / "step-00000003")
    for folder in (root / "step-00000002", root / "step-00000003"):
        assert all(torch.isfinite(t).all() for t in weights(folder).values())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    skipped = {r["step"]: r["metrics"].get("train/skipped_steps") for r in records if "metrics" in r and "train/loss" in r["metrics"]}
    assert skipped == {1: None, 2: 1.0, 3: None}
    assert summary["after"]["train/loss"] > 0


# ---------------------------------------------------------------------------------------- plugins


class Boom(kdistill.LogitLoss):
    """Raises at its third call, like a plugin with a bug that shows up mid-run."""

    name = "boom"
    calls = 0

    class Options(kdistill.Options):
        at_call: int = 3

    def rows(self, student, teacher, labels):
        Boom.calls += 1
        if Boom.calls == self.options.at_call:
            raise RuntimeError("the boom plugin broke")
        return (student.float() * 0).sum(-1)


class BoomPlugin:
    @kdistill.hookimpl
    def kd_register_losses(self):
        return [Boom]


def test_a_plugin_raising_mid_run_is_named_with_the_step_and_the_checkpoint_stays(recipe_factory, tmp_path):
    Boom.calls = 0
    raw = recipe_factory(steps=4, save_every=1, eval_every=0)
    raw["losses"].append({"name": "boom", "weight": 1.0})
    pm = make_plugin_manager(extra_plugins=[("boom-plugin", BoomPlugin())])
    registry = Registry.from_plugins(pm)
    with pytest.raises(ComponentError) as err:
        Engine(resolve(raw, registry), pm, registry).run()
    root = tmp_path / "run" / "checkpoints"
    assert str(err.value) == ("step 3: loss 'boom' of plugin 'boom-plugin' ((in-process)) raised RuntimeError: the boom "
                              f"plugin broke; the last checkpoint ({root / 'step-00000002'}) is intact")
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step-00000001", "step-00000002"]
    assert ckpt.check_complete(root / "step-00000002") is None
    assert isinstance(err.value.__cause__, RuntimeError)


BROKEN_DIST = "broken-kd-plugin"


def test_a_plugin_that_fails_to_import(tiny_assets, tmp_path):
    """A warning while unused; an error naming the entry point, distribution and cause when a recipe needs it."""
    site = tmp_path / "site"
    info = site / "broken_kd_plugin-0.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {BROKEN_DIST}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[kdistill]\nbroken = broken_kd_plugin\n")
    (site / "broken_kd_plugin.py").write_text("import a_dependency_that_is_not_installed\n")
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    why = (f"entry point 'broken' (broken_kd_plugin) of distribution {BROKEN_DIST} 0.3 failed to import: "
           "ModuleNotFoundError: No module named 'a_dependency_that_is_not_installed'")

    def run(*args):
        return subprocess.run([sys.executable, "-W", "always", "-m", "kdistill.cli", *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=300)

    from conftest import tiny_recipe

    unused = write_recipe(tmp_path / "unused.yaml", tiny_recipe(tiny_assets, tmp_path / "a"))
    ok = run("validate", unused)
    assert ok.returncode == 0 and ok.stderr.count(why) == 1, ok.stderr
    used = tiny_recipe(tiny_assets, tmp_path / "b")
    used["losses"].append({"name": "broken-loss"})
    bad = run("validate", write_recipe(tmp_path / "used.yaml", used))
    assert bad.returncode == 2
    error = bad.stderr.splitlines()[-1]
    assert error.startswith("error: losses[2].name: unknown loss 'broken-loss'. Installed: ")
    assert error.endswith(f"; plugins that failed to import: {why}")
