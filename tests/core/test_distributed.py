"""DeepSpeed on CPU (gloo): two processes with ZeRO-2 and with ZeRO-3 (teacher partitioned) against one
process on the same global batch, and exact resume from DeepSpeed's own checkpoints.

The first DeepSpeed process group compiles a small C++ extension (about 1-2 minutes, once, cached
under TORCH_EXTENSIONS_DIR); it needs g++ and the Python headers.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_assets, cut_after, tiny_recipe, write_recipe
from kdistill.core.config import TrainSpec
from kdistill.core.distributed import fill_auto, teacher_config
from kdistill.core.errors import ConfigError

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None and shutil.which("g++") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed (pip install 'kdistill[deepspeed]', "
                                     ".ci/run does) and g++ for its communication extension")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# agreement of two processes with one, in the largest absolute weight difference (weights are about 1):
# the gradient all-reduce adds the two halves in another order than one process sums the batch
TOLERANCE = 1e-5


def torchrun(recipe: Path, *args: str, procs: int = 2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", str(_port()),
           "-m", "kdistill.cli", "run", str(recipe), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def recipe(assets, out: Path, **train) -> dict:
    raw = tiny_recipe(assets, out, **{"steps": 4, "save_every": 2, "keep_checkpoints": 2, "eval_every": 0, **train})
    raw["evaluators"] = []
    return raw


@needs_deepspeed
@pytest.mark.multiprocess
@pytest.mark.parametrize("stage,teacher", [(2, "replicated"), (3, "zero3")])
def test_two_processes_match_one_and_resume_exactly(tiny_assets, tmp_path, stage, teacher):
    one = recipe(tiny_assets, tmp_path / "one", batch_size=4)
    subprocess.run([sys.executable, "-m", "kdistill.cli", "run", str(write_recipe(tmp_path / "one.yaml", one))],
                   check=True, capture_output=True, env=ENV, timeout=600)

    two = recipe(tiny_assets, tmp_path / "two", batch_size=2, grad_accum=1)
    two["distributed"] = {"backend": "deepspeed", "config": {"zero_optimization": {"stage": stage}}, "teacher": teacher}
    path = write_recipe(tmp_path / "two.yaml", two)
    torchrun(path)
    out = tmp_path / "two"
    assert max_difference(weights(tmp_path / "one"), weights(out)) < TOLERANCE
    # only rank 0 writes the run's files; every step is logged once
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "metrics" in r] == [1, 2, 3, 4]
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    files = json.loads((out / "checkpoints" / "step-00000004" / "COMPLETE").read_text())["files"]
    assert any("optim_states" in name for name in files) and len([n for n in files if "zero_pp_rank_1" in n]) >= 1

    # resume from DeepSpeed's checkpoint at step 2: bit-identical to the uninterrupted run
    resumed = tmp_path / "resumed"
    again = cut_after(two, resumed, "step-00000004")
    result = torchrun(write_recipe(tmp_path / "again.yaml", again), "--resume")
    assert f"resuming from {resumed / 'checkpoints' / 'step-00000002'} (step 2)" in result.stderr
    a, b = weights(out), weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def kdistill_run(recipe_path, *flags):
    """`kdistill run` in a process of its own (DeepSpeed's single-process launch sets up its own state)."""
    return subprocess.run([sys.executable, "-m", "kdistill.cli", "run", str(recipe_path), *flags], capture_output=True,
                          text=True, env=ENV, timeout=600)


@needs_deepspeed
def test_a_resume_that_deepspeed_cannot_load_is_an_error(tiny_assets, tmp_path):
    """DeepSpeed alone returns quietly from load_checkpoint when there is nothing to load."""
    raw = recipe(tiny_assets, tmp_path / "run", batch_size=2, steps=2)
    raw["distributed"] = {"backend": "deepspeed"}
    path = write_recipe(tmp_path / "r.yaml", raw)
    folder = tmp_path / "run" / "checkpoints" / "step-00000001"
    folder.mkdir(parents=True)
    (folder / "COMPLETE").write_text(json.dumps({"step": 1, "files": {}}))  # complete by our marker, empty for DeepSpeed
    result = kdistill_run(path, "--resume")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (f"error: --resume: DeepSpeed could not load the checkpoint {folder} "
                                              "(AssertionError: its files are missing or unreadable)")
    assert not (tmp_path / "run" / "final").exists()


@needs_deepspeed
def test_a_flipped_bit_in_a_deepspeed_checkpoint_is_refused_before_deepspeed_reads_it(tiny_assets, tmp_path):
    """The marker hashes DeepSpeed's files too; every rank checks its share before anything loads."""
    raw = recipe(tiny_assets, tmp_path / "run", batch_size=2, steps=2, save_every=1)
    raw["distributed"] = {"backend": "deepspeed"}
    path = write_recipe(tmp_path / "r.yaml", raw)
    assert kdistill_run(path).returncode == 0
    shutil.rmtree(tmp_path / "run" / "final")  # died before its final model
    folder = tmp_path / "run" / "checkpoints" / "step-00000002"
    marker = json.loads((folder / "COMPLETE").read_text())
    assert marker["hash"] == "sha256" and sorted(marker["digests"]) == sorted(marker["files"])
    name = next(n for n in sorted(marker["files"]) if "optim_states" in n)
    data = bytearray((folder / name).read_bytes())
    data[-5] ^= 0x01
    (folder / name).write_bytes(bytes(data))
    result = kdistill_run(path, "--resume")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == (f"error: {folder / name}: its content does not match what was saved "
                                              "(its sha256 differs from the one in COMPLETE)")
    assert not (tmp_path / "run" / "final").exists()


def test_auto_values_come_from_the_recipe():
    train = TrainSpec(steps=10, batch_size=3, grad_accum=4, grad_clip=0.5, lr=2e-4, weight_decay=0.1)
    config = fill_auto({"train_batch_size": "auto", "gradient_clipping": "auto", "zero_optimization": {"stage": 3},
                        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "eps": 1e-6}},
                        "bf16": {"enabled": "auto"}}, train, world_size=8, bf16_ok=False)
    assert config["train_micro_batch_size_per_gpu"] == 3 and config["gradient_accumulation_steps"] == 4
    assert config["train_batch_size"] == 3 * 4 * 8 and config["gradient_clipping"] == 0.5
    assert config["optimizer"]["params"] == {"lr": 2e-4, "weight_decay": 0.1, "eps": 1e-6, "betas": [0.9, 0.999]}
    assert config["bf16"] == {"enabled": False}
    assert teacher_config(config, 3) == {"train_micro_batch_size_per_gpu": 3, "zero_optimization": {"stage": 3},
                                         "steps_per_print": 1 << 30, "bf16": {"enabled": False}}
    with pytest.raises(ConfigError) as err:
        fill_auto({"gradient_accumulation_steps": 2}, train, world_size=1, bf16_ok=False)
    assert str(err.value) == ("distributed.config.gradient_accumulation_steps: 2 disagrees with the recipe (4); "
                              "write \"auto\" or leave it out")
    with pytest.raises(ConfigError, match="distributed.config.scheduler: the recipe's scheduler sets the learning rate"):
        fill_auto({"scheduler": {"type": "WarmupLR"}}, train, world_size=1, bf16_ok=False)


