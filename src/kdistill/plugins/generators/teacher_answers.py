"""Teacher-written answers: the teacher answers every prompt of a dataset (sequence-level distillation's data).

Layout of the output folder (read by the conversations data source, or any `read_table`):

    generation.json             what the answers were written from and how, and the shards written so far
    shard-00000.parquet, ...    one per `shard_prompts` prompts: prompt, completion, prompt_index, sample,
                                completion_tokens; with `top_k`, also completion_ids (the tokens generated,
                                the stop token included when one ended the answer) and, for each of them,
                                the teacher's top-k log-probabilities in the teacher cache's encoding
                                (cache_store.ENCODING), flat per answer: top_k_ids and top_k_q (len x k,
                                row-major), top_k_hi, top_k_lo, top_k_log_tail (len)

Shards are written to a temporary name, fsynced and renamed, and the manifest is rewritten (atomically)
after each one: a write killed at any point resumes at the first shard that is missing or whose sha256
differs. Each generate batch is seeded from (seed, its first prompt's index, sample), never from global
random state, and batches start at fixed places inside a shard, so a resumed write gives shards
byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pydantic
import torch
from pydantic import Field

import kdistill
from kdistill import ConfigError, resolve_path
from kdistill.plugins.teachers.cache_store import ENCODING, encode_top_k, file_digest, ids_dtype, vocab_digest, weights_digest
from kdistill.toolkit import (
    GENERATION_MANIFEST,
    ROLES,
    check_chat_template,
    prompt_ids,
    read_table,
    sample_completions,
    sample_completions_with_logits,
    stop_ids,
)

FORMAT = 1
FIELD = "generator.options"
# manifest fields a rerun must agree on to keep what was written; (section, key) pairs that may differ
IDENTITY = ("format", "teacher", "sampling", "layout", "prompts", "n_prompts", "top_k")
MAY_DIFFER = {("teacher", "model"), ("prompts", "paths")}  # a model or data moved keeps its answers
TOP_K = ("top_k_ids", "top_k_q", "top_k_hi", "top_k_lo", "top_k_log_tail")  # the stored columns, as ENCODING's


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def batch_seed(seed: int, first_index: int, sample: int) -> int:
    """The seed of one generate call: a function of what it answers only, so a resume draws the same."""
    digest = hashlib.sha256(f"{seed}/{first_index}/{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class TeacherAnswers(kdistill.Generator):
    """The recipe's teacher answers every prompt of a table (greedy, or sampled several times), written as
    Parquet shards that the conversations data source reads (`kdistill generate RECIPE`, resumable)."""

    name = "teacher-answers"

    class Options(kdistill.Options):
        prompts: list[kdistill.LocalPattern] = Field(min_length=1, description="files (JSON Lines, JSON, Parquet, CSV, "
                                                     "Arrow) or one save_to_disk folder holding the prompts")
        split: str | None = Field(None, description="the split of a save_to_disk folder with several")
        column: str = Field("question", description="the prompt column: a string (one user message) or a list of "
                            "{role, content} messages")
        first: int = Field(0, ge=0, description="the first row used (keeps training prompts apart from held-out ones)")
        count: int | None = Field(None, ge=1, description="rows used from `first` on (default: to the end)")
        output: str = Field(min_length=1, description="the folder written (created; a data source reads it)")
        temperature: float = Field(0.0, ge=0, description="sampling temperature; 0 is greedy decoding")
        top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling's probability mass (temperature > 0)")
        repetition_penalty: float = Field(1.0, ge=1.0, description="divides the logits of tokens already in the answer "
                                          "(transformers' repetition_penalty; 1: none); 1.1-1.3 keeps a small teacher "
                                          "decoded greedily out of loops")
        max_new_tokens: int = Field(256, ge=1, description="the longest answer, in tokens")
        answers_per_prompt: int = Field(1, ge=1, description="answers sampled per prompt (more than 1 needs temperature > 0)")
        seed: int = Field(0, description="sampling seed; each batch is seeded from it and its prompts' place")
        batch_size: int = Field(16, ge=1, description="prompts per generate call")
        shard_prompts: int = Field(64, ge=1, description="prompts per shard file (the unit a resumed write keeps)")
        top_k: int | None = Field(None, ge=1, description="also store the teacher's k largest log-probabilities at "
                                  "every generated token, in the teacher cache's encoding, so that training on the "
                                  "answers needs no teacher forward (teacher answers-top-k); none: not stored")
        top_k_temperature: float = Field(1.0, gt=0, description="the temperature T of those log-probabilities "
                                         "(softmax of the raw logits / T, whatever the sampling temperature); losses "
                                         "trained on them use the same T")

        @pydantic.model_validator(mode="after")
        def _samples_differ(self) -> "TeacherAnswers.Options":
            if self.answers_per_prompt > 1 and self.temperature == 0:
                raise ValueError("answers_per_prompt > 1 needs temperature > 0 (greedy answers are all the same)")
            if self.top_k is None and self.top_k_temperature != 1.0:
                raise ValueError("top_k_temperature needs top_k (no log-probabilities are stored without it)")
            return self

    def __init__(self, options: Options | None = None):
        super().__init__(options)
        self._rows: list[tuple[int, Any]] | None = None

    @property
    def folder(self) -> Path:
        return Path(self.options.output).expanduser()

    def outputs(self) -> list[str]:
        return [self.options.output]

    # ------------------------------------------------------------------------------ what is asked

    def rows(self) -> list[tuple[int, Any]]:
        """(row number in the source table, prompt) of every prompt answered, read once."""
        if self._rows is None:
            o = self.options
            table = read_table(o.prompts, f"{FIELD}.prompts", split=o.split)
            if o.column not in table.column_names:
                raise ConfigError(f"{FIELD}.column: {', '.join(o.prompts)} has no column '{o.column}' (it has: "
                                  f"{', '.join(table.column_names)})")
            if o.first >= len(table):
                raise ConfigError(f"{FIELD}.first: {o.first} is past the last row of {', '.join(o.prompts)} ({len(table)} rows)")
            stop = len(table) if o.count is None else min(len(table), o.first + o.count)
            values = table.select(range(o.first, stop))[o.column]
            self._rows = [(o.first + i, _prompt(value, o.first + i)) for i, value in enumerate(values)]
        return self._rows

    def identity(self, teacher: kdistill.TeacherProvider) -> dict[str, Any]:
        o, rows = self.options, self.rows()
        texts = json.dumps([[index, prompt] for index, prompt in rows], ensure_ascii=False, sort_keys=True)
        return {"format": FORMAT, "teacher": teacher_identity(teacher),
                "sampling": {"temperature": o.temperature, "top_p": o.top_p, "max_new_tokens": o.max_new_tokens,
                             "answers_per_prompt": o.answers_per_prompt, "seed": o.seed,
                             # recorded when used, so that folders written before the option existed stay valid
                             **({"repetition_penalty": o.repetition_penalty} if o.repetition_penalty != 1.0 else {})},
                "layout": {"batch_size": o.batch_size, "shard_prompts": o.shard_prompts},
                "prompts": {"paths": list(o.prompts), "split": o.split, "column": o.column, "first": o.first,
                            "count": o.count, "digest": hashlib.sha256(texts.encode()).hexdigest()[:32]},
                "n_prompts": len(rows),
                "top_k": None if o.top_k is None else {"k": o.top_k, "temperature": o.top_k_temperature,
                                                       "encoding": ENCODING}}

    # ------------------------------------------------------------------------------ what is there

    def _old(self, identity: dict[str, Any], overwrite: bool) -> dict[str, Any] | None:
        """The manifest already in the folder when it is of these answers (None: nothing usable there)."""
        path = self.folder / GENERATION_MANIFEST
        if not path.is_file():
            if self.folder.is_dir() and any(not p.name.startswith(".tmp-") for p in self.folder.iterdir()):
                raise ConfigError(f"{FIELD}.output: {self.folder} holds other files and no {GENERATION_MANIFEST}; "
                                  "give a new or empty folder")
            return None
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        differ = differences(old if isinstance(old, dict) else {}, identity)
        if not differ:
            return old
        if not overwrite:
            raise ConfigError(f"{FIELD}.output: {self.folder} holds answers of something else: {'; '.join(differ)}; "
                              "pass --overwrite to replace them")
        return None

    def _kept(self, old: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """Shards of `old` whose file is there with its recorded hash."""
        records = old.get("shards") if old else None
        kept = {}
        for record in records if isinstance(records, list) else []:
            if isinstance(record, dict) and isinstance(record.get("name"), str):
                path = self.folder / record["name"]
                if path.is_file() and file_digest(path) == record.get("sha256"):
                    kept[record["name"]] = record
        return kept

    def _shards(self) -> list[list[tuple[int, Any]]]:
        rows, size = self.rows(), self.options.shard_prompts
        return [rows[i:i + size] for i in range(0, len(rows), size)]

    def _kept_shards(self, old: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """Shards of `old` whose file is there with its recorded hash. Every shard there but the folder not
        marked complete (only a hand-edited manifest: the last shard and `complete` are saved in one write):
        the last is redone, so that there is something to write."""
        kept = self._kept(old)
        n = len(self._shards())
        if old is not None and old.get("complete") is not True and len(kept) == n:
            kept.pop(shard_name(n - 1))
        return kept

    def pending(self, teacher: kdistill.TeacherProvider, overwrite: bool = False) -> int:
        kept = self._kept_shards(self._old(self.identity(teacher), overwrite))
        left = sum(len(shard) for i, shard in enumerate(self._shards()) if shard_name(i) not in kept)
        if left and teacher.model is None and not getattr(teacher, "runs_forward", True) \
                and not getattr(teacher.options, "load_source", False):
            raise ConfigError(f"teacher.options.load_source: {left} prompts still need answers, which the live teacher "
                              f"writes; teacher '{teacher.name}' loads its source's weights only with load_source: true")
        return left

    # ------------------------------------------------------------------------------ writing

    def generate(self, teacher: kdistill.TeacherProvider, progress: bool = True, overwrite: bool = False) -> dict[str, Any]:
        o, tokenizer = self.options, teacher.tokenizer
        check_chat_template(tokenizer, "generator")
        vocab = int(teacher.model.get_output_embeddings().weight.shape[0])
        if o.top_k is not None and o.top_k > vocab:
            raise ConfigError(f"{FIELD}.top_k: {o.top_k} is more than the teacher's {vocab} tokens")
        identity = self.identity(teacher)
        old = self._old(identity, overwrite)
        if old is None and (self.folder / GENERATION_MANIFEST).exists():  # --overwrite: only our own files go
            for path in self.folder.glob("shard-*.parquet"):
                path.unlink()
        kept = self._kept_shards(old)
        self.folder.mkdir(parents=True, exist_ok=True)
        shards = self._shards()
        previous = float(old.get("seconds", 0.0)) if old else 0.0
        manifest: dict[str, Any] = {**identity, "complete": False, "shards": [], "tokens": 0, "seconds": previous}
        if o.top_k is not None:  # what the stored ids mean (the weights digest already decides the teacher)
            manifest["vocabulary"] = {"size": vocab, "ids_dtype": str(ids_dtype(vocab)).replace("torch.", ""),
                                      "tokenizer": vocab_digest(tokenizer)}

        def save(records: dict[str, dict[str, Any]], seconds: float, complete: bool = False) -> None:
            ordered = [records[name] for name in sorted(records)]
            manifest.update(shards=ordered, complete=complete, tokens=sum(r["tokens"] for r in ordered),
                            answers=sum(r["rows"] for r in ordered), seconds=round(previous + seconds, 3))
            _write_json(self.folder / GENERATION_MANIFEST, manifest)

        records = dict(kept)
        save(records, 0.0)
        done = sum(len(s) for i, s in enumerate(shards) if shard_name(i) in kept)
        bar = _progress(progress, len(self.rows()), done)
        began, tokens = time.perf_counter(), 0
        for index, shard in enumerate(shards):
            name = shard_name(index)
            if name in kept:
                continue
            columns: dict[str, list[Any]] = {name: [] for name in _schema(o.top_k is not None, vocab).names}
            for start in range(0, len(shard), o.batch_size):
                batch = shard[start:start + o.batch_size]
                ids = [prompt_ids(tokenizer, prompt, f"{FIELD}.prompts") for _, prompt in batch]
                answers = [self._answer(teacher, ids, batch_seed(o.seed, batch[0][0], sample), vocab)
                           for sample in range(o.answers_per_prompt)]
                for row, (prompt_index, prompt) in enumerate(batch):
                    for sample in range(o.answers_per_prompt):
                        answer, stored = answers[sample][row]
                        columns["prompt"].append(prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False))
                        columns["completion"].append(tokenizer.decode(answer, skip_special_tokens=True))
                        columns["prompt_index"].append(prompt_index)
                        columns["sample"].append(sample)
                        columns["completion_tokens"].append(len(answer))
                        for column, value in stored.items():
                            columns[column].append(value)
                        tokens += len(answer)
                bar.update(len(batch))
                bar.set_postfix_str(f"{tokens / max(time.perf_counter() - began, 1e-9):.0f} tokens/s")
            records[name] = {"name": name, **_write_shard(self.folder, name, columns, _schema(o.top_k is not None, vocab))}
            # a resumed write keeps this shard; the last one and `complete` are saved together
            save(records, time.perf_counter() - began, complete=len(records) == len(shards))
        bar.close()
        save(records, time.perf_counter() - began, complete=True)
        return manifest

    def _answer(self, teacher: kdistill.TeacherProvider, prompts: list[list[int]], seed: int,
                vocab: int) -> list[tuple[list[int], dict[str, Any]]]:
        """Each prompt's answer (without its stop token) and, with top_k, the columns stored beside it:
        completion_ids (the stop token included when one ended the answer) and the top-k of each of them."""
        o = self.options
        sampling = {"max_new_tokens": o.max_new_tokens, "temperature": o.temperature, "top_p": o.top_p, "seed": seed,
                    "repetition_penalty": o.repetition_penalty}
        if o.top_k is None:
            return [(answer, {}) for answer in sample_completions(teacher.model, teacher.tokenizer, prompts, **sampling)]
        answers, logits = sample_completions_with_logits(teacher.model, teacher.tokenizer, prompts, **sampling)
        # step by step (no copy of every step's logits at once); [prompts, steps, ...] once small
        steps = [encode_top_k(step, o.top_k, o.top_k_temperature, vocab)[0] for step in logits]
        del logits
        encoded = {key: torch.stack([step[key] for step in steps], dim=1).cpu() for key in steps[0]}
        stops, out = stop_ids(teacher.tokenizer), []
        for row, ids in enumerate(answers):
            stored: dict[str, Any] = {"completion_ids": ids}
            for column, key in zip(TOP_K, ("ids", "q", "hi", "lo", "log_tail")):
                stored[column] = encoded[key][row, :len(ids)].reshape(-1).numpy()
            out.append((ids[:-1] if ids and ids[-1] in stops else ids, stored))
        return out

    def describe(self, manifest: dict[str, Any]) -> str:
        seconds = manifest.get("seconds") or 0.0
        rate = f"{manifest['tokens'] / seconds:.1f} tokens/s" if seconds else "no time measured"
        return (f"teacher answers: {manifest['n_prompts']} prompts, {manifest['answers']} answers, {manifest['tokens']} "
                f"tokens, {rate} ({self.options.output})")


def _prompt(value: Any, row: int) -> str | list[dict[str, str]]:
    """A prompt as the table holds it: a string, or a list of {role, content} messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) and m.get("role") in ROLES
                                                 and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ConfigError(f"{FIELD}.column: row {row} holds {type(value).__name__} {str(value)[:60]!r}, not a string or a "
                      f"list of {{role, content}} messages (roles: {', '.join(ROLES)})")


