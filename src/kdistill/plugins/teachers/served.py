"""A teacher served by vLLM (its OpenAI-compatible server) on other machines: the teacher can be any size.

For each row the provider sends token ids (never text, so teacher and student see the same tokens) to
`/v1/completions` with `max_tokens: 1` and `prompt_logprobs: k`, and turns the answer into the sparse
top-k targets the teacher cache uses (ids, log-probabilities, tail mass), plus the log-probability of each
actual next token (which vLLM returns with the top k) for the sampled-token loss.

vLLM's prompt log-probabilities are of the raw logits (temperature 1). At another temperature T they are
softened here: log p_T(i) = log p(i) / T - log Z_T over the top k, with the tail mass taken as spread evenly
over the tokens outside the top k (exact at T = 1; at T > 1 it puts a little too much mass in the tail, at
T < 1 too little).

With `prefetch` (the default) the engine hands the provider the batches it will ask for next (the step's
later micro-batches, and the next step's where the strategy trains on the data's own batches), and their
requests run in a background thread while the student trains.

Failures: a server that does not answer at the start is one line naming its URL within
`connect_timeout_s`; a request that fails mid-run (connection refused, timeout, HTTP 5xx or 429) is retried
with exponential backoff on the next URL in turn, each retry logged, and after `retries` tries the run stops
with a message naming the URL (the checkpoints written so far are kept); a response that is malformed, cut
short, or for other positions is an error at once, never used.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import logging
import math
import os
import time
import urllib.error
import urllib.request
from typing import Any

import pydantic
import torch
from pydantic import Field

import kdistill
from kdistill import IGNORE_INDEX, ConfigError, KdistillError
from kdistill.plugins.teachers.cache_store import check_top_k_losses

log = logging.getLogger("kdistill")

DETOKENIZE_CHUNK = 2048  # token ids per /detokenize request when the vocabularies are compared
RETRY_HTTP = {429, 500, 502, 503, 504}


class ServerError(Exception):
    """A request that may succeed if tried again (the server is down, busy or restarting)."""


class ServedTeacher(kdistill.TeacherProvider):
    """Top-k log-probabilities from a running vLLM server (`vllm serve MODEL --max-logprobs K`), asked for
    token ids; no teacher weights on the training machine."""

    name = "vllm"
    runs_forward = False  # the teacher's FLOPs are spent on the server
    scores_new_text = True  # it scores any ids it is sent: the student's own answers too

    class Options(kdistill.ConstantTemperatureOptions):  # T: applied here to the raw log-probabilities
        urls: list[str] = Field(min_length=1, description="base URLs of vLLM OpenAI-compatible servers "
                                "(http://HOST:PORT); several are used in turn")
        model: str = Field(description="the served model's name (vllm serve --served-model-name)")
        k: int = Field(64, ge=1, description="log-probabilities per position (at most the server's --max-logprobs)")
        sequences_per_request: int = Field(8, ge=1, description="rows sent in one request")
        max_concurrent: int = Field(4, ge=1, description="requests in flight at once")
        timeout_s: float = Field(120.0, gt=0, description="seconds one request may take")
        connect_timeout_s: float = Field(5.0, gt=0, description="seconds a server has to answer at the start")
        retries: int = Field(5, ge=0, description="tries after a failed request before the run stops")
        backoff_s: float = Field(1.0, ge=0, description="wait before the first retry; doubled at each further one")
        api_key_env: str | None = Field(None, description="environment variable holding the server's API key "
                                        "(sent as a bearer token; never logged or stored)")
        prefetch: bool = Field(True, description="ask for the targets of the step's later micro-batches, and of the next "
                               "step's where they are the data's own, while the student trains")

        @pydantic.field_validator("urls")
        @classmethod
        def _http(cls, urls: list[str]) -> list[str]:
            for url in urls:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"{url!r} is not an http:// or https:// URL")
            return [url.rstrip("/") for url in urls]

    # ------------------------------------------------------------------ start

    def load(self, device: torch.device) -> None:
        o = self.options
        self.device, self.model, self.tokenizer = device, None, None
        self._key = None
        if o.api_key_env is not None:
            self._key = os.environ.get(o.api_key_env)
            if not self._key:
                raise ConfigError(f"teacher.options.api_key_env: the environment variable {o.api_key_env} is not set")
        self._turn = 0
        self._vocab_size: int | None = None
        self.max_model_len: int | None = None
        for url in o.urls:
            try:
                models = self._request(url, "/v1/models", None, o.connect_timeout_s)
            except ServerError as exc:
                raise ConfigError(f"teacher.options.urls: no server answers at {url} ({exc})") from None
            served = {m.get("id"): m for m in models.get("data", []) if isinstance(m, dict)}
            if o.model not in served:
                raise ConfigError(f"teacher.options.model: {url} serves {', '.join(map(str, served)) or 'nothing'}, "
                                  f"not {o.model}")
            length = served[o.model].get("max_model_len")
            if isinstance(length, int):
                self.max_model_len = min(length, self.max_model_len or length)
            self._check_k(url)

    def _check_k(self, url: str) -> None:
        """A two-token request at k: the server refuses k above its --max-logprobs."""
        k = self.options.k
        try:
            self._request(url, "/v1/completions", self._body([[0, 0]]), self.options.connect_timeout_s)
        except ServerError as exc:
            raise ConfigError(f"teacher.options.urls: {url} did not answer a request ({exc})") from None
        except KdistillError as exc:
            if "logprobs" in str(exc):
                raise ConfigError(f"teacher.options.k: {url} does not return {k} log-probabilities per position "
                                  f"(start it with --max-logprobs {k} or more; it said: {exc})") from None
            raise

    def prepare(self, data, tokenizer, losses) -> None:
        check_top_k_losses(losses, self.options.temperature, teacher="a served teacher",
                           targets="the served teacher's targets", at="the served teacher's is",
                           field="teacher.options.temperature")
        self._vocab_size = len(tokenizer)
        if self.options.k > self._vocab_size:
            raise ConfigError(f"teacher.options.k: {self.options.k} is more than the vocabulary's {self._vocab_size} tokens")
        for url in self.options.urls:
            self._check_vocabulary(url, tokenizer)

    def _check_vocabulary(self, url: str, tokenizer) -> None:
        """The server's tokenizer must be the student's: every id decodes to the same text on both sides
        (compared in chunks through /detokenize; a differing chunk is narrowed down to the first id)."""
        def server(ids: list[int]) -> str | None:
            try:
                return self._request(url, "/detokenize", {"model": self.options.model, "tokens": ids},
                                     self.options.timeout_s).get("prompt")
            except KdistillError:
                return None  # an id the server's vocabulary does not have
            except ServerError as exc:
                raise ConfigError(f"teacher.options.urls: {url} did not answer /detokenize ({exc})") from None

        def local(ids: list[int]) -> str:
            return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

        size = self._vocab_size or len(tokenizer)
        for start in range(0, size, DETOKENIZE_CHUNK):
            ids = list(range(start, min(start + DETOKENIZE_CHUNK, size)))
            if server(ids) == local(ids):
                continue
            while len(ids) > 1:  # the first id whose text differs
                half = ids[:len(ids) // 2]
                ids = half if server(half) != local(half) else ids[len(half):]
            theirs = server(ids)
            raise ConfigError(f"teacher.options.urls: the tokenizer served at {url} is not the student's: token {ids[0]} "
                              f"is {theirs!r} there and {local(ids)!r} here" if theirs is not None else
                              f"teacher.options.urls: the tokenizer served at {url} is not the student's: it has no "
                              f"token {ids[0]} (the student's has {size})")

    # ------------------------------------------------------------------ requests

    def _body(self, prompts: list[list[int]]) -> dict[str, Any]:
        return {"model": self.options.model, "prompt": prompts, "max_tokens": 1, "temperature": 0.0,
                "prompt_logprobs": self.options.k}

    def _request(self, url: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        """One HTTP request; ServerError for what a retry may mend, KdistillError for a refusal."""
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url + path, data=data, headers=headers, method="POST" if data else "GET")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            said = _first_line(exc.read().decode(errors="replace")) or exc.reason
            if exc.code in RETRY_HTTP:
                raise ServerError(f"HTTP {exc.code}: {said}") from None
            raise KdistillError(f"teacher.options.urls: {url}{path} refused the request (HTTP {exc.code}: {said})") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, reset, cut off, timed out
            reason = getattr(exc, "reason", exc)
            raise ServerError(str(reason) or type(exc).__name__) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise KdistillError(f"teacher.options.urls: {url}{path} answered with something that is not JSON "
                                f"({len(raw)} bytes); no step trains on it") from None

    def _scored(self, prompts: list[list[int]]) -> list[list[tuple[torch.Tensor, torch.Tensor, float]]]:
        """For each of `prompts`, each position's (top-k ids, log-probabilities, the next token's log-probability);
        a failed request is retried on the next URL in turn."""
        o = self.options
        attempt = 0
        while True:
            url = o.urls[self._turn % len(o.urls)]
            self._turn += 1
            try:
                answer = self._request(url, "/v1/completions", self._body(prompts), o.timeout_s)
            except ServerError as exc:
                if attempt >= o.retries or getattr(self, "_stopping", False):
                    raise KdistillError(f"teacher.options.urls: {url} did not answer ({exc}) after {attempt + 1} tries; "
                                        "training stopped, the checkpoints written so far are kept") from None
                wait = o.backoff_s * 2 ** attempt
                attempt += 1
                log.warning("teacher: %s did not answer (%s); try %d of %d in %.1f s", url, exc, attempt, o.retries, wait)
                time.sleep(wait)
                continue
            return [[_top_k(entries[position + 1], prompt[position + 1], o.k, self._vocab_size, position, url)
                     for position in range(len(prompt) - 1)]
                    for prompt, entries in zip(prompts, _prompt_logprobs(answer, prompts, url))]

    # ------------------------------------------------------------------ targets

    def prefetch(self, batches: list[kdistill.Batch]) -> None:
        if not self.options.prefetch:
            return
        if not hasattr(self, "_ahead"):
            self._ahead: dict[str, concurrent.futures.Future] = {}
            self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kdistill-teacher")
        wanted = {_key(batch): batch for batch in batches}
        for key in list(self._ahead):  # a batch no longer coming (the run moved on)
            if key not in wanted:
                self._ahead.pop(key).cancel()
        for key, batch in wanted.items():
            if key not in self._ahead:
                self._ahead[key] = self._worker.submit(self._fetch, batch.to(torch.device("cpu")))

    def outputs(self, batch: kdistill.Batch, needs: kdistill.Needs) -> kdistill.ModelOutputs:
        if needs.hidden_layers or needs.attention_layers:
            raise ConfigError("a served teacher has no hidden states or attention maps")
        pending = getattr(self, "_ahead", {}).pop(_key(batch), None)
        try:
            sparse = pending.result() if pending is not None else self._fetch(batch.to(torch.device("cpu")))
        except Exception:
            self._stop_fetching()
            raise
        move = lambda x: x.to(batch.input_ids.device)  # noqa: E731
        return kdistill.ModelOutputs(sparse=kdistill.SparseTargets(
            move(sparse.ids), move(sparse.logprobs), move(sparse.log_tail), sparse.temperature, move(sparse.label_logprobs)))

    def _stop_fetching(self) -> None:
        """The run is stopping: batches fetched ahead are dropped, and one in flight gives up retrying, so that
        the process can end at once."""
        self._stopping = True
        for future in getattr(self, "_ahead", {}).values():
            future.cancel()

    def _fetch(self, batch: kdistill.Batch) -> kdistill.SparseTargets:
        """The batch's targets from the servers (on the CPU)."""
        if batch.position_ids is not None:
            raise ConfigError("data.options.layout: a served teacher scores each row as one sequence, so packed rows "
                              "would attend across examples there; use layout: pad")
        rows, width = batch.input_ids.shape
        lengths = batch.attention_mask.sum(-1).tolist() if batch.attention_mask is not None else [width] * rows
        sequences = []
        for row, n in enumerate(lengths):
            n = max(int(n), 1)  # a row with nothing in it is scored as its first token (and never counted)
            ids = batch.input_ids[row, :n].tolist()
            last = int(batch.labels[row, n - 1])
            # one token more, so that the server scores the row's last position too (its label, if counted)
            sequences.append(ids + [last if last != IGNORE_INDEX else ids[-1]])
        if self.max_model_len is not None and max(map(len, sequences)) > self.max_model_len:
            raise ConfigError(f"teacher.options.urls: rows of {max(map(len, sequences))} tokens are longer than the "
                              f"server's max_model_len {self.max_model_len} (start it with a larger --max-model-len)")
        groups = [sequences[i:i + self.options.sequences_per_request]
                  for i in range(0, rows, self.options.sequences_per_request)]
        with concurrent.futures.ThreadPoolExecutor(min(self.options.max_concurrent, len(groups))) as pool:
            scored = [entry for part in pool.map(self._scored, groups) for entry in part]
        return self._targets(sequences, scored, width)

    def _targets(self, sequences: list[list[int]], scored: list[list[tuple[torch.Tensor, torch.Tensor, float]]],
                 width: int) -> kdistill.SparseTargets:
        """Top-k ids and log-probabilities at T, tail mass and each next token's log-probability, [rows, width, ...];
        padding positions hold a one-token distribution (never counted)."""
        k, rows = self.options.k, len(sequences)
        ids = torch.arange(k).repeat(rows, width, 1)
        top = torch.full((rows, width, k), -math.inf, dtype=torch.float64)
        top[..., 0] = 0.0
        label = torch.zeros((rows, width), dtype=torch.float64)
        for row, positions in enumerate(scored):
            for position, (top_ids, top_lp, actual) in enumerate(positions):
                ids[row, position], top[row, position], label[row, position] = top_ids, top_lp, actual
        vocab = self._vocab_size or int(ids.max()) + 1
        covered = torch.logsumexp(top, -1)
        tail = torch.log(-torch.expm1(covered.clamp(max=-1e-12)))  # the mass outside the top k, from the values
        tail = torch.where(covered > -1e-9, torch.full_like(tail, -math.inf), tail)
        t = self.options.temperature
        if t != 1:
            spread = tail - math.log(max(vocab - k, 1))  # each tail token's log-probability, evenly spread
            tail_t = spread / t + math.log(max(vocab - k, 1))
            z = torch.logsumexp(torch.cat([top / t, tail_t.unsqueeze(-1)], -1), -1)
            top, tail = top / t - z.unsqueeze(-1), tail_t - z
        return kdistill.SparseTargets(ids, top.float(), tail.float(), t, label.float())


