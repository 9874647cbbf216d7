"""The `vllm` teacher against a loopback stand-in of vLLM's OpenAI server (the same routes and answer shapes,
scored by the tiny teacher in this process), so that targets can be checked against a float64 reference and
faults injected at will. The real vLLM server: test_served_teacher_vllm.py."""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdistill
from conftest import chat_assets, engine_for, tiny_recipe
from kdistill import ConfigError, KdistillError

MODEL = "tiny-teacher"


class Stand_in:
    """A vLLM-shaped server on 127.0.0.1: /v1/models, /v1/completions with prompt_logprobs, /detokenize.
    `fail`: how many next completion requests answer HTTP 503 (-1: all); `mangle`: a function that changes
    a completion answer before it is sent."""

    def __init__(self, teacher_dir: str, max_logprobs: int = 300, key: str | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(teacher_dir, torch_dtype=torch.float64).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
        self.max_logprobs, self.key = max_logprobs, key
        self.fail, self.mangle, self.requests, self.headers = 0, None, 0, []
        self.lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, code: int, body) -> None:
                cut = isinstance(body, tuple)  # ("cut", bytes): the connection ends before the promised length
                raw = body[1] if cut else body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw) + (1000 if cut else 0)))
                if cut:
                    self.send_header("Connection", "close")
                    self.close_connection = True
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                stand_in.headers.append(dict(self.headers))
                self.reply(200, {"data": [{"id": MODEL, "max_model_len": 256}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stand_in.headers.append(dict(self.headers))
                if stand_in.key and self.headers.get("Authorization") != f"Bearer {stand_in.key}":
                    return self.reply(401, {"error": {"message": "Unauthorized"}})
                if self.path == "/detokenize":
                    return self.reply(200, {"prompt": stand_in.tokenizer.decode(body["tokens"])})
                with stand_in.lock:
                    stand_in.requests += 1
                    if stand_in.fail:
                        stand_in.fail -= 1 if stand_in.fail > 0 else 0
                        return self.reply(503, {"error": {"message": "busy"}})
                k = body["prompt_logprobs"]
                if k > stand_in.max_logprobs:
                    return self.reply(400, {"error": {"message": f"Requested prompt logprobs of {k}, which is greater "
                                                      f"than max allowed: {stand_in.max_logprobs}"}})
                answer = {"choices": [{"index": i, "text": "", "prompt_logprobs": stand_in.score(p, k)}
                                      for i, p in enumerate(body["prompt"])]}
                if stand_in.mangle is not None:
                    answer = stand_in.mangle(answer)
                self.reply(200, answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def score(self, ids: list[int], k: int) -> list:
        with torch.no_grad():
            logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0], -1)
        entries: list = [None]
        for t in range(1, len(ids)):
            top = logp[t - 1].topk(k)
            entry = {str(int(i)): {"logprob": float(v), "rank": r + 1, "decoded_token": ""}
                     for r, (v, i) in enumerate(zip(top.values, top.indices))}
            actual = ids[t]
            if str(actual) not in entry:
                entry[str(actual)] = {"logprob": float(logp[t - 1, actual]),
                                      "rank": int((logp[t - 1] > logp[t - 1, actual]).sum()) + 1, "decoded_token": ""}
            entries.append(entry)
        return entries

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def vocab(tiny_assets) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tiny_assets["teacher"]))


@pytest.fixture
def stand_in(tiny_assets):
    server = Stand_in(tiny_assets["teacher"])
    yield server
    server.close()


@pytest.fixture(scope="module")
def student_dir(tiny_assets, tmp_path_factory) -> str:
    """A 2-layer student of the tiny teacher's shape, with the teacher's tokenizer (a served teacher has no
    weights to cut a student from)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("student")
    config = AutoConfig.from_pretrained(tiny_assets["teacher"])
    config.num_hidden_layers = 2
    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_assets["teacher"]).save_pretrained(folder)
    return str(folder)


def served(url, **options) -> dict:
    return {"name": "vllm", "options": {"urls": [url] if isinstance(url, str) else url, "model": MODEL, "k": 16,
                                        "connect_timeout_s": 2.0, "backoff_s": 0.01, **options}}


def served_recipe(assets, student_dir, tmp_path, url, temperature=1.0, **options) -> dict:
    raw = tiny_recipe(assets, tmp_path / "run", steps=4)
    raw["student"] = {"model": student_dir}
    raw["teacher"] = served(url, temperature=temperature, **options)
    raw["losses"] = [{"name": "forward-kl", "weight": 1.0, "options": {"temperature": temperature}}]
    raw["evaluators"] = []
    return raw


def built(raw):
    engine = engine_for(raw)
    engine.build()
    return engine


def reference(assets, batch, temperature: float):
    """The tiny teacher's log-softmax at T in float64, and each label's log-probability at T = 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets["teacher"], torch_dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    labels = batch.labels.clamp_min(0)
    return torch.log_softmax(logits / temperature, -1), torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]