def test_zero_memory_by_hand():
    from kdistill.analysis import zero_memory

    rows = zero_memory(70e9, 8e9, 8, teacher_partitioned=True)
    # bytes per student parameter: 2 (bf16 weights) + 2 (bf16 gradients) + 12 (float32 master, momentum, variance)
    assert [r.student_bytes for r in rows] == [16 * 8e9, 4 * 8e9 + 12 * 1e9, 2 * 8e9 + 14 * 1e9, 16 * 1e9]
    assert [r.teacher_bytes for r in rows] == [2 * 70e9 / 8] * 4
    assert zero_memory(70e9, 8e9, 8, teacher_partitioned=False)[2].total == 2 * 8e9 + 14 * 1e9 + 140e9


def test_the_deepspeed_config_may_be_a_json_file(tmp_path):
    from kdistill.core.distributed import read_config

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": "auto"}))
    assert read_config(str(path)) == {"zero_optimization": {"stage": 3}, "gradient_clipping": "auto"}
    assert read_config(None) == {"zero_optimization": {"stage": 2}}
    with pytest.raises(ConfigError) as err:
        read_config(str(tmp_path / "missing.json"))
    assert str(err.value) == f"distributed.config: no such file: {tmp_path / 'missing.json'}"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"^distributed.config: .*ds.json is not JSON: "):
        read_config(str(path))


@needs_deepspeed
@pytest.mark.multiprocess
def test_on_policy_with_a_zero3_student_samples_what_one_process_samples(tiny_assets, tmp_path):
    """Greedy answers of the same initial student: the first step's sampled tokens, summed over the two ranks
    of a ZeRO-3 run (each answering its own rows, parameters gathered during generation), equal one process's."""
    teacher, data = chat_assets(tiny_assets, tmp_path)
    metrics = {}
    for name, procs in (("one", 1), ("two", 2)):
        raw = recipe({**tiny_assets, "teacher": str(teacher)}, tmp_path / name, batch_size=4 // procs, steps=2, save_every=0)
        raw["data"] = data
        raw["strategy"] = {"name": "on-policy", "options": {"temperature": 0.0, "max_new_tokens": 5}}
        raw["losses"] = [{"name": "reverse-kl"}]
        if procs == 2:
            raw["distributed"] = {"backend": "deepspeed", "config": {"zero_optimization": {"stage": 3}}, "teacher": "zero3"}
            torchrun(write_recipe(tmp_path / f"{name}.yaml", raw))
        else:
            subprocess.run([sys.executable, "-m", "kdistill.cli", "run", str(write_recipe(tmp_path / f"{name}.yaml", raw))],
                           check=True, capture_output=True, env=ENV, timeout=600)
        records = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        metrics[name] = next(r["metrics"] for r in records if r.get("step") == 1 and "metrics" in r)
    assert metrics["two"]["on_policy/sampled_answers"] == metrics["one"]["on_policy/sampled_answers"] == 4
    assert metrics["two"]["on_policy/sampled_tokens"] == metrics["one"]["on_policy/sampled_tokens"]
    assert abs(metrics["two"]["train/loss"] - metrics["one"]["train/loss"]) < 1e-4
