"""One run per output folder: a lock for the run's lifetime, earlier runs never silently reused."""

from __future__ import annotations

import os

import pytest

from conftest import engine_for
from kdistill.core import checkpoint as ckpt
from kdistill.core import run_folder
from kdistill.core.errors import KdistillError


def test_a_second_run_on_a_locked_folder_is_refused_naming_the_holder_and_touches_nothing(recipe_factory, tmp_path):
    out = tmp_path / "run"
    held = run_folder.lock(out)
    (out / "metrics.jsonl").write_text("{}\n")  # the live run's files
    try:
        raw = recipe_factory(steps=1)
        with pytest.raises(KdistillError) as info:
            engine_for(raw).run(overwrite=True)
        assert info.value.problems == [f"output_dir: {out} is in use by another kdistill run (PID {os.getpid()}); wait for it "
                                       "to end or choose another output_dir"]
        assert (out / "metrics.jsonl").read_text() == "{}\n"  # --overwrite deleted nothing
    finally:
        held.close()
    engine_for(recipe_factory(steps=1)).run(overwrite=True)  # released: the folder can be used again
    assert (out / "final").is_dir()


def test_a_folder_with_an_earlier_run_is_refused_and_a_finished_run_resumes_to_nothing(recipe_factory, tmp_path):
    out = tmp_path / "run"
    raw = recipe_factory(steps=1)  # save_every 0: no checkpoints
    first = engine_for(raw).run()
    before = (out / "summary.json").read_text()
    with pytest.raises(KdistillError) as info:
        engine_for(raw).run()
    assert info.value.problems == [f"output_dir: {out} already holds a run (summary.json, final, metrics.jsonl); pass "
                                   "--overwrite to start over or choose another output_dir"]
    again = engine_for(raw).run(resume=True)
    assert again == first and (out / "summary.json").read_text() == before  # says finished, changes nothing


def test_only_saves_of_dead_writers_are_cleaned_up(tmp_path):
    root = tmp_path / "checkpoints"
    alive = root / f".tmp-{ckpt.PREFIX}00000001-{os.getppid()}"
    dead = root / f".tmp-{ckpt.PREFIX}00000002-{2 ** 22 + 12345}"
    for folder in (alive, dead):
        folder.mkdir(parents=True)
    ckpt.prune(root, keep=2)
    assert alive.is_dir() and not dead.exists()


def test_resume_and_overwrite_together_are_refused_even_on_a_finished_run(recipe_factory, tmp_path):
    raw = recipe_factory(steps=1)
    engine_for(raw).run()
    with pytest.raises(KdistillError) as info:
        engine_for(raw).run(resume=True, overwrite=True)
    assert info.value.problems == ["--resume and --overwrite exclude each other"]


def test_a_chain_of_stages_holds_its_folder_too(recipe_factory, tmp_path):
    out = tmp_path / "run"
    raw = recipe_factory(steps=1)
    raw["strategy"] = {"name": "progressive", "options": {"stages": [
        {"name": "mid", "student": {"from_teacher": {"layers": [0, 1, 3]}}, "steps": 1}]}}
    held = run_folder.lock(out)
    try:
        with pytest.raises(KdistillError, match=f"is in use by another kdistill run \\(PID {os.getpid()}\\)"):
            engine_for(raw).run(overwrite=True)
        assert not (out / "stages").exists()
    finally:
        held.close()