# --------------------------------------------------------------------------- targets


def test_the_served_top_k_tail_and_next_token_match_a_float64_reference(tiny_assets, student_dir, stand_in, tmp_path):
    engine = built(served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url))
    batch = engine.data.train_batch(0, 3)
    sparse = engine.teacher.outputs(batch, kdistill.Needs()).sparse
    logp, label = reference(tiny_assets, batch, 1.0)
    top, ids = logp.topk(16, -1)
    assert torch.equal(sparse.ids, ids)  # every position, the last one too (its label is sent as one token more)
    assert torch.allclose(sparse.logprobs.double(), top, atol=1e-5)
    tail = torch.log1p(-top.exp().sum(-1))
    assert torch.allclose(sparse.log_tail.double(), tail, atol=1e-4)
    assert torch.allclose(sparse.label_logprobs.double(), label, atol=1e-5)
    assert sparse.temperature == 1.0


def test_at_another_temperature_the_whole_vocabulary_softens_exactly(tiny_assets, student_dir, stand_in, tmp_path, vocab):
    """With k = the vocabulary there is no tail to approximate: the targets at T = 2 are the softmax of logits / 2."""
    engine = built(served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url, temperature=2.0, k=vocab))
    batch = engine.data.train_batch(1, 2)
    sparse = engine.teacher.outputs(batch, kdistill.Needs()).sparse
    logp, _ = reference(tiny_assets, batch, 2.0)
    assert torch.allclose(sparse.logprobs.double(), logp.gather(-1, sparse.ids), atol=1e-5)
    assert bool((sparse.log_tail == -math.inf).all())


def test_at_another_temperature_the_tail_is_spread_evenly(tiny_assets, student_dir, stand_in, tmp_path, vocab):
    engine = built(served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url, temperature=2.0, k=8))
    batch = engine.data.train_batch(0, 1)
    sparse = engine.teacher.outputs(batch, kdistill.Needs()).sparse
    logp, _ = reference(tiny_assets, batch, 1.0)
    top = logp.topk(8, -1).values
    spread = torch.log1p(-top.exp().sum(-1)) - math.log(vocab - 8)  # each tail token at T = 1, evenly spread
    bins = torch.cat([top / 2, (spread / 2 + math.log(vocab - 8))[..., None]], -1)
    bins = bins - torch.logsumexp(bins, -1, keepdim=True)
    assert torch.allclose(sparse.logprobs.double(), bins[..., :-1], atol=1e-5)
    assert torch.allclose(sparse.log_tail.double(), bins[..., -1], atol=1e-5)


def test_a_run_with_the_served_teacher_tracks_the_in_process_teacher(tiny_assets, student_dir, stand_in, tmp_path, vocab):
    """k = the vocabulary: the served targets are the whole distribution, so the losses are the in-process ones."""
    raw = served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url, temperature=2.0, k=vocab)
    kdistill.run(raw)
    local = json.loads(json.dumps(raw))
    local["teacher"], local["output_dir"] = {"name": "hf", "options": {"model": tiny_assets["teacher"]}}, str(tmp_path / "hf")
    kdistill.run(local)
    losses = [step_losses(Path(r["output_dir"])) for r in (raw, local)]
    assert sorted(losses[0]) == [1, 2, 3, 4]
    assert all(losses[0][s] == pytest.approx(losses[1][s], rel=1e-4) for s in losses[0])
    assert stand_in.requests > 4


