"""The offline top-k teacher cache, on tiny models (quantized teachers: test_quantized_teacher.py)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from conftest import engine_for, tiny_recipe, write_recipe
from kdistill.cli import app
from kdistill.core.config import resolve
from kdistill.core.errors import ConfigError, KdistillError
from kdistill.core.registry import Registry
from kdistill.plugins.teachers.cache_store import (
    TeacherCache,
    counted,
    dequantize,
    elias_fano_layout,
    file_record,
    log_normalizer,
    pack_sorted_ids,
    quantize,
    shard_name,
    top_k_targets,
    unpack_sorted_ids,
)
from kdistill.plugins.teachers.cached import cache_from_plan, source_identity
from kdistill.plugins.teachers.hf import HFTeacher

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def cached_recipe(assets, tmp_path, cache="cache", k=16, temperature=2.0, mode="top-k", **train):
    raw = tiny_recipe(assets, tmp_path / "run", **train)
    raw["teacher"] = {"name": "cached", "options": {"path": str(tmp_path / cache), "k": k, "temperature": temperature, "mode": mode,
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_targets_match_a_float64_log_softmax_across_normalizer_chunks(dtype):
    """The normalizer is summed a few rows at a time (here 2 rows of 300: 35 rows make a ragged last chunk);
    masked (-inf) logits count for nothing; the ids, log-probabilities and tail equal float64's."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(5, 7, 300, generator=g) * 4).to(dtype)
    logits[0, 0, :150] = -math.inf
    reference = torch.log_softmax(logits.double() / 1.5, dim=-1)
    ref_top, ref_ids = reference.topk(12, dim=-1)
    ref_tail = torch.log1p(-ref_top.exp().sum(-1))
    assert torch.allclose(log_normalizer(logits, 1.5, chunk_elements=600).double(),
                          torch.logsumexp(logits.double() / 1.5, dim=-1), atol=1e-5)
    top, ids, tail = top_k_targets(logits, 12, 1.5)
    assert torch.equal(ids, ref_ids)
    assert (top.double() - ref_top).abs().max() < 1e-5 and (tail.double() - ref_tail).abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["top-k", "sampled"])
