"""A teacher served from what `kdistill generate` stored with its answers (generator option `top_k`): the
teacher's top-k log-probabilities at every token it generated, so training on the answers runs no teacher.

The data source is `conversations` over that folder: it takes each answer's `completion_ids` as they are and
says where they sit in a batch (`Conversations.answer_spans`); the targets stored for the answer's token j go
to the position whose label is that token. Every counted position must have one: the prompts (`loss_on: all`)
and the chat template's text after the answer are not what the teacher generated, so they have none, and a
run that would count them is refused before training (the data source does not count the template's text
after an answer taken as ids).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

import kdistill
from kdistill import IGNORE_INDEX, ConfigError, KdistillError, resolve_path
from kdistill.plugins.generators.teacher_answers import TOP_K
from kdistill.plugins.teachers.cache_store import ENCODING, check_top_k_losses, decode_top_k, vocab_digest, weights_digest
from kdistill.plugins.teachers.cached import SourceOptions, teacher_present
from kdistill.plugins.teachers.hf import HFTeacher
from kdistill.toolkit import GENERATION_MANIFEST, load_tokenizer, read_table

IDS = "completion_ids"
NAME = "answers-top-k"
CHECK_UNITS = 256  # training units whose positions prepare() checks at a time


class AnswersTopK(kdistill.TeacherProvider):
    """The top-k log-probabilities stored with the teacher's answers (`kdistill generate` with
    generator.options.top_k), read by the batch's keys through the conversations data source; no teacher
    forward, no teacher weights unless `load_source`."""

    name = NAME
    runs_forward = False  # the engine counts no teacher FLOPs per step
    scores_new_text = False  # only the answers it wrote have targets (not, say, the student's own answers)

    class Options(kdistill.Options):
        source: SourceOptions | None = Field(None, description="the live teacher that wrote the answers (hf options): "
                                             "the one a generator section writes with; checked against the folder's "
                                             "weights digest and its tokenizer loaded when its files are here")
        load_source: bool = Field(False, description="also load the source's weights (for a from_teacher student, teacher "
                                  "metrics, or a generator that still has answers to write); never run in a training step")

    def load(self, device: torch.device) -> None:
        self.device, self.model, self.tokenizer = device, None, None
        source = self.options.source
        if self.options.load_source:
            if source is None:
                raise ConfigError("teacher.options.load_source: needs teacher.options.source")
            if not teacher_present(source):
                raise ConfigError(f"teacher.options.source.model: no such file or folder: {source.model} "
                                  "(teacher.options.load_source needs it)")
            live = HFTeacher(source)
            live.load(device)
            self.model, self.tokenizer = live.model, live.tokenizer
        elif source is not None and teacher_present(source):
            self.tokenizer = load_tokenizer(source.model, "teacher.options.source.model", gguf_file=source.gguf_file,
                                            trust_remote_code=source.trust_remote_code)

    # ------------------------------------------------------------------------------ fit to the run

    def prepare(self, data, tokenizer, losses) -> None:
        folder = self._folder(data)
        manifest = json.loads((folder / GENERATION_MANIFEST).read_text())
        top_k = manifest.get("top_k")
        if not isinstance(top_k, dict):
            raise ConfigError(f"data.options.paths: {folder} holds answers without the teacher's top-k log-probabilities; "
                              "write them with generator.options.top_k (kdistill generate RECIPE --overwrite)")
        if top_k.get("encoding") != ENCODING:
            raise ConfigError(f"data.options.paths: {folder} stores its top-k as {top_k.get('encoding')!r}, not {ENCODING!r}; "
                              "write the answers again (kdistill generate RECIPE --overwrite)")
        self.k, self.temperature = int(top_k["k"]), float(top_k["temperature"])
        if not data.options.chat_template:
            raise ConfigError("data.options.chat_template: the stored top-k are the teacher's in its chat template; the "
                              f"{NAME} teacher needs chat_template: true")
        if vocab_digest(tokenizer) != (manifest.get("vocabulary") or {}).get("tokenizer"):
            raise ConfigError(f"student.tokenizer: the student's vocabulary is not that of the teacher that wrote {folder}, "
                              "so the stored token ids would name other tokens")
        source = self.options.source
        if source is not None and teacher_present(source):
            weights = weights_digest(resolve_path(source.model, "teacher.options.source.model"), source.gguf_file)
            if weights != (manifest.get("teacher") or {}).get("weights"):
                raise ConfigError(f"teacher.options.source.model: the teacher at {source.model} has other weights than "
                                  f"the one that wrote the answers in {folder}")
        check_top_k_losses(losses, self.temperature, teacher=f"the {NAME} teacher", targets="the stored top-k",
                           at="the stored top-k are at", field="generator.options.top_k_temperature")
        self.data = data
        table = read_table([str(folder)], "data.options.paths")
        self.answers = table.select_columns([IDS]).with_format("numpy")  # what prepare() checks: no top-k read
        self.table = table.select_columns([IDS, *TOP_K]).with_format("numpy")
        self._check_positions(data)

    def _folder(self, data) -> Path:
        if data.name != "conversations":
            raise ConfigError(f"data: the {NAME} teacher reads the answers' stored top-k through the conversations data "
                              f"source, not '{data.name}'")
        if data.options.streaming:
            raise ConfigError(f"data.options.streaming: the {NAME} teacher finds a batch's answers by its keys, which a "
                              "streamed source does not give; use streaming: false")
        paths = list(data.options.paths)
        folder = resolve_path(paths[0], "data.options.paths[0]") if len(paths) == 1 else None
        if folder is None or not (folder / GENERATION_MANIFEST).is_file():
            raise ConfigError(f"data.options.paths: the {NAME} teacher needs one folder written by kdistill generate "
                              f"with generator.options.top_k, not {', '.join(str(p) for p in paths)}")
        return folder

    def _check_positions(self, data) -> None:
        """Every position that counts toward the loss has a stored target, the one of the token it predicts (only
        completion_ids are read)."""
        keys = data.train_keys()
        for start in range(0, len(keys), CHECK_UNITS):
            chunk = keys[start:start + CHECK_UNITS]
            batch = data.batch_for_keys(chunk)
            try:
                self._targets(chunk, batch.labels, check_only=True)
            except _Uncovered as exc:
                if data.options.loss_on == "all":
                    raise ConfigError(f"data.options.loss_on: 'all' counts the prompts' tokens too, and only the tokens "
                                      f"the teacher generated have stored top-k; the {NAME} teacher needs loss_on: "
                                      "completion") from None
                raise ConfigError(f"data: {exc}") from None

    # ------------------------------------------------------------------------------ targets

    def _row(self, row: int, check_only: bool = False) -> dict[str, torch.Tensor]:
        """A table row's completion_ids and (unless check_only) the top-k stored for each of them."""
        stored = (self.answers if check_only else self.table)[row]
        n = len(stored[IDS])
        out = {"completion_ids": torch.from_numpy(stored[IDS].astype("int64"))}
        if not check_only:
            if len(stored["top_k_ids"]) != n * self.k or len(stored["top_k_hi"]) != n:
                raise KdistillError(f"teacher: {self.data.options.paths[0]} row {row} stores top-k for another number of "
                                    f"tokens than its {n} completion_ids; write the answers again")
            out["ids"] = torch.from_numpy(stored["top_k_ids"].astype("int64")).view(n, self.k)
            out["q"] = torch.from_numpy(stored["top_k_q"]).view(n, self.k)
            for key in ("hi", "lo", "log_tail"):
                out[key] = torch.from_numpy(stored[f"top_k_{key}"])
        return out

    def _targets(self, keys: torch.Tensor, labels: torch.Tensor, check_only: bool = False) -> kdistill.SparseTargets | None:
        """The stored targets of a batch (its keys and labels), at the positions of its answers' tokens; every
        position that counts must have one (else _Uncovered). `check_only`: only check that."""
        labels = labels.cpu()
        rows, width, k = labels.shape[0], labels.shape[1], 0 if check_only else self.k
        ids = torch.zeros(rows, width, k, dtype=torch.long)
        q = torch.zeros(rows, width, k, dtype=torch.uint8)
        hi, lo, tail = (torch.zeros(rows, width, dtype=torch.float16) for _ in range(3))
        filled = torch.zeros(rows, width, dtype=torch.bool)
        for b, (key, spans) in enumerate(zip(keys.tolist(), self.data.answer_spans(keys))):
            for row, at, n in spans:
                stored = self._row(row, check_only)
                counted = labels[b, at:at + n] != IGNORE_INDEX
                if (labels[b, at:at + n][counted] != stored["completion_ids"][:n][counted]).any():
                    raise KdistillError(f"teacher: the stored top-k of {self.data.options.paths[0]} row {row} do not line "
                                        f"up with the labels of training unit {key} (a data source fault)")
                filled[b, at:at + n] = True
                if not check_only:
                    ids[b, at:at + n], q[b, at:at + n] = stored["ids"][:n], stored["q"][:n]
                    hi[b, at:at + n], lo[b, at:at + n] = stored["hi"][:n], stored["lo"][:n]
                    tail[b, at:at + n] = stored["log_tail"][:n]
        missing = (labels != IGNORE_INDEX) & ~filled
        if missing.any():
            b, position = (int(i) for i in missing.nonzero()[0])
            raise _Uncovered(f"{int(missing.sum())} positions that count toward the loss have no stored top-k (the first: "
                             f"training unit {int(keys[b])}, position {position}); with the {NAME} teacher only the "
                             "tokens the teacher generated may count")
        return None if check_only else decode_top_k(ids, q, hi, lo, tail, self.temperature)

    def outputs(self, batch: kdistill.Batch, needs: kdistill.Needs) -> kdistill.ModelOutputs:
        if needs.hidden_layers or needs.attention_layers:
            raise ConfigError(f"the {NAME} teacher has no hidden states or attention maps")
        if batch.keys is None:
            raise KdistillError(f"data: the {NAME} teacher needs the batch's keys (the data source's training batches)")
        try:
            sparse = self._targets(batch.keys.cpu(), batch.labels)
        except _Uncovered as exc:
            raise KdistillError(f"data: {exc}") from None
        assert sparse is not None
        move: Any = lambda t: t.to(self.device)  # noqa: E731
        return kdistill.ModelOutputs(sparse=kdistill.SparseTargets(move(sparse.ids), move(sparse.logprobs),
                                                                   move(sparse.log_tail), sparse.temperature))


class _Uncovered(Exception):
    """A counted position without a stored target (worded by the caller)."""


@kdistill.hookimpl
def kd_register_teachers():
    return [AnswersTopK]