def teacher_identity(teacher: kdistill.TeacherProvider) -> dict[str, Any]:
    """The teacher the answers come from: its model's path and a digest of its weights (the digest decides). A
    provider that runs no forward (it serves targets stored ahead of time: cached, answers-top-k) writes with the
    live teacher it names as its `source` (hf options), so that one is meant."""
    provider, settings, field = teacher.name, teacher.options, "teacher.options.model"
    if not getattr(teacher, "runs_forward", True):
        settings = getattr(teacher.options, "source", None)
        if settings is None:
            raise ConfigError(f"teacher.options.source: the generator's answers are the live teacher's; teacher "
                              f"'{teacher.name}' runs none, so name it there ({{model: ...}}, as for the hf teacher)")
        provider, field = "hf", "teacher.options.source.model"
    options = settings.model_dump(mode="json", exclude={"trust_remote_code"})
    model = options.get("model")
    if isinstance(model, str):
        options["weights"] = weights_digest(resolve_path(model, field), options.get("gguf_file"), field)
    return {"provider": provider, **options}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a folder's manifest and these answers, as `section.key (folder X, now Y)`."""
    out = []
    for section in IDENTITY:
        a, b = old.get(section), new.get(section)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{section}.{key} (folder {a.get(key)!r}, now {b.get(key)!r})" for key in sorted(set(a) | set(b))
                    if a.get(key) != b.get(key) and (section, key) not in MAY_DIFFER]
        elif a != b:
            out.append(f"{section} (folder {_short(a)}, now {_short(b)})")
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _fsync(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text(json.dumps(value, indent=1))
    _fsync(tmp)
    os.replace(tmp, path)


def _schema(top_k: bool, vocab: int):
    """The shard's columns: the answers, and with top_k the generated ids and their stored top-k."""
    import pyarrow as pa

    fields = [("prompt", pa.string()), ("completion", pa.string()), ("prompt_index", pa.int64()), ("sample", pa.int32()),
              ("completion_tokens", pa.int32())]
    if top_k:
        ids = {1: pa.uint8(), 2: pa.uint16(), 4: pa.int32()}[ids_dtype(vocab).itemsize]
        fields += [("completion_ids", pa.list_(pa.int32())), ("top_k_ids", pa.list_(ids)), ("top_k_q", pa.list_(pa.uint8())),
                   ("top_k_hi", pa.list_(pa.float16())), ("top_k_lo", pa.list_(pa.float16())),
                   ("top_k_log_tail", pa.list_(pa.float16()))]
    return pa.schema(fields)


def _write_shard(folder: Path, name: str, columns: dict[str, list[Any]], schema) -> dict[str, Any]:
    """One shard, atomically; its record for the manifest (rows, tokens, sha256)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = folder / f".tmp-{name}"
    pq.write_table(pa.table(columns, schema=schema), tmp)
    _fsync(tmp)
    record = {"rows": len(columns["prompt"]), "tokens": sum(columns["completion_tokens"]), "sha256": file_digest(tmp)}
    os.replace(tmp, folder / name)
    return record


def _progress(enabled: bool, total: int, done: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="the teacher answers", unit="prompt", disable=not enabled)


@kdistill.hookimpl
def kd_register_generators():
    return [TeacherAnswers]

