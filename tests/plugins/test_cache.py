"""The offline top-k teacher cache, on tiny models (quantized teachers: test_quantized_teacher.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import engine_for, tiny_recipe, write_recipe
from kdistill.core.config import resolve
from kdistill.core.errors import ConfigError
from kdistill.core.registry import Registry
from kdistill.plugins.teachers.cache_store import TeacherCache, dequantize, quantize, shard_name, top_k_targets
from kdistill.plugins.teachers.cached import cache_from_plan

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cached_recipe(assets, tmp_path, cache="cache", k=16, temperature=2.0, **train):
    raw = tiny_recipe(assets, tmp_path / "run", **train)
    raw["teacher"] = {"name": "cached", "options": {"path": str(tmp_path / cache), "k": k, "temperature": temperature,
                                                    "shard_sequences": 8, "source": {"model": assets["teacher"]},
                                                    "load_source": True}}
    raw["data"]["options"]["max_train_blocks"] = 20  # 3 shards: 8 + 8 + 4
    raw["losses"][0]["options"]["temperature"] = temperature
    return raw


def plan_of(raw):
    return resolve(raw, Registry.from_plugins())


def shards(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("shard-*.safetensors"))}


def test_quantized_log_probabilities_stay_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    top, _, _ = top_k_targets(torch.randn(5, 7, 300, generator=g) * 4, 40, 1.5)
    q, hi, lo = quantize(top)
    error = (dequantize(q, hi, lo) - top).abs()
    step = (hi.float() - lo.float()) / 255
    f16 = torch.maximum(hi.float().abs(), lo.float().abs()) * 2 ** -11  # float16 rounding of hi and lo
    assert (error <= (step / 2 + 2 * f16).unsqueeze(-1) + 1e-6).all()
    assert q.dtype == torch.uint8 and hi.dtype == torch.float16


def test_a_cache_killed_mid_shard_and_resumed_equals_one_written_in_one_go(tiny_assets, tmp_path):
    whole = cached_recipe(tiny_assets, tmp_path, cache="whole")
    manifest = cache_from_plan(plan_of(whole), progress=False)
    assert manifest["complete"] and manifest["n_sequences"] == 20
    assert sorted(shards(tmp_path / "whole")) == [shard_name(i) for i in range(3)]

    cut = cached_recipe(tiny_assets, tmp_path, cache="cut")
    path = write_recipe(tmp_path / "cut.yaml", cut)
    killer = ("import os, signal, sys\n"
              "import kdistill.plugins.teachers.cache_store as c\n"
              "original, calls = c._teacher_logits, [0]\n"
              "def dying(*a):\n"
              "    calls[0] += 1\n"
              "    if calls[0] == 4:  # the second batch of shard 1: shard 0 is written, shard 1 half computed\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return original(*a)\n"
              "c._teacher_logits = dying\n"
              "from kdistill.cli import app\n"
              f"sys.argv = ['kdistill', 'cache-teacher', {str(path)!r}]\n"
              "app()\n")
    proc = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(shards(tmp_path / "cut")) == [shard_name(0)]
    assert not json.loads((tmp_path / "cut" / "manifest.json").read_text())["complete"]
    with pytest.raises(ConfigError, match="is incomplete"):
        TeacherCache(tmp_path / "cut")
    resumed = cache_from_plan(plan_of(cut), progress=False)
    assert shards(tmp_path / "cut") == shards(tmp_path / "whole")
    assert (tmp_path / "cut" / "index.safetensors").read_bytes() == (tmp_path / "whole" / "index.safetensors").read_bytes()
    assert {k: v for k, v in resumed.items() if k != "teacher"} == {k: v for k, v in manifest.items() if k != "teacher"}
    assert not list((tmp_path / "cut").glob(".tmp-*"))


def test_the_cache_reads_back_the_teachers_top_k(tiny_assets, tmp_path):
    raw = cached_recipe(tiny_assets, tmp_path, k=16, temperature=2.0)
    manifest = cache_from_plan(plan_of(raw), progress=False)
    cache = TeacherCache(tmp_path / "cache")
    engine = engine_for(tiny_recipe(tiny_assets, tmp_path / "live"))
    engine.build()
    # the live run's data differ (no max_train_blocks): build the cached run's own
    data = plan_of(raw).one("data").build()
    data.setup(engine.tokenizer, 0)
    keys = data.train_keys()[[0, 9, 19]]
    batch = data.batch_for_keys(keys)
    with torch.no_grad():
        logits = engine.teacher.model(input_ids=batch.input_ids).logits
    top, ids, tail = top_k_targets(logits, 16, 2.0)
    got = cache.lookup(keys)
    assert torch.equal(got.ids, ids)
    assert (got.logprobs - top).abs().max().item() <= manifest["max_abs_logprob_error"] + 2e-3
    assert (got.log_tail - tail).abs().max().item() < 2e-2
    # 16 ids of two bytes (a vocabulary over 256), 16 codes, hi, lo and tail in float16, the keys (8 bytes
    # per sequence), and each shard file's header (under 1 KiB)
    assert 256 < manifest["vocab_size"] <= 65536 and manifest["ids_dtype"] == "uint16"
    payload = manifest["tokens"] * (16 * 2 + 16 + 6) + 20 * 8
    assert payload < manifest["shard_bytes"] < payload + 3 * 1024


def test_a_mismatched_cache_is_refused_naming_the_field(tiny_assets, tmp_path):
    raw = cached_recipe(tiny_assets, tmp_path)
    cache_from_plan(plan_of(raw), progress=False)
    other_data = json.loads(json.dumps(raw))
    other_data["data"]["options"]["seq_len"] = 16
    with pytest.raises(ConfigError) as err:
        engine_for(other_data).run()
    assert str(err.value).startswith(f"teacher.options.path: the teacher cache at {tmp_path / 'cache'} does not fit this "
                                     "run: data_fingerprint (cache '")
    other_k = json.loads(json.dumps(raw))
    other_k["teacher"]["options"]["k"] = 8
    with pytest.raises(ConfigError) as err:
        engine_for(other_k).run()
    assert str(err.value) == (f"teacher.options.path: the teacher cache at {tmp_path / 'cache'} does not fit this run: "
                              "k (cache 16, this run 8)")
    other_t = json.loads(json.dumps(raw))
    other_t["losses"][0]["options"]["temperature"] = 1.0
    with pytest.raises(ConfigError) as err:
        engine_for(other_t).run()
    assert str(err.value) == ("losses: 'forward-kl' uses temperature 1.0 but the cached teacher's is 2.0 "
                              "(teacher.options.temperature)")
    tvd = json.loads(json.dumps(raw))
    tvd["losses"][0] = {"name": "tvd"}
    with pytest.raises(ConfigError, match="'tvd' is not defined on top-k targets"):
        engine_for(tvd).run()
    writing_other = json.loads(json.dumps(raw))
    writing_other["teacher"]["options"]["k"] = 8
    with pytest.raises(ConfigError, match=r"holds a cache of something else: k \(cache 16, now 8\); pass --overwrite"):
        cache_from_plan(plan_of(writing_other), progress=False)
    assert not (tmp_path / "run").exists()


def vocab_size(assets) -> int:
    return json.loads((Path(assets["teacher"]) / "config.json").read_text())["vocab_size"]


def test_training_from_the_cache_runs_no_teacher_forward(tiny_assets, tmp_path):
    raw = cached_recipe(tiny_assets, tmp_path, k=vocab_size(tiny_assets), temperature=2.0, steps=4)  # k = the vocabulary
    raw["evaluators"] = []
    cache_from_plan(plan_of(raw), progress=False)
    engine = engine_for(raw)
    original = engine.build
    calls = []

    def counting():
        original()
        engine.teacher.model.register_forward_hook(lambda *a: calls.append(1))
    engine.build = counting
    summary = engine.run()
    assert calls == [] and engine.flops_per_token == 6 * sum(p.numel() for p in engine.student.parameters())
    live = json.loads(json.dumps(raw))
    live["teacher"] = {"name": "hf", "options": {"model": tiny_assets["teacher"]}}
    live["output_dir"] = str(tmp_path / "live")
    live_summary = engine_for(live).run()
    # with k = vocabulary the cache differs from the live teacher only by its quantization
    assert summary["after"]["train/forward-kl"] == pytest.approx(live_summary["after"]["train/forward-kl"], rel=2e-2)