def test_a_cache_killed_mid_shard_and_resumed_equals_one_written_in_one_go(tiny_assets, tmp_path, mode):
    """Sampled caches too: the draws are seeded per shard, so the resumed shards are the same bytes."""
    whole = cached_recipe(tiny_assets, tmp_path, cache="whole", mode=mode)
    manifest = cache_from_plan(plan_of(whole), progress=False)
    assert manifest["complete"] and manifest["n_sequences"] == 20
    assert sorted(shards(tmp_path / "whole")) == [shard_name(i) for i in range(3)]

    cut = cached_recipe(tiny_assets, tmp_path, cache="cut", mode=mode)
    path = write_recipe(tmp_path / "cut.yaml", cut)
    killer = ("import os, signal, sys\n"
              "import kdistill.plugins.teachers.cache_store as c\n"
              "original, calls = c._encoded, [0]\n"
              "def dying(*a):\n"
              "    calls[0] += 1\n"
              "    if calls[0] == 4:  # the second batch of shard 1: shard 0 is written, shard 1 half computed\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    return original(*a)\n"
              "c._encoded = dying\n"
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


def test_a_sampled_cache_holds_k_draws_from_the_teachers_distribution(tiny_assets, tmp_path):
    """Each position: k distinct ids whose counts sum to k, every token of the vocabulary drawn floor(k p) or
    ceil(k p) times (systematic sampling; p the teacher's probability at T); over all positions the likeliest
    token's share of the draws follows its mean probability; the teacher's entropy at T per position (float64
    reference, float16 storage); the draws Elias-Fano coded (2 + log2(V / k) bits a draw) and 2 bytes a
    position. A loss that is not unbiased on draws is refused, word for word."""
    raw = cached_recipe(tiny_assets, tmp_path, k=8, temperature=2.0, mode="sampled")
    manifest = cache_from_plan(plan_of(raw), progress=False)
    assert manifest["mode"] == "sampled" and manifest["seed"] == 0 and manifest["encoding"] == "kdistill-sampled/4"
    cache = TeacherCache(tmp_path / "cache")
    engine = engine_for(tiny_recipe(tiny_assets, tmp_path / "live"))
    engine.build()
    data = plan_of(raw).one("data").build()
    data.setup(engine.tokenizer, 0)
    keys = data.train_keys()
    got = cache.lookup(keys)
    assert got.kind == "sampled" and torch.isneginf(got.log_tail).all()
    counts = (got.logprobs.exp() * 8).round()
    assert torch.equal(counts.sum(-1), torch.full(counts.shape[:-1], 8.0))
    assert all(len(set(row)) == 8 for row in got.ids.reshape(-1, 8).tolist())
    with torch.no_grad():
        probs = torch.softmax(engine.teacher.model(input_ids=data.batch_for_keys(keys).input_ids).logits / 2.0, -1)
    dense = torch.zeros_like(probs).scatter_add_(-1, got.ids, counts)
    assert (dense - 8 * probs).abs().max() < 1 + 1e-4  # floor or ceil of k p, for every token
    best = probs.argmax(-1, keepdim=True)
    share = ((got.ids == best) * counts).sum(-1) / 8  # how often each position drew its likeliest token
    n = share.numel()
    expected = probs.gather(-1, best).mean()
    assert abs(share.mean() - expected) < 5 * math.sqrt(0.25 / (8 * n))
    reference = -(probs.double() * probs.double().log()).sum(-1)
    assert got.entropy.dtype == torch.float32 and (got.entropy.double() - reference).abs().max() < 4e-3  # float16
    low = int(math.log2(manifest["vocab_size"] / 8))
    payload = manifest["tokens"] * (math.ceil((8 * low + 8 + (manifest["vocab_size"] - 1) // 2 ** low) / 8) + 2) + 20 * 8
    assert payload < manifest["shard_bytes"] < payload + 3 * 1024
    reverse = json.loads(json.dumps(raw))
    reverse["losses"][0] = {"name": "reverse-kl", "options": {"temperature": 2.0}}
    with pytest.raises(ConfigError) as err:
        engine_for(reverse).run()
    assert str(err.value) == ("losses: 'reverse-kl' is not unbiased on sampled targets (it needs the teacher's "
                              "probability of the student's own tokens); with a cached teacher of mode sampled use "
                              "forward-kl, or mode: top-k")
    as_top_k = json.loads(json.dumps(raw))
    as_top_k["teacher"]["options"]["mode"] = "top-k"
    with pytest.raises(ConfigError) as err:
        engine_for(as_top_k).run()
    assert str(err.value) == (f"teacher.options.path: the teacher cache at {tmp_path / 'cache'} does not fit this run: "
                              "mode (cache 'sampled', this run 'top-k')")


def test_sorted_ids_pack_into_elias_fano_bytes_and_back():
    """Non-decreasing ids (repeats, the first and last id of the vocabulary) come back exactly from
    ceil((k L + k + floor((V - 1) / 2^L)) / 8) bytes, L = floor(log2(V / k)): 92 bytes for 64 ids of the
    quickstart teacher's 49,152 (128 as 2-byte ids); down to L = 0 where k is near V."""
    assert elias_fano_layout(64, 49152) == (9, 159, 92) and elias_fano_layout(48, 49152)[2] == 72
    g = torch.Generator().manual_seed(0)
    for vocab, k in [(49152, 64), (300, 8), (4, 4), (17, 16), (1 << 20, 3), (256, 1), (70000, 64)]:
        ids = torch.randint(0, vocab, (3, 5, k), generator=g).sort(-1).values
        ids[0, 0] = vocab - 1
        ids[0, 1] = 0
        ids[1, 0] = ids[1, 0, :1].expand(k)  # one token drawn k times
        packed = pack_sorted_ids(ids, vocab)
        low = int(math.floor(math.log2(vocab / k)))
        assert packed.dtype == torch.uint8 and packed.shape == (3, 5, math.ceil((k * low + k + (vocab - 1) // 2 ** low) / 8))
        assert torch.equal(unpack_sorted_ids(packed, k, vocab), ids), (vocab, k)
    with pytest.raises(ValueError, match="14 ids where 16 were packed"):
        # 8 ids below 64: 3 low bits each (3 bytes), then 15 unary bits holding 7 ones instead of 8
        unpack_sorted_ids(torch.zeros(2, 1, 5, dtype=torch.uint8).index_fill_(-1, torch.tensor([3]), 0b01111111), 8, 64)


def test_sampled_caches_of_the_earlier_encodings_are_still_read_and_not_resumed_into(tiny_assets, tmp_path):
    """A sampled cache of the third encoding (the draws as plain ids), of the second (distinct ids and a byte of
    count each, and the entropy) and of the first (no entropy, no `encoding` in the manifest) read as the same
    targets, the first without the entropy; writing over them is refused, naming the encoding, unless
    --overwrite."""
    raw = cached_recipe(tiny_assets, tmp_path, k=4, temperature=2.0, mode="sampled")
    manifest = cache_from_plan(plan_of(raw), progress=False)
    folder = tmp_path / "cache"
    keys = torch.tensor(sorted(TeacherCache(folder)))
    now = TeacherCache(folder).lookup(keys)

    def rewrite(change, encoding):
        for name in list(manifest["shards"]):
            tensors = load_file(str(folder / name))
            change(tensors)
            save_file(tensors, str(folder / name))
            manifest["shards"][name] = file_record(folder / name)
        manifest.pop("encoding", None)
        if encoding:
            manifest["encoding"] = encoding
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return TeacherCache(folder).lookup(keys)

    def as_ids(tensors):
        tensors["ids"] = unpack_sorted_ids(tensors.pop("packed_ids"), 4, manifest["vocab_size"]).to(torch.uint16)

    def as_counts(tensors):
        ids, counts = counted(tensors["ids"].long(), manifest["vocab_size"])
        tensors.update(ids=ids.to(torch.uint16), counts=counts.to(torch.uint8))

    third = rewrite(as_ids, "kdistill-sampled/3")
    assert all(torch.equal(getattr(third, name), getattr(now, name)) for name in ("ids", "logprobs", "entropy"))
    second = rewrite(as_counts, "kdistill-sampled/2")
    first = rewrite(lambda tensors: tensors.pop("entropy"), None)
    assert torch.equal(second.ids, now.ids) and torch.equal(second.logprobs, now.logprobs)
    assert torch.equal(second.entropy, now.entropy) and first.entropy is None
    assert torch.equal(first.ids, now.ids) and torch.equal(first.logprobs, now.logprobs)
    with pytest.raises(ConfigError) as err:
        cache_from_plan(plan_of(raw), progress=False)
    assert str(err.value) == (f"teacher.options.path: {folder} holds a cache of something else: encoding (cache "
                              "'kdistill-sampled/1', now 'kdistill-sampled/4'); pass --overwrite to replace it")


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


# ---------------------------------------------------------------------------------------- integrity

REBUILD = "rebuild it with kdistill cache-teacher RECIPE"


def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stderr


def flip(path: Path, offset: int, count: int = 64) -> None:
    """Overwrite `count` bytes at `offset` with their complement: different content, the same size."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        old = handle.read(count)
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in old))


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final" / "model.safetensors"))


def test_a_shard_changed_in_place_is_refused_naming_it_and_cache_teacher_repairs_it(tiny_assets, tmp_path):
    raw = cached_recipe(tiny_assets, tmp_path, steps=6)  # 6 steps of 4 read all 20 sequences (one epoch)
    raw["evaluators"] = []
    path = write_recipe(tmp_path / "r.yaml", raw)
    cache_from_plan(plan_of(raw), progress=False)
    pristine = shards(tmp_path / "cache")
    code, err = cli("run", path)
    assert code == 0, err[-2000:]
    untouched = final_weights(tmp_path / "run")

    shard = tmp_path / "cache" / shard_name(1)
    flip(shard, shard.stat().st_size // 2)  # in the data, not the header: it still parses
    assert shard.stat().st_size == len(pristine[shard.name])
    code, err = cli("run", path, "--overwrite")
    assert code == 2
    # found mid-run (the progress bar above it on stderr): one line, no traceback
    assert err.endswith(f"\nerror: teacher cache: {shard}: content does not match the manifest (changed after it was "
                        f"written); {REBUILD}\n") and "Traceback" not in err
    assert not (tmp_path / "run" / "final").exists()

    # the message's remedy: cache-teacher recomputes only the changed shard, to the same bytes
    code, err = cli("cache-teacher", path)
    assert code == 0, err
    assert shards(tmp_path / "cache") == pristine
    code, err = cli("run", path, "--overwrite")
    assert code == 0, err[-2000:]
    repaired = final_weights(tmp_path / "run")
    assert untouched.keys() == repaired.keys() and all(torch.equal(untouched[k], repaired[k]) for k in untouched)


def test_a_permuted_index_or_shard_is_refused(tiny_assets, tmp_path):
    raw = cached_recipe(tiny_assets, tmp_path)
    path = write_recipe(tmp_path / "r.yaml", raw)
    cache_from_plan(plan_of(raw), progress=False)
    folder = tmp_path / "cache"
    index = folder / "index.safetensors"
    original = index.read_bytes()
    tensors = load_file(str(index))
    order = torch.arange(len(tensors["keys"])).roll(1)  # every key now points at another sequence's row
    save_file({"keys": tensors["keys"][order].clone(), "shard": tensors["shard"], "row": tensors["row"]}, str(index))
    assert index.stat().st_size == len(original) and index.read_bytes() != original
    code, err = cli("run", path)
    assert code == 2
    assert err == f"error: teacher cache: {index}: content does not match the manifest (changed after it was written); {REBUILD}\n"
    assert not (tmp_path / "run").exists()  # refused while loading the teacher, before the run folder exists
    index.write_bytes(original)

    # a shard whose rows (keys included) are permuted consistently: a valid file of the same size
    shard = folder / shard_name(2)
    size = shard.stat().st_size
    rows = load_file(str(shard))
    flipped = {name: value.flip(0).contiguous() for name, value in rows.items()}
    with safe_open(str(shard), "pt") as handle:
        metadata = handle.metadata()
    save_file(flipped, str(shard), metadata=metadata)
    cache = TeacherCache(folder)  # sizes, headers and the index check out; the hash is checked on first use
    assert shard.stat().st_size == size
    cache.lookup(load_file(str(folder / shard_name(0)))["keys"][:2])  # shard 0 is intact: served
    with pytest.raises(KdistillError) as err:
        cache.lookup(rows["keys"][:1])
    assert str(err.value) == f"teacher cache: {shard}: content does not match the manifest (changed after it was written); {REBUILD}"


def test_a_truncated_or_mangled_shard_is_one_line_naming_it(tiny_assets, tmp_path):
    raw = cached_recipe(tiny_assets, tmp_path)
    path = write_recipe(tmp_path / "r.yaml", raw)
    cache_from_plan(plan_of(raw), progress=False)
    shard = tmp_path / "cache" / shard_name(0)
    original = shard.read_bytes()
    shard.write_bytes(original[:-100])
    code, err = cli("run", path)
    assert code == 2
    assert err == (f"error: teacher cache: {shard}: {len(original) - 100} bytes where the manifest says {len(original)} "
                   f"(truncated or replaced); {REBUILD}\n")
    shard.write_bytes(b"\xff" * 8 + original[8:])  # a header length past the end of the file; the same size
    code, err = cli("run", path)
    assert code == 2
    assert err.startswith(f"error: teacher cache: {shard}: not a readable safetensors file (SafetensorError: ")
    assert err.endswith(f"); {REBUILD}\n") and err.count("\n") == 1
    shard.unlink()
    code, err = cli("run", path)
    assert (code, err) == (2, f"error: teacher cache: {shard}: missing; {REBUILD}\n")
    assert not (tmp_path / "run").exists()


def test_a_cache_of_the_older_format_is_refused(tiny_assets, tmp_path):
    raw = cached_recipe(tiny_assets, tmp_path)
    cache_from_plan(plan_of(raw), progress=False)
    manifest = tmp_path / "cache" / "manifest.json"
    old = json.loads(manifest.read_text())
    old["format"] = "kdistill-teacher-cache/1"
    del old["shards"], old["index"]
    manifest.write_text(json.dumps(old))
    with pytest.raises(ConfigError) as err:
        TeacherCache(tmp_path / "cache")
    assert str(err.value) == (f"teacher.options.path: the teacher cache at {tmp_path / 'cache'} has the older format "
                              "kdistill-teacher-cache/1 (no content hashes; its teacher known by path, not weights); "
                              f"{REBUILD} --overwrite")


def test_a_teacher_re_saved_at_the_same_path_with_other_weights_is_refused(tiny_assets, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_assets["teacher"], teacher)
    raw = cached_recipe(tiny_assets, tmp_path, steps=1)
    raw["evaluators"] = []
    raw["teacher"]["options"]["source"]["model"] = str(teacher)
    path = write_recipe(tmp_path / "r.yaml", raw)
    cache_from_plan(plan_of(raw), progress=False)

    moved = tmp_path / "moved"
    shutil.copytree(teacher, moved)  # the identity is the weights, not the path
    assert source_identity(HFTeacher.Options(model=str(moved))) == source_identity(HFTeacher.Options(model=str(teacher)))

    weights = teacher / "model.safetensors"
    header = weights.read_bytes()[:8 + int.from_bytes(weights.read_bytes()[:8], "little")]
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(teacher)).save_pretrained(teacher)  # re-initialised
    # the same shapes: the same safetensors header and size, so a digest of headers and sizes would not see it
    assert weights.read_bytes().startswith(header)
    assert source_identity(HFTeacher.Options(model=str(moved))) != source_identity(HFTeacher.Options(model=str(teacher)))

    code, err = cli("run", path)
    assert code == 2
    assert err == (f"error: teacher.options.source.model: the teacher at {teacher} has other weights than the ones the "
                   f"cache at {tmp_path / 'cache'} was built from; {REBUILD} --overwrite\n")
    assert not (tmp_path / "run").exists()
    code, err = cli("cache-teacher", path)
    assert code == 2 and err.startswith(f"error: teacher.options.path: {tmp_path / 'cache'} holds a cache of something "
                                        "else: teacher (cache {")
    code, err = cli("cache-teacher", path, "--overwrite")
    assert code == 0, err
    code, err = cli("run", path)
    assert code == 0, err[-2000:]


def test_a_cache_trains_on_a_machine_without_its_teacher(tiny_assets, tmp_path):
    """The teacher may stay where the cache was written: validate passes, the run warns that the cache is
    not checked against the weights, and trains as it would with the teacher present."""
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_assets["teacher"], teacher)
    raw = cached_recipe(tiny_assets, tmp_path, steps=2)
    raw["teacher"]["options"].update(source={"model": str(teacher)}, load_source=False)
    raw["student"] = {"model": tiny_assets["teacher"]}
    raw["evaluators"] = []
    cache_from_plan(plan_of(raw), progress=False)
    with_teacher = engine_for(raw).run()
    shutil.rmtree(teacher)
    raw["output_dir"] = str(tmp_path / "without")
    assert cli("validate", write_recipe(tmp_path / "r.yaml", raw))[0] == 0
    with pytest.warns(UserWarning, match=f"teacher.options.source.model: {teacher} is not on this machine; the cache at "
                                         f"{tmp_path / 'cache'} is used without checking it against the teacher's weights"):
        without = engine_for(raw).run()
    assert without["after"]["train/loss"] == with_teacher["after"]["train/loss"]
    raw["teacher"]["options"]["load_source"] = True  # the weights are needed now: refused in one line
    with pytest.raises(ConfigError) as err:
        engine_for(raw).run(overwrite=True)
    assert str(err.value) == f"teacher.options.source.model: no such file or folder: {teacher} (teacher.options.load_source needs it)"