def _key(batch: kdistill.Batch) -> str:
    """What identifies a batch's targets: its ids, mask and labels (the last label is sent too)."""
    digest = hashlib.sha256()
    for part in (batch.input_ids, batch.attention_mask, batch.labels):
        if part is not None:
            digest.update(part.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _first_line(text: str) -> str:
    try:  # vLLM's errors are JSON: {"error": {"message": ...}} or {"message": ...}
        body = json.loads(text)
        text = str(body.get("error", body).get("message", text) if isinstance(body.get("error", body), dict) else body)
    except (ValueError, AttributeError):
        pass
    return text.strip().splitlines()[0][:300] if text.strip() else ""


def _prompt_logprobs(answer: dict[str, Any], prompts: list[list[int]], url: str) -> list[list[Any]]:
    """Each prompt's `prompt_logprobs` in the order sent, checked for shape."""
    bad = lambda what: KdistillError(f"teacher.options.urls: {url} returned a malformed response ({what}); "  # noqa: E731
                                     "no step trains on it")
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or len(choices) != len(prompts):
        raise bad(f"{len(choices) if isinstance(choices, list) else 'no'} choices for {len(prompts)} prompts")
    ordered: list[Any] = [None] * len(prompts)
    for choice in choices:
        index = choice.get("index") if isinstance(choice, dict) else None
        if not isinstance(index, int) or not 0 <= index < len(prompts) or ordered[index] is not None:
            raise bad(f"choice index {index!r}")
        entries = choice.get("prompt_logprobs")
        if not isinstance(entries, list) or len(entries) != len(prompts[index]):
            got = len(entries) if isinstance(entries, list) else "no"
            raise bad(f"{got} prompt log-probabilities for a prompt of {len(prompts[index])} tokens")
        ordered[index] = entries
    return ordered


def _top_k(entry: Any, actual: int, k: int, vocab: int | None, position: int,
           url: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(top-k ids, their log-probabilities high to low, the actual next token's log-probability) from one
    position's {token id: {logprob, rank, ...}}: the top k, plus the actual token where it is outside them."""
    def bad(what: str) -> KdistillError:
        return KdistillError(f"teacher.options.urls: {url} returned a malformed response (position {position}: {what}); "
                             "no step trains on it")

    if not isinstance(entry, dict) or not k <= len(entry) <= k + 1:
        raise bad(f"{len(entry) if isinstance(entry, dict) else 'no'} log-probabilities where {k} were asked for")
    try:
        pairs = {int(token): float(value["logprob"]) for token, value in entry.items()}
    except (TypeError, ValueError, KeyError):
        raise bad("entries that are not token ids with a logprob") from None
    if actual not in pairs:
        raise bad(f"token {actual}, the one there, is not scored: the response is for other tokens")
    if vocab is not None and not all(0 <= token < vocab for token in pairs):
        raise bad(f"a token id outside the vocabulary of {vocab}")
    if any(not lp <= 1e-4 for lp in pairs.values()):  # also NaN
        raise bad("a log-probability above 0")
    actual_lp = pairs[actual]
    if len(pairs) == k + 1:  # the actual token came on top of the k
        del pairs[actual]
    ranked = sorted(pairs.items(), key=lambda item: -item[1])
    return (torch.tensor([i for i, _ in ranked]), torch.tensor([min(lp, 0.0) for _, lp in ranked], dtype=torch.float64),
            min(actual_lp, 0.0))


@kdistill.hookimpl
def kd_register_teachers():
    return [ServedTeacher]