def test_the_next_batches_are_fetched_while_the_student_trains_and_change_nothing(tiny_assets, student_dir, stand_in, tmp_path):
    raw = served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url)
    raw["train"].update(grad_accum=2, steps=3)
    engine = built(raw)
    asked = []
    fetch = engine.teacher._fetch
    engine.teacher._fetch = lambda batch: (asked.append(batch.input_ids[0, :4].tolist()), fetch(batch))[1]
    engine.train_step(0)
    assert len(engine.teacher._ahead) == 2  # step 2's micro-batches, asked for before step 2 begins
    concurrent.futures.wait(engine.teacher._ahead.values())
    first = [engine.micro_batch(i).input_ids[0, :4].tolist() for i in range(4)]
    assert asked == first  # step 1's two micro-batches, then step 2's, fetched ahead
    engine.train_step(1)
    concurrent.futures.wait(engine.teacher._ahead.values())
    assert asked == first + [engine.micro_batch(i).input_ids[0, :4].tolist() for i in (4, 5)]  # only step 3's are new
    engine.train_step(2)  # the last step: nothing ahead
    assert len(asked) == 6 and not engine.teacher._ahead
    kdistill.run(raw)
    plain = json.loads(json.dumps(raw))
    plain["teacher"]["options"]["prefetch"] = False
    plain["output_dir"] = str(tmp_path / "plain")
    kdistill.run(plain)
    a = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "final" / "model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def step_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["metrics"]["train/loss"] for r in rows if "train/loss" in r.get("metrics", {})}


