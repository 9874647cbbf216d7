"""Untrusted files and the network: what the package refuses to do."""

from __future__ import annotations

import ast
import shutil
import socket
from pathlib import Path

import pytest

from conftest import engine_for

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "kdistill"


def test_no_unsafe_deserialisation_in_the_package():
    """No torch.load without weights_only=True, no pickle.load(s), no yaml.load without a safe loader."""
    problems = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
            name = node.func.attr
            keywords = {k.arg: k.value for k in node.keywords}
            where = f"{path.relative_to(PACKAGE)}:{node.lineno}"
            if owner == "torch" and name == "load":
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "cPickle", "dill") and name in ("load", "loads"):
                problems.append(f"{where}: {owner}.{name}")
            if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
                loader = keywords.get("Loader")
                if not (isinstance(loader, ast.Name) and "Safe" in loader.id or isinstance(loader, ast.Name) and loader.id == "_RecipeLoader"):
                    problems.append(f"{where}: yaml.{name} without a safe loader")
    assert not problems, problems


def test_a_pickle_in_a_checkpoint_is_never_executed(recipe_factory, tmp_path):
    import pickle

    raw = recipe_factory(steps=2, save_every=1)
    engine_for(raw).run()
    shutil.rmtree(tmp_path / "run" / "final")  # as if it died before the final model: a finished run resumes to nothing
    sentinel = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (sentinel,))

    ckpt = tmp_path / "run" / "checkpoints" / "step-00000002"
    for name in ("optimizer.safetensors", "rng.safetensors"):
        data = pickle.dumps(Payload())
        (ckpt / name).write_bytes(data)
    # a marker rewritten to match (sizes and content hashes), so only the loader stands in the way
    from kdistill.core.checkpoint import mark_complete
    mark_complete(ckpt, 2)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {ckpt}: {ckpt / 'optimizer.safetensors'}: cannot restore"):
        summary = engine_for(raw).run(resume=True)  # falls back to step 1 and finishes step 2 again
    assert summary["after"]["train/loss"] > 0
    assert not sentinel.exists()
    shutil.rmtree(tmp_path / "run" / "final")  # unfinished again
    for name in ("step-00000001", "step-00000002"):  # now every checkpoint is hostile: a clear error
        for f in ("model.safetensors",):
            target = tmp_path / "run" / "checkpoints" / name / f
            target.write_bytes(b"\x00" * target.stat().st_size)
    with pytest.raises(Exception) as err:
        engine_for(raw).run(resume=True)
    assert str(err.value).splitlines()[0] == f"--resume: no checkpoint under {tmp_path / 'run' / 'checkpoints'} could be restored"
    assert not sentinel.exists()


def test_a_full_run_needs_no_network(recipe_factory, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    summary = engine_for(recipe_factory(steps=2)).run()
    assert summary["after"]["val/student_loss"] > 0
