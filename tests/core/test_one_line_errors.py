"""Faults that used to end in a traceback: each is one line, exit 2 before anything is written where it
can be known before, exit 1 naming what was kept otherwise; `kdistill validate` checks the local inputs."""

from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import pytest
from safetensors import SafetensorError
from typer.testing import CliRunner

from conftest import engine_for, write_recipe
from kdistill.cli import app


def cli(*args):
    """Exit code and the `error:` lines on stderr (the progress bar shares stderr); never a traceback."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.stderr, result.stderr
    return result.exit_code, "".join(line for line in result.stderr.splitlines(True) if line.startswith("error: "))


def validate(tmp_path, raw):
    return cli("validate", write_recipe(tmp_path / "recipe.yaml", raw))


def run(tmp_path, raw, *flags):
    return cli("run", write_recipe(tmp_path / "recipe.yaml", raw), *flags)


def test_validate_names_every_missing_local_input_at_once(recipe_factory, tmp_path):
    raw = recipe_factory()
    raw["teacher"]["options"]["model"] = str(tmp_path / "no-teacher")
    raw["data"]["options"]["paths"] = [raw["data"]["options"]["paths"][0], str(tmp_path / "*.absent")]
    raw["student"] = {"model": str(tmp_path / "no-student"), "tokenizer": str(tmp_path / "no-tokenizer")}
    raw["distributed"] = {"config": str(tmp_path / "ds.json")}
    assert validate(tmp_path, raw) == (2, f"error: student.model: no such file or folder: {tmp_path / 'no-student'}\n"
                                          f"error: student.tokenizer: no such file or folder: {tmp_path / 'no-tokenizer'}\n"
                                          f"error: distributed.config: no such file: {tmp_path / 'ds.json'}\n"
                                          f"error: teacher.options.model: no such file or folder: {tmp_path / 'no-teacher'}\n"
                                          f"error: data.options.paths[1]: no such file: {tmp_path / '*.absent'}\n")
    assert not (tmp_path / "run").exists()


def test_validate_checks_inputs_nested_in_options(recipe_factory, tmp_path):
    raw = recipe_factory()
    corpus = raw["data"]["options"]["paths"][0]
    raw["data"] = {"name": "mixture", "options": {"seq_len": 32, "sources": [
        {"name": "a", "paths": [corpus], "weight": 1.0}, {"name": "b", "paths": [str(tmp_path / "b.txt")], "weight": 1.0}]}}
    assert validate(tmp_path, raw) == (2, f"error: data.options.sources[1].paths[0]: no such file: {tmp_path / 'b.txt'}\n")


def test_a_valid_recipe_still_validates(recipe_factory, tmp_path):
    code, _ = validate(tmp_path, recipe_factory())
    assert code == 0


def test_an_output_dir_that_is_a_file_is_refused_and_kept(recipe_factory, tmp_path):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    raw = recipe_factory(steps=1)
    raw["output_dir"] = str(taken)
    line = f"error: output_dir: {taken} is a file, not a folder\n"
    assert validate(tmp_path, raw) == (2, line)
    assert run(tmp_path, raw) == (2, line)
    raw["output_dir"] = str(taken / "run")
    assert run(tmp_path, raw) == (2, f"error: output_dir: {taken} is a file, so {taken / 'run'} cannot be created\n")
    assert taken.read_text() == "mine"


def test_an_output_dir_that_cannot_be_written_is_refused(recipe_factory, tmp_path, monkeypatch):
    import kdistill.core.paths

    locked = tmp_path / "locked"
    locked.mkdir()
    raw = recipe_factory(steps=1)
    raw["output_dir"] = str(locked / "run")
    # the check itself (root, which runs CI, may write anywhere, so the permission is simulated)
    monkeypatch.setattr(kdistill.core.paths.os, "access", lambda path, mode: Path(path) != locked)
    assert validate(tmp_path, raw) == (2, f"error: output_dir: {locked} is not writable, so {locked / 'run'} cannot be created\n")


def test_a_folder_that_cannot_be_made_at_run_time_is_one_line_and_writes_nothing(recipe_factory, tmp_path, monkeypatch):
    import kdistill.core.run_folder

    def refused(out):
        raise PermissionError(errno.EACCES, "Permission denied", str(out))

    monkeypatch.setattr(kdistill.core.run_folder, "lock", refused)
    raw = recipe_factory(steps=1)
    assert run(tmp_path, raw) == (2, f"error: {tmp_path / 'run'}: Permission denied (nothing was written)\n")
    assert not (tmp_path / "run").exists()


def test_disk_full_during_a_checkpoint_is_one_line_naming_what_was_kept(recipe_factory, tmp_path, monkeypatch):
    import kdistill.core.checkpoint as ckpt

    real, calls = ckpt.save_file, {"n": 0}

    def fills_the_disk(tensors, path, metadata=None):
        calls["n"] += 1
        if "step-00000002" in path:
            Path(path).write_bytes(b"\0" * 10)  # a partial file, as a full disk leaves it, and safetensors' own error
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ckpt, "save_file", fills_the_disk)
    raw = recipe_factory(steps=3, save_every=1)
    code, err = run(tmp_path, raw)
    partial = next((tmp_path / "run" / "checkpoints").glob(".tmp-step-00000002-*")) / "model.safetensors"
    first = tmp_path / "run" / "checkpoints" / "step-00000001"
    assert (code, err) == (1, f"error: the run stopped: {partial}: No space left on device; the last complete "
                              f"checkpoint, {first}, is kept\n")
    monkeypatch.setattr(ckpt, "save_file", real)  # space freed: the run resumes from what was kept
    assert run(tmp_path, raw, "--resume")[0] == 0
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_disk_full_while_saving_the_final_model_is_one_line(recipe_factory, tmp_path, monkeypatch):
    import transformers.modeling_utils

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)  # what save_pretrained calls
    code, err = run(tmp_path, recipe_factory(steps=1))
    partial = next((tmp_path / "run").glob(".tmp-final-*"))
    assert (code, err) == (1, f"error: the run stopped: {partial}: No space left on device; no complete checkpoint "
                              "was written\n")
    assert not (tmp_path / "run" / "final").exists()


def test_a_student_config_transformers_cannot_build_is_refused_by_validate(recipe_factory, tmp_path):
    raw = recipe_factory(steps=1)
    raw["student"] = {"config": {"model_type": "nonsense", "vocab_size": 64}}
    line = "error: student.config.model_type: unknown model type 'nonsense' for this transformers (llama, qwen2, gpt2, ...)\n"
    assert validate(tmp_path, raw) == (2, line)
    raw["student"] = {"config": {"model_type": "llama", "vocab_size": 64, "hidden_size": -32, "intermediate_size": 64,
                                 "num_hidden_layers": 1, "num_attention_heads": 4}}
    code, err = validate(tmp_path, raw)
    assert (code, err.count("\n")) == (2, 1)
    assert err.startswith("error: student.config: cannot build a model from it: RuntimeError: ") and "-32" in err
    assert run(tmp_path, raw) == (code, err)
    assert not (tmp_path / "run").exists()
    raw["student"]["config"]["hidden_size"] = 0  # transformers raises ZeroDivisionError here (its words vary by version)
    code, err = validate(tmp_path, raw)
    assert (code, err.count("\n")) == (2, 1)
    assert err.startswith("error: student.config: cannot build a model from it: ZeroDivisionError: ")
    raw["student"]["config"].update(hidden_size=32, num_hidden_layers=1_000_000)  # refused before building anything
    assert validate(tmp_path, raw) == (2, "error: student.config: 1,000,000 layers; kdistill builds students of at most 1,024\n")


def test_sequences_longer_than_learned_positions_are_refused_before_anything_is_written(recipe_factory, tmp_path):
    raw = recipe_factory(steps=1)
    raw["student"] = {"config": {"model_type": "gpt2", "vocab_size": 300, "n_embd": 16, "n_layer": 1, "n_head": 2,
                                 "n_positions": 16, "bos_token_id": 1, "eos_token_id": 1}}
    assert run(tmp_path, raw) == (2, "error: data.options.seq_len: sequences of 32 tokens are longer than the student "
                                     "can read (n_positions: 16, learned positions)\n")
    assert not (tmp_path / "run").exists()
    raw["data"]["options"]["seq_len"] = 16  # a rotary teacher of 256 positions and a student of 16: fine
    assert run(tmp_path, raw)[0] == 0


class Payload:
    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (Path.touch, (self.sentinel,))


def hostile_copy(tiny_assets, tmp_path) -> tuple[Path, Path]:
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_assets["teacher"], teacher)
    sentinel = tmp_path / "pwned"
    (tmp_path / "weights.bin").write_bytes(pickle.dumps(Payload(sentinel)))
    return teacher, sentinel


def test_a_weight_index_that_points_at_a_pickle_is_refused_unopened(recipe_factory, tiny_assets, tmp_path):
    teacher, sentinel = hostile_copy(tiny_assets, tmp_path)
    shutil.move(str(tmp_path / "weights.bin"), teacher / "model-00001-of-00001.bin")
    (teacher / "model.safetensors").unlink()
    shutil.copy(Path(tiny_assets["teacher"]) / "model.safetensors", teacher / "model-00002-of-00002.safetensors")
    (teacher / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00001.bin",
                                        "model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}))
    raw = recipe_factory(steps=1)
    raw["teacher"]["options"]["model"] = str(teacher)
    assert run(tmp_path, raw) == (2, "error: teacher.options.model: model.safetensors.index.json maps weights to "
                                     "model-00001-of-00001.bin, which is not a .safetensors file (kdistill never "
                                     "unpickles weights)\n")
    (teacher / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "../weights.safetensors"}}))
    assert run(tmp_path, raw) == (2, "error: teacher.options.model: model.safetensors.index.json maps weights to "
                                     f"../weights.safetensors, which is not a file in {teacher}\n")
    assert not sentinel.exists() and not (tmp_path / "run").exists()


def test_a_weight_file_linked_to_a_pickle_is_refused_unopened(recipe_factory, tiny_assets, tmp_path):
    teacher, sentinel = hostile_copy(tiny_assets, tmp_path)
    (teacher / "model.safetensors").unlink()
    (teacher / "model.safetensors").symlink_to(tmp_path / "weights.bin")
    raw = recipe_factory(steps=1)
    raw["student"] = {"model": str(teacher), "tokenizer": tiny_assets["teacher"]}
    assert run(tmp_path, raw) == (2, f"error: student.model: {teacher / 'model.safetensors'} (a link to "
                                     f"{tmp_path / 'weights.bin'}) is not a safetensors file; kdistill reads weights "
                                     "only from safetensors files\n")
    assert not sentinel.exists() and not (tmp_path / "run").exists()


def test_a_model_folder_behind_links_still_loads(recipe_factory, tiny_assets, tmp_path):
    """The hub's cache holds weights as links to blobs elsewhere: following links must keep working."""
    teacher = tmp_path / "snapshot"
    blobs = tmp_path / "blobs"
    shutil.copytree(tiny_assets["teacher"], blobs)
    teacher.mkdir()
    for file in blobs.iterdir():
        (teacher / file.name).symlink_to(file)
    raw = recipe_factory(steps=1)
    raw["teacher"]["options"]["model"] = str(teacher)
    engine = engine_for(raw)
    engine.run()
    assert engine.teacher.model.config.num_hidden_layers == 4


@pytest.mark.parametrize("state, why", [([1, 2], "a JSON list, not an object"),
                                        ({"step": "2"}, "missing or malformed: step, best, before, data_fingerprint, result_fields")])
def test_a_state_file_of_the_wrong_shape_is_a_corrupt_checkpoint(recipe_factory, tmp_path, state, why):
    from kdistill.core.checkpoint import mark_complete

    raw = recipe_factory(steps=2, save_every=1)
    assert run(tmp_path, raw)[0] == 0
    shutil.rmtree(tmp_path / "run" / "final")  # as if it died before the final model
    newest = tmp_path / "run" / "checkpoints" / "step-00000002"
    (newest / "state.json").write_text(json.dumps(state))
    mark_complete(newest, 2)  # resealed: only the shape is wrong
    line = f"error: {newest / 'state.json'}: not a checkpoint state ({why})\n"
    assert run(tmp_path, raw, "--resume-from", newest) == (2, line)
    with pytest.warns(UserWarning, match=f"skipping checkpoint {newest}: {newest / 'state.json'}: not a checkpoint state"):
        summary = engine_for(raw).run(resume=True)  # falls back to step 1 and trains step 2 again
    assert summary["after"]["train/loss"] > 0