def test_on_policy_with_the_sampled_token_loss_reads_the_served_next_token(tiny_assets, tmp_path):
    """The sampled-token loss on the student's own answers, scored by the served teacher, equals the same run
    scored by the in-process teacher (the answers are the same: sampling is seeded by micro-batch)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    teacher, data = chat_assets(tiny_assets, tmp_path)
    config = AutoConfig.from_pretrained(teacher)
    config.num_hidden_layers = 2
    torch.manual_seed(2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "student", safe_serialization=True)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp_path / "student")
    server = Stand_in(str(teacher))
    try:
        raw = tiny_recipe({**tiny_assets, "teacher": str(teacher)}, tmp_path / "hf", steps=3, batch_size=3)
        raw["student"] = {"model": str(tmp_path / "student")}
        raw["data"], raw["evaluators"] = data, []
        raw["strategy"] = {"name": "on-policy", "options": {"max_new_tokens": 6}}
        raw["losses"] = [{"name": "sampled-reverse-kl"}]
        kdistill.run(raw)
        remote = json.loads(json.dumps(raw))
        remote["teacher"], remote["output_dir"] = served(server.url, k=4), str(tmp_path / "served")
        kdistill.run(remote)
    finally:
        server.close()
    a, b = step_losses(tmp_path / "hf"), step_losses(tmp_path / "served")
    assert sorted(a) == [1, 2, 3] and all(b[s] == pytest.approx(a[s], rel=1e-4) for s in a)
    assert all(abs(a[s]) > 1e-3 for s in a)  # a student unlike its teacher: the estimate is not trivially 0


# --------------------------------------------------------------------------- start


def test_a_server_that_is_not_there_is_one_line_naming_its_url_within_seconds(tiny_assets, student_dir, tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    with pytest.raises(ConfigError) as err:
        built(served_recipe(tiny_assets, student_dir, tmp_path, url))
    assert time.monotonic() - started < 30
    assert str(err.value).startswith(f"teacher.options.urls: no server answers at {url} (")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("change, message", [
    (dict(model="other"), "teacher.options.model: {url} serves tiny-teacher, not other"),
    (dict(k=400), "teacher.options.k: {url} does not return 400 log-probabilities per position (start it with "
                  "--max-logprobs 400 or more; it said: teacher.options.urls: {url}/v1/completions refused the request "
                  "(HTTP 400: Requested prompt logprobs of 400, which is greater than max allowed: 300))"),
    (dict(api_key_env="KDISTILL_TEST_NO_SUCH_KEY"), "teacher.options.api_key_env: the environment variable "
                                                    "KDISTILL_TEST_NO_SUCH_KEY is not set"),
])
def test_what_the_server_cannot_do_is_refused_before_training(tiny_assets, student_dir, stand_in, tmp_path, change, message):
    with pytest.raises(ConfigError) as err:
        built(served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url, **change))
    assert str(err.value) == message.format(url=stand_in.url)


def test_a_server_with_another_tokenizer_is_refused_naming_the_first_token_that_differs(tiny_assets, student_dir, stand_in, tmp_path):
    real = stand_in.tokenizer.decode
    stand_in.tokenizer.decode = lambda ids: real([7 if i == 9 else 9 if i == 7 else i for i in ids])  # swap two tokens
    with pytest.raises(ConfigError) as err:
        built(served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url))
    here = stand_in.tokenizer.convert_tokens_to_string(stand_in.tokenizer.convert_ids_to_tokens([7]))
    there = stand_in.tokenizer.convert_tokens_to_string(stand_in.tokenizer.convert_ids_to_tokens([9]))
    assert str(err.value) == (f"teacher.options.urls: the tokenizer served at {stand_in.url} is not the student's: "
                              f"token 7 is {there!r} there and {here!r} here")


def test_packed_rows_are_refused(tiny_assets, student_dir, stand_in, tmp_path):
    _, data = chat_assets(tiny_assets, tmp_path)
    raw = served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url)
    data["options"].update(layout="pack", chat_template=False)
    raw["data"] = data
    engine = built(raw)
    with pytest.raises(ConfigError, match="^data.options.layout: a served teacher scores each row as one sequence"):
        engine.teacher.outputs(engine.data.train_batch(0, 2), kdistill.Needs())


# --------------------------------------------------------------------------- during the run


def test_a_busy_server_is_retried_with_each_retry_logged(tiny_assets, student_dir, stand_in, tmp_path, caplog):
    engine = built(served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url, retries=3))
    batch = engine.data.train_batch(0, 2)
    expected = engine.teacher.outputs(batch, kdistill.Needs()).sparse
    stand_in.fail = 2
    with caplog.at_level(logging.WARNING, logger="kdistill"):
        got = engine.teacher.outputs(batch, kdistill.Needs()).sparse
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.logprobs, expected.logprobs)
    retries = [r.getMessage() for r in caplog.records if "did not answer" in r.getMessage()]
    assert retries == [f"teacher: {stand_in.url} did not answer (HTTP 503: busy); try 1 of 3 in 0.0 s",
                       f"teacher: {stand_in.url} did not answer (HTTP 503: busy); try 2 of 3 in 0.0 s"]


def test_an_answer_cut_off_in_transit_is_asked_for_again(tiny_assets, student_dir, stand_in, tmp_path):
    engine = built(served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url))
    batch = engine.data.train_batch(0, 2)
    expected = engine.teacher.outputs(batch, kdistill.Needs()).sparse
    cuts = []

    def cut_once(answer):
        if cuts:
            return answer
        cuts.append(1)
        return ("cut", json.dumps(answer).encode()[:5000])

    stand_in.mangle = cut_once
    got = engine.teacher.outputs(batch, kdistill.Needs()).sparse
    assert cuts == [1] and torch.equal(got.ids, expected.ids) and torch.equal(got.logprobs, expected.logprobs)


def test_requests_go_to_every_url_in_turn(tiny_assets, student_dir, stand_in, tmp_path):
    other = Stand_in(tiny_assets["teacher"])
    try:
        engine = built(served_recipe(tiny_assets, student_dir, tmp_path, [stand_in.url, other.url], sequences_per_request=1))
        before = stand_in.requests, other.requests
        engine.teacher.outputs(engine.data.train_batch(0, 4), kdistill.Needs())
        assert (stand_in.requests - before[0], other.requests - before[1]) == (2, 2)
        other.fail = -1  # one server busy for good: its requests go to the other
        engine.teacher.outputs(engine.data.train_batch(1, 4), kdistill.Needs())
    finally:
        other.close()


def test_a_server_that_dies_mid_run_stops_it_naming_the_url_and_the_run_resumes_exactly(tiny_assets, student_dir, stand_in, tmp_path):
    raw = served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url, retries=2)
    raw["train"].update(steps=5, save_every=1, keep_checkpoints=5)
    whole = json.loads(json.dumps(raw))
    whole["output_dir"] = str(tmp_path / "whole")
    kdistill.run(whole)
    calls = {"n": 0}

    def dies_after_three_steps(answer):
        calls["n"] += 1
        if calls["n"] == 4:  # the start's probe, then one request a step (4 rows): fails from step 4 on
            stand_in.fail = -1
        return answer

    stand_in.mangle = dies_after_three_steps
    with pytest.raises(KdistillError) as err:
        kdistill.run(raw)
    assert str(err.value) == (f"teacher.options.urls: {stand_in.url} did not answer (HTTP 503: busy) after 3 tries; "
                              "training stopped, the checkpoints written so far are kept")
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert saved == ["step-00000001", "step-00000002", "step-00000003"]
    stand_in.fail, stand_in.mangle = 0, None  # the server is back
    kdistill.run(raw, resume=True)
    a = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(torch.equal(a[key], b[key]) for key in a)


def drop_last_position(answer):
    answer["choices"][0]["prompt_logprobs"].pop()
    return answer


def above_zero(answer):
    entry = answer["choices"][0]["prompt_logprobs"][2]
    next(iter(entry.values()))["logprob"] = 0.5
    return answer


@pytest.mark.parametrize("mangle, what", [
    (drop_last_position, " returned a malformed response (32 prompt log-probabilities for a prompt of 33 tokens); "),
    (lambda answer: {"choices": answer["choices"][:1]}, " returned a malformed response (1 choices for 2 prompts); "),
    (above_zero, " returned a malformed response (position 1: a log-probability above 0); "),
    (lambda answer: b'{"choices": [{"index": 0, "prompt_logpr', "/v1/completions answered with something that is not "
                                                              "JSON (39 bytes); "),
])
def test_a_malformed_or_truncated_answer_is_an_error_never_used(tiny_assets, student_dir, stand_in, tmp_path, mangle, what):
    engine = built(served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url))
    stand_in.mangle = mangle
    with pytest.raises(KdistillError) as err:
        engine.teacher.outputs(engine.data.train_batch(0, 2), kdistill.Needs())
    assert str(err.value) == f"teacher.options.urls: {stand_in.url}{what}no step trains on it"


def test_an_answer_for_other_tokens_is_refused(tiny_assets, student_dir, stand_in, tmp_path):
    engine = built(served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url))
    batch = engine.data.train_batch(0, 1)
    actual = int(batch.input_ids[0, 3])

    def shifted(answer):  # position 2's answer scores other tokens than the one there
        entries = answer["choices"][0]["prompt_logprobs"]
        spare = next(str(i) for i in range(1000) if str(i) not in entries[3])
        entries[3] = {spare if int(token) == actual else token: value for token, value in entries[3].items()}
        return answer

    stand_in.mangle = shifted
    with pytest.raises(KdistillError) as err:
        engine.teacher.outputs(batch, kdistill.Needs())
    assert str(err.value) == (f"teacher.options.urls: {stand_in.url} returned a malformed response (position 2: token "
                              f"{actual}, the one there, is not scored: the response is for other tokens); no step trains on it")


def test_the_api_key_is_sent_and_never_written(tiny_assets, student_dir, tmp_path, monkeypatch):
    secret = "sk-test-3f9a1c0e7b"
    server = Stand_in(tiny_assets["teacher"], key=secret)
    monkeypatch.setenv("KDISTILL_TEST_KEY", secret)
    try:
        raw = served_recipe(tiny_assets, student_dir, tmp_path, server.url, api_key_env="KDISTILL_TEST_KEY")
        raw["train"]["steps"] = 2
        kdistill.run(raw)
    finally:
        server.close()
    assert any(h.get("Authorization") == f"Bearer {secret}" for h in server.headers)
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert written and not any(secret.encode() in p.read_bytes() for p in written)


# --------------------------------------------------------------------------- the cache


def test_cache_teacher_from_a_served_teacher_equals_one_from_the_in_process_teacher(tiny_assets, student_dir, stand_in, tmp_path):
    from conftest import cli_result, write_recipe
    from kdistill.plugins.teachers.cache_store import TeacherCache

    def cache_recipe(name: str, teacher_options: dict) -> dict:
        raw = served_recipe(tiny_assets, student_dir, tmp_path, stand_in.url, temperature=2.0)
        raw["teacher"] = {"name": "cached", "options": {"path": str(tmp_path / name), "k": 8, "temperature": 2.0,
                                                        "shard_sequences": 8, **teacher_options}}
        raw["data"]["options"]["max_train_blocks"] = 12
        raw["output_dir"] = str(tmp_path / f"run-{name}")
        return raw

    remote = cache_recipe("served-cache", {"served": {"urls": [stand_in.url], "model": MODEL, "k": 99}})
    local = cache_recipe("local-cache", {"source": {"model": tiny_assets["teacher"]}})
    for raw in (remote, local):
        code, stdout, stderr = cli_result("cache-teacher", write_recipe(tmp_path / f"{Path(raw['output_dir']).name}.yaml", raw))
        assert code == 0, stderr
        assert "teacher cache: 12 sequences" in stdout
    a, b = TeacherCache(tmp_path / "served-cache"), TeacherCache(tmp_path / "local-cache")
    keys = torch.tensor(sorted(a))
    assert keys.tolist() == sorted(b) and len(keys) == 12
    x, y = a.lookup(keys), b.lookup(keys)
    assert torch.equal(x.ids, y.ids)  # the served request used the cache's k (8), not the served options' 99
    assert torch.allclose(x.logprobs, y.logprobs, atol=0.05) and torch.allclose(x.log_tail, y.log_tail, atol=0.05)
    assert a.manifest["teacher"] == {"provider": "vllm", "model": MODEL}
    stand_in.fail = -1  # training from the cache needs no server
    kdistill.run(remote)
    trained = step_losses(Path(remote["output_dir"]))
    assert sorted(trained) == [1, 2, 3, 4] and all(math.isfinite(v) for v in trained.values())
