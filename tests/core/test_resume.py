"""SIGKILL at a random moment (often between accumulation micro-batches), resume, compare exactly."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from conftest import chat_assets, tiny_recipe, write_recipe

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "kdistill.cli", "run", *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=600)


def step_losses(path):
    losses = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "metrics" in record and "train/loss" in record["metrics"]:
            losses[record["step"]] = record["metrics"]["train/loss"]  # a re-done step overwrites
    return losses


def test_sigkill_then_resume_matches_an_uninterrupted_run(tiny_assets, tmp_path):
    settings = dict(steps=24, batch_size=4, grad_accum=3, save_every=1, keep_checkpoints=2, num_threads=1, eval_every=0)
    full = tiny_recipe(tiny_assets, tmp_path / "full", **settings)
    full["data"]["options"]["seq_len"] = 64
    kill_resume_and_compare(full, tmp_path)


def test_sigkill_during_on_policy_steps_then_resume_matches_an_uninterrupted_run(tiny_assets, tmp_path):
    """The student samples in most micro-batches (lmbda 0.7): a kill lands in sampling or in an update, and the
    resumed run must draw the same answers (seeded by micro-batch index) and reach the same weights."""
    teacher, data = chat_assets(tiny_assets, tmp_path)
    settings = dict(steps=10, batch_size=3, grad_accum=2, save_every=1, keep_checkpoints=2, num_threads=1, eval_every=0)
    full = tiny_recipe({**tiny_assets, "teacher": str(teacher)}, tmp_path / "full", **settings)
    full["data"], full["evaluators"] = data, []
    full["strategy"] = {"name": "on-policy", "options": {"lmbda": 0.7, "max_new_tokens": 8, "temperature": 1.0}}
    full["losses"] = [{"name": "jsd", "weight": 1.0, "options": {"beta": 0.5}}]
    kill_resume_and_compare(full, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    sampled = [r["metrics"]["on_policy/student_batches"] for r in records if "on_policy/student_batches" in r.get("metrics", {})]
    assert len(sampled) == 10 and sum(sampled) >= 10  # most micro-batches were the student's own answers


def kill_resume_and_compare(full: dict, tmp_path) -> None:
    """Runs `full` whole, then again killed (SIGKILL) at a random moment after its first checkpoint, resumes,
    and compares the final weights and every step's loss after the resume point exactly."""
    steps = full["train"]["steps"]
    cut = json.loads(json.dumps(full))
    cut["output_dir"] = str(tmp_path / "cut")
    full_path, cut_path = write_recipe(tmp_path / "full.yaml", full), write_recipe(tmp_path / "cut.yaml", cut)

    done = run_cli(full_path)
    assert done.returncode == 0, done.stderr

    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    first = tmp_path / "cut" / "checkpoints" / "step-00000001"
    for attempt in range(5):
        delay = rng.uniform(0.0, 0.4) / (attempt + 1)
        proc = subprocess.Popen([sys.executable, "-m", "kdistill.cli", "run", str(cut_path), "--overwrite"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
        while not first.exists() and proc.poll() is None:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL and not (tmp_path / "cut" / "final").exists():
            break
    else:
        raise AssertionError("the run always finished before it could be killed")

    resumed = run_cli(cut_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    match = re.search(r"resuming from .*\(step (\d+)\)", resumed.stderr)
    assert match, resumed.stderr
    resume_step = int(match.group(1))
    assert 1 <= resume_step < steps
    print(f"killed after {delay:.3f}s, resumed at step {resume_step}")

    a = load_file(str(tmp_path / "full" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    full_losses, cut_losses = step_losses(tmp_path / "full" / "metrics.jsonl"), step_losses(tmp_path / "cut" / "metrics.jsonl")
    assert sorted(full_losses) == list(range(1, steps + 1))
    assert all(cut_losses[s] == full_losses[s] for s in range(resume_step + 1, steps + 1))
