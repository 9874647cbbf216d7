"""A checkpoint's COMPLETE marker records a content hash of every file; a file that no longer matches
(one flipped bit, same size) is never loaded: `--resume` names it and falls back to the checkpoint
before, `--resume-from` refuses it in one line. Markers from before the hashes resume on sizes alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import engine_for, write_recipe
from kdistill.cli import app
from kdistill.core import checkpoint as ckpt

FILES = ["model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "state.json"]


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


def flip_bit(path: Path, from_end: int = 5) -> None:
    """Flip the lowest bit of one byte near the end (past a safetensors header: the tensors' data)."""
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x01
    path.write_bytes(bytes(data))


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@pytest.fixture
def finished_and_cut(recipe_factory, tmp_path):
    """A finished 3-step run (checkpoints 2 and 3 kept) and a copy that died after checkpoint 3, before
    its final model: resuming the copy from checkpoint 2 must end exactly where the finished run did."""
    raw = recipe_factory(steps=3, save_every=1, keep_checkpoints=2, eval_every=0)
    engine_for(raw).run()
    cut = tmp_path / "cut"
    shutil.copytree(raw["output_dir"], cut)
    shutil.rmtree(cut / "final")
    again = json.loads(json.dumps(raw))
    again["output_dir"] = str(cut)
    return Path(raw["output_dir"]), again, cut / "checkpoints"


def test_the_marker_records_a_hash_of_every_file(recipe_factory, tmp_path):
    engine_for(recipe_factory(steps=1, save_every=1, eval_every=0)).run()
    folder = tmp_path / "run" / "checkpoints" / "step-00000001"
    marker = json.loads((folder / "COMPLETE").read_text())
    assert marker["hash"] == "sha256" and sorted(marker["digests"]) == sorted(marker["files"]) == sorted(FILES)
    assert all(marker["digests"][n] == ckpt.file_digest(folder / n) for n in FILES)
    assert ckpt.verify_contents(folder) is None


@pytest.mark.parametrize("name", FILES)
def test_one_flipped_bit_in_any_file_is_found_and_named(recipe_factory, tmp_path, name):
    engine_for(recipe_factory(steps=1, save_every=1, eval_every=0)).run()
    folder = tmp_path / "run" / "checkpoints" / "step-00000001"
    flip_bit(folder / name, from_end=1 if name.endswith(".json") else 5)
    assert ckpt.check_complete(folder) is None  # the sizes still match
    assert ckpt.verify_contents(folder) == (f"{folder / name}: its content does not match what was saved "
                                            "(its sha256 differs from the one in COMPLETE)")


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors"])
def test_a_flipped_bit_falls_back_with_resume_and_is_refused_with_resume_from(finished_and_cut, tmp_path, name):
    reference, raw, root = finished_and_cut
    newest = root / "step-00000003"
    target = newest / name
    flip_bit(target)
    before = target.read_bytes()
    if name == "model.safetensors":  # what a size check let through: it loads, into other weights
        assert ckpt.check_complete(newest) is None and load_file(str(target)).keys()

    code, err = cli("run", write_recipe(tmp_path / "r.yaml", raw), "--resume-from", newest)
    assert (code, err) == (2, f"error: {target}: its content does not match what was saved "
                              "(its sha256 differs from the one in COMPLETE)\n")
    assert target.read_bytes() == before and not (root.parent / "final").exists()  # nothing changed

    with pytest.warns(UserWarning) as caught:
        engine_for(raw).run(resume=True)
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message)]
    assert skipped == [f"skipping checkpoint {newest}: {target}: its content does not match what was saved "
                       "(its sha256 differs from the one in COMPLETE)"]
    # resumed from step 2, step 3 done again: the same weights as the uninterrupted run, and a sound checkpoint 3
    assert same_weights(reference / "final", root.parent / "final")
    assert same_weights(reference / "checkpoints" / "step-00000003", newest)
    assert ckpt.verify_contents(newest) is None


def test_a_marker_without_hashes_resumes_on_sizes_with_a_warning(finished_and_cut):
    reference, raw, root = finished_and_cut
    newest = root / "step-00000003"
    marker = json.loads((newest / "COMPLETE").read_text())
    (newest / "COMPLETE").write_text(json.dumps({"step": marker["step"], "files": marker["files"]}))  # as before hashes
    with pytest.warns(UserWarning) as caught:
        engine_for(raw).run(resume=True)
    messages = [str(w.message) for w in caught]
    assert f"{newest}: written by an older kdistill without content hashes; only its file sizes were checked" in messages
    assert not any("skipping" in m for m in messages)
    assert same_weights(reference / "final", root.parent / "final")


def test_a_marker_whose_hashes_do_not_cover_its_files_is_incomplete(finished_and_cut, tmp_path):
    _, raw, root = finished_and_cut
    newest = root / "step-00000003"
    marker = json.loads((newest / "COMPLETE").read_text())
    del marker["digests"]["model.safetensors"]
    (newest / "COMPLETE").write_text(json.dumps(marker))
    reason = f"{newest / 'COMPLETE'} is unreadable (its content hashes do not cover its files)"
    assert ckpt.check_complete(newest) == reason
    code, err = cli("run", write_recipe(tmp_path / "r.yaml", raw), "--resume-from", newest)
    assert (code, err) == (2, f"error: --resume-from: {newest} is not a complete checkpoint ({reason})\n")


def test_processes_split_the_files_and_one_of_them_finds_the_flipped_bit(recipe_factory, tmp_path):
    """DeepSpeed's ranks each hash `names[rank::world_size]`: every file is checked by exactly one."""
    engine_for(recipe_factory(steps=1, save_every=1, eval_every=0)).run()
    folder = tmp_path / "run" / "checkpoints" / "step-00000001"
    for name in FILES:
        flip_bit(folder / name, from_end=1)
        found = [ckpt.verify_contents(folder, rank, 2) for rank in (0, 1)]
        assert sorted(found, key=lambda r: r is None) == [f"{folder / name}: its content does not match what was saved "
                                                          "(its sha256 differs from the one in COMPLETE)", None]
        flip_bit(folder / name, from_end=1)  # back as it was
    assert ckpt.verify_contents(folder, 0, 2) is None and ckpt.verify_contents(folder, 1, 2) is None
