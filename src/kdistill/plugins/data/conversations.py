"""Instruction and chat data through Hugging Face `datasets`: text, prompt + completion, or messages.

Examples are rendered with the student's tokenizer (its own chat template for conversations), so
teacher and student see the same token ids; which tokens count toward the loss is an option (the
answers only, by default). Examples are packed several to a row without attention across them, or
padded one per row in batches of similar length.

With `streaming`, rows are read as they are needed and never all held: the training order shuffles
within a buffer, validation rows are picked by a seeded hash of their row number, and a resumed run
re-reads the stream up to where it stopped (exact, at the cost of re-reading).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from typing import Any, Iterable, Iterator, Literal

import pydantic
import torch
from pydantic import Field

import kdistill
from kdistill import IGNORE_INDEX, ConfigError, resolve_path
from kdistill.plugins.teachers.cache_store import vocab_digest
from kdistill.toolkit import GENERATION_MANIFEST, ROLES, check_chat_template, read_table, stop_ids

log = logging.getLogger("kdistill")

# "prompt": a prompt alone, for a strategy that writes the answers itself (on-policy); nothing in it counts
FORMATS = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "messages": ("messages",), "prompt": ("prompt",)}
IDS = "completion_ids"  # a folder written by `kdistill generate` with top_k: the answer's exact token ids
BUCKET_BATCHES = 32  # padded layout: examples are sorted by length within windows of this many batches
RENDER_ROWS = 256  # streaming: rows tokenized together
SEEN_AHEAD = 16  # streaming: training examples read at setup (at least 2 must exist; they go into the fingerprint)


class Example:
    """One rendered example: token ids, which of them count toward the loss, and where completion_ids sit in
    them (start, length), when they were taken as they are."""

    __slots__ = ("ids", "counts", "row", "answer")

    def __init__(self, ids: list[int], counts: list[bool], row: int, answer: tuple[int, int] | None = None):
        self.ids, self.counts, self.row, self.answer = ids, counts, row, answer


class Conversations(kdistill.DataSource):
    """Local JSON Lines, JSON, Parquet, CSV or Arrow files, or a `save_to_disk` folder, read with
    `datasets`; rows are text, prompt + completion, or messages ({role, content}).

    Every batch is a pure function of (seed, batch index), so a resumed run sees the same data; rows
    have stable keys, so a teacher cache works on it.
    """

    name = "conversations"

    class Options(kdistill.Options):
        paths: list[kdistill.LocalPattern] = Field(min_length=1, description="files, glob patterns or one save_to_disk "
                                                   "folder (pkg://PACKAGE/PATH allowed); a folder written by "
                                                   "`kdistill generate` reads as its answers")
        split: str | None = Field(None, description="the split of a save_to_disk DatasetDict (default: train)")
        format: Literal["auto", "text", "prompt-completion", "messages", "prompt"] = Field(
            "auto", description="how rows read; auto: by the columns present (text, prompt + completion, or messages); "
            "prompt (named only): prompts alone, nothing counted, for a strategy that writes the answers (on-policy)")
        columns: dict[Literal["text", "prompt", "completion", "messages"], str] = Field(
            default_factory=dict, description="which column holds each field, e.g. {prompt: question, completion: answer}")
        chat_template: bool = Field(True, description="render prompt + completion as a user turn and an assistant turn "
                                    "with the tokenizer's chat template (messages always use it)")
        loss_on: Literal["completion", "all"] = Field("completion", description="which tokens count toward the loss: the "
                                                      "completion / assistant turns, or every token")
        seq_len: int = Field(512, ge=2, le=1 << 20, description="positions per row")
        too_long: Literal["truncate", "drop", "error"] = Field("truncate", description="an example longer than seq_len: "
                                                               "cut at seq_len, left out, or an error")
        layout: Literal["pack", "pad"] = Field("pack", description="pack: several examples per row, positions restarting "
                                               "and no attention across them; pad: one example per row, batches of "
                                               "similar length padded to their longest")
        first: int = Field(0, ge=0, description="skip the table's first rows (e.g. held out for an evaluator)")
        max_examples: int | None = Field(None, ge=2, description="use at most this many rows (after `first`)")
        val_fraction: float = Field(0.05, ge=0, lt=1)
        max_val_examples: int | None = Field(256, ge=1, description="the most validation examples (streaming: held-out "
                                             "rows past it are used for neither)")
        streaming: bool = Field(False, description="read rows as training needs them, for data larger than memory: "
                                "shuffled within a buffer, validation rows picked by a hash of their row number, no "
                                "keys (a teacher cache needs streaming: false)")
        shuffle_buffer: int = Field(4096, ge=1, description="streaming: examples the training order shuffles within")

        @pydantic.model_validator(mode="after")
        def _bounded_validation(self) -> "Conversations.Options":
            if self.streaming and self.val_fraction > 0 and self.max_val_examples is None:
                raise ValueError("streaming with val_fraction > 0 needs max_val_examples (validation is held in memory)")
            return self

    @classmethod
    def no_validation_split(cls, options):
        return "data.options.val_fraction: 0" if options.val_fraction == 0 else None

    # ------------------------------------------------------------------ reading and rendering

    def _where(self) -> str:
        paths = [str(p) for p in self.options.paths]
        return paths[0] if len(paths) == 1 else f"{paths[0]} (and {len(paths) - 1} more)"

    def _format(self, present: list[str]) -> tuple[str, dict[str, str]]:
        o = self.options
        mapping = {field: o.columns.get(field, field) for fields in FORMATS.values() for field in fields}
        fmt = o.format
        auto = {name: fields for name, fields in FORMATS.items() if name != "prompt"}  # prompts alone: named only
        named = [name for name, fields in auto.items() if o.columns and set(o.columns) <= set(fields)]
        if fmt == "auto" and len(named) == 1:  # the columns named say which format is meant
            fmt = named[0]
        if fmt == "auto":
            found = [name for name, fields in auto.items() if all(mapping[f] in present for f in fields)]
            if not found:
                raise ConfigError(f"data.options.format: {self._where()} has none of the columns messages, prompt + "
                                  f"completion, or text (it has: {', '.join(present)}); name them in data.options.columns "
                                  "(prompts alone: format: prompt)")
            fmt = found[0]
        for field in FORMATS[fmt]:
            if mapping[field] not in present:
                where = f"data.options.columns.{field}" if field in o.columns else "data.options.format"
                raise ConfigError(f"{where}: {self._where()} has no column '{mapping[field]}' (it has: {', '.join(present)})")
        return fmt, {field: mapping[field] for field in FORMATS[fmt]}

    def _text(self, row: int, field: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ConfigError(f"data: {self._where()} row {row}: {field} is {type(value).__name__}, not text")
        return value

    def _messages(self, row: int, field: str, value: Any) -> list[dict[str, str]]:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ConfigError(f"data: {self._where()} row {row}: {field} is text, not a list of messages") from None
        if not isinstance(value, list) or not value:
            raise ConfigError(f"data: {self._where()} row {row}: {field} is not a non-empty list of {{role, content}}")
        messages = []
        for j, message in enumerate(value):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ConfigError(f"data: {self._where()} row {row}: {field}[{j}] is not a {{role, content}} mapping")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise ConfigError(f"data: {self._where()} row {row}: {field}[{j}].role: unknown role {role!r} "
                                  f"(expected one of {', '.join(ROLES)})")
            if not isinstance(content, str):
                raise ConfigError(f"data: {self._where()} row {row}: {field}[{j}].content is {type(content).__name__}, not text")
            if role == "assistant" and not content.strip():
                raise ConfigError(f"data: {self._where()} row {row}: {field}[{j}].content: an empty assistant turn")
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise ConfigError(f"data: {self._where()} row {row}: {field} has no assistant turn to learn")
        return messages

    def _segments(self, tokenizer, fmt: str, row: int, values: dict[str, Any]) -> list[tuple[str | list[int], bool]]:
        """The example as pieces of text (or token ids: an answer's completion_ids), each marked whether it counts
        toward the loss."""
        o, all_count = self.options, self.options.loss_on == "all"
        eos = tokenizer.eos_token or ""
        if fmt == "text":
            return [(self._text(row, "text", values["text"]) + eos, True)]
        if fmt == "prompt":  # ends where the answer would begin; the answer comes from the strategy
            prompt = self._text(row, "prompt", values["prompt"])
            if o.chat_template:
                prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                       add_generation_prompt=True)
            return [(prompt, all_count)]
        if fmt == "prompt-completion":
            prompt, completion = self._text(row, "prompt", values["prompt"]), self._text(row, "completion", values["completion"])
            if not completion.strip():
                raise ConfigError(f"data: {self._where()} row {row}: completion is empty")
            if not o.chat_template:
                return [(prompt, all_count), (completion + eos, True)]
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            if IDS in values:
                return self._exact_answer(tokenizer, row, messages, values[IDS])
        else:
            messages = self._messages(row, "messages", values["messages"])
        pieces: list[tuple[str, bool]] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] == "assistant":
                head = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
                pieces.append((self._after(done, head, row), all_count))
                done = head
            rendered = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
            pieces.append((self._after(done, rendered, row), all_count or message["role"] == "assistant"))
            done = rendered
        return [(text, counts) for text, counts in pieces if text]

    def _exact_answer(self, tokenizer, row: int, messages: list[dict[str, str]], ids: Any) -> list[tuple[str | list[int], bool]]:
        """The prompt in the template, the answer as the teacher's own token ids (no decode and re-encode, so
        teacher targets stored per generated token line up), and the template's text after the answer, less
        the stop token that ended it (already among the ids). That text is rendered but does not count: the
        teacher never said it, and no stored target exists for it."""
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise ConfigError(f"data: {self._where()} row {row}: {IDS} is not a non-empty list of token ids")
        head = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        after = self._after(head, tokenizer.apply_chat_template(messages, tokenize=False), row)
        completion = messages[1]["content"]
        if not after.startswith(completion):  # a template that trims the answer
            at = after.find(completion.strip())
            if at < 0:
                raise ConfigError(f"data: {self._where()} row {row}: the tokenizer's chat template does not render the "
                                  f"completion as it is, so its {IDS} cannot be placed in it")
            completion = after[:at] + completion.strip()
        tail = after[len(completion):]
        stop = tokenizer.decode([ids[-1]]) if ids[-1] in stop_ids(tokenizer) else ""
        if stop and tail.startswith(stop):
            tail = tail[len(stop):]
        all_count = self.options.loss_on == "all"
        return [(text, counts) for text, counts in ((head, all_count), (ids, True), (tail, all_count)) if len(text)]

    def _after(self, done: str, rendered: str, row: int) -> str:
        if not rendered.startswith(done):
            raise ConfigError(f"data: {self._where()} row {row}: the tokenizer's chat template renders a conversation's "
                              "beginning differently once more turns follow, so answer tokens cannot be told apart; "
                              "use loss_on: all")
        return rendered[len(done):]

    def _render(self, tokenizer, records: Iterable[tuple[int, dict[str, Any]]], fmt: str, columns: dict[str, str]) -> list[Example]:
        """(row number, row) pairs as examples, tokenized together."""
        pieces: list[tuple[int, list[tuple[str | list[int], bool]]]] = []
        for row, record in records:
            values = {f: record[c] for f, c in columns.items()}
            if self._ids and IDS in record:
                values[IDS] = record[IDS]
            pieces.append((row, self._segments(tokenizer, fmt, row, values)))
        flat = [text for _, segments in pieces for text, _ in segments if isinstance(text, str)]
        encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        examples = []
        for row, segments in pieces:
            ids: list[int] = []
            counts: list[bool] = []
            answer = None
            for text, count in segments:
                if not isinstance(text, str):  # completion_ids, taken as they are
                    answer = (len(ids), len(text))
                piece = next(encoded) if isinstance(text, str) else text
                ids += piece
                counts += [count] * len(piece)
            if fmt == "prompt":  # a padding token after it, so that every prompt token is an input
                ids, counts = ids + [self._pad], counts + [False]
            examples.append(Example(ids, counts, row, answer))
        return examples

    def _fit(self, examples: list[Example]) -> list[Example]:
        """Examples that fit seq_len (+1: the last token is only a label); the rest cut, dropped or an error
        (counted in `self.counts`)."""
        o, limit = self.options, self.options.seq_len + 1
        kept, cut, dropped, empty = [], 0, 0, 0
        for ex in examples:
            if len(ex.ids) > limit:
                if o.too_long == "error":
                    raise ConfigError(f"data.options.seq_len: {self._where()} row {ex.row} has {len(ex.ids)} tokens, more than "
                                      f"seq_len {o.seq_len} + 1 (too_long: error; or truncate | drop)")
                if o.too_long == "drop":
                    dropped += 1
                    continue
                ex = Example(ex.ids[:limit], ex.counts[:limit], ex.row, ex.answer)
                cut += 1
            if not any(ex.counts[1:]) and self.format != "prompt":  # nothing left to learn (a completion cut away)
                empty += 1
                continue
            kept.append(ex)
        for name, n in (("examples", len(examples)), ("cut", cut), ("dropped", dropped), ("empty", empty)):
            self._fitted[name] += n
        return kept

    @property
    def counts(self) -> dict[str, int]:
        """Examples read, cut at seq_len, and left out (too long, or no answer token left)."""
        f = self._fitted
        return {"examples": f["examples"], "cut": f["cut"], "dropped": f["dropped"] + f["empty"]}

    def _report_fit(self, scope: str = "") -> None:
        f = self._fitted
        if f["cut"] or f["dropped"] or f["empty"]:
            log.warning("data: of %d examples%s longer than seq_len %d, %d were cut and %d dropped; %d left with no "
                        "answer token were dropped", f["cut"] + f["dropped"], scope, self.options.seq_len, f["cut"],
                        f["dropped"], f["empty"])

    # ------------------------------------------------------------------ layout

    def _packed(self, examples: Iterable[Example]) -> Iterator[list[Example]]:
        """Consecutive examples share a row while they fit (order kept, so packing is deterministic)."""
        row: list[Example] = []
        room = 0
        for ex in examples:
            need = len(ex.ids) - 1
            if row and need > room:
                yield row
                row = []
            if not row:
                room = self.options.seq_len
            row.append(ex)
            room -= need
        if row:
            yield row

    def _units_of(self, examples: Iterable[Example]) -> Iterator[list[Example]]:
        return self._packed(examples) if self.options.layout == "pack" else ([ex] for ex in examples)

    def _tensors(self, group: list[Example], width: int) -> tuple[torch.Tensor, ...]:
        ids = torch.full((width,), self._pad, dtype=torch.long)
        labels = torch.full((width,), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros(width, dtype=torch.long)
        positions = torch.arange(width, dtype=torch.long)
        at = 0
        for ex in group:
            n = len(ex.ids) - 1
            ids[at:at + n] = torch.tensor(ex.ids[:-1])
            target = torch.tensor(ex.ids[1:])
            labels[at:at + n] = torch.where(torch.tensor(ex.counts[1:]), target, torch.full_like(target, IGNORE_INDEX))
            attention[at:at + n] = 1
            positions[at:at + n] = torch.arange(n)
            at += n
        positions[at:] = torch.arange(width - at)  # padding: a separate, masked-out run of positions
        return ids, labels, attention, positions

    def _batch_of(self, groups: list[list[Example]], keys: list[int] | None, width: int | None = None) -> kdistill.Batch:
        packed = self.options.layout == "pack"
        if width is None:
            width = self.options.seq_len if packed else max(sum(len(ex.ids) - 1 for ex in g) for g in groups)
        parts = [self._tensors(g, width) for g in groups]
        ids, labels, attention, positions = (torch.stack(column) for column in zip(*parts))
        return kdistill.Batch(input_ids=ids, labels=labels, attention_mask=attention,
                              keys=None if keys is None else torch.tensor(keys), position_ids=positions if packed else None)

    def _batch(self, units: list[int], width: int | None = None, keys: bool = True) -> kdistill.Batch:
        return self._batch_of([self._units[u] for u in units], units if keys else None, width)

    # ------------------------------------------------------------------ DataSource

    def setup(self, tokenizer, seed: int) -> None:
        o = self.options
        self._tokenizer, self._seed = tokenizer, seed
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._fitted = dict.fromkeys(("examples", "cut", "dropped", "empty"), 0)
        self._columns: dict[str, str] | None = None
        if o.streaming:
            self._setup_stream()
            return
        table = read_table(o.paths, "data.options.paths", o.split)
        self.format, self._columns = self._format(list(table.column_names))
        self._ids = self._takes_ids(list(table.column_names))
        table = table.select_columns(self._used())
        self._check_template()
        if o.first >= len(table):
            raise ConfigError(f"data.options.first: {o.first} skips every row of {self._where()} ({len(table)} rows)")
        stop = len(table) if o.max_examples is None else min(len(table), o.first + o.max_examples)
        examples = self._fit(self._render(tokenizer, ((row, table[row]) for row in range(o.first, stop)),
                                          self.format, self._columns))
        self._report_fit()
        if len(examples) < 2:
            raise ConfigError(f"data.options.paths: {self._where()} gives {len(examples)} usable example(s); at least 2 are needed")
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = min(int(len(examples) * o.val_fraction), o.max_val_examples or len(examples))
        n_val = max(1, n_val) if o.val_fraction > 0 else 0
        val = [examples[i] for i in sorted(order[:n_val])]
        train = [examples[i] for i in sorted(order[n_val:])]
        val_units = list(self._units_of(val))
        self._units = list(self._units_of(train)) + val_units
        self._n_train: int | None = len(self._units) - len(val_units)
        self._lengths = [sum(len(ex.ids) - 1 for ex in unit) for unit in self._units]
        self._epoch_cache: tuple[int, int, list[int]] | None = None
        self._fingerprint = self._digest(examples, n_val)
        tokens = sum(self._lengths[:self._n_train])
        counted = sum(sum(ex.counts[1:]) for ex in train)
        log.info("data: %s as %s, %d training examples in %d rows (%d tokens, %d counted), %d validation examples",
                 os.path.basename(self._where()), self.format, len(train), self._n_train, tokens, counted, len(val))

    def _used(self) -> list[str]:
        """The columns read: the format's, and completion_ids where they are taken as they are."""
        return list(dict.fromkeys(list((self._columns or {}).values()) + ([IDS] if self._ids else [])))

    def _takes_ids(self, present: list[str]) -> bool:
        """Whether prompt + completion rows' completion_ids are the student's token ids: only when the folder that
        holds them says they came from a tokenizer with the student's vocabulary (else the text is re-encoded)."""
        if self.format != "prompt-completion" or IDS not in present:
            return False
        for i, path in enumerate(self.options.paths):
            folder = resolve_path(path, f"data.options.paths[{i}]")
            try:
                manifest = json.loads((folder / GENERATION_MANIFEST).read_text())
            except (OSError, ValueError):
                manifest = None
            written = ((manifest or {}).get("vocabulary") or {}).get("tokenizer") if isinstance(manifest, dict) else None
            if written != vocab_digest(self._tokenizer):
                log.info("data: %s: %s re-encoded from the answers' text (not written with the student's vocabulary)",
                         path, IDS)
                return False
        return True

    def _check_template(self) -> None:
        if self.format == "messages" or (self.format in ("prompt-completion", "prompt") and self.options.chat_template):
            check_chat_template(self._tokenizer, "data.options.chat_template")

    def _digest(self, examples: Iterable[Example], n_val: int) -> str:
        digest = hashlib.sha256(json.dumps([self.options.model_dump(mode="json"), self._seed, n_val]).encode())
        for ex in examples:
            digest.update(torch.tensor(ex.ids + [-1] + [int(c) for c in ex.counts], dtype=torch.int64).numpy().tobytes())
        return digest.hexdigest()[:16]

    def _epoch_order(self, epoch: int, batch_size: int) -> list[int]:
        if self._epoch_cache is not None and self._epoch_cache[:2] == (epoch, batch_size):
            return self._epoch_cache[2]
        assert self._n_train is not None
        g = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
        order = torch.randperm(self._n_train, generator=g).tolist()
        if self.options.layout == "pad":  # batches of similar length, in a random order within each window
            window = batch_size * BUCKET_BATCHES
            bucketed: list[int] = []
            for start in range(0, len(order), window):
                chunk = sorted(order[start:start + window], key=lambda u: self._lengths[u])
                batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
                for b in torch.randperm(len(batches), generator=g).tolist():
                    bucketed += batches[b]
            order = bucketed
        self._epoch_cache = (epoch, batch_size, order)
        return order

    def train_batch(self, index: int, batch_size: int) -> kdistill.Batch:
        if self.options.streaming:
            return self._batch_of(self._stream_group(index, batch_size), None)
        n = self._n_train
        assert n is not None
        units = [self._epoch_order(pos // n, batch_size)[pos % n] for pos in range(index * batch_size, (index + 1) * batch_size)]
        return self._batch(units)

    def val_batches(self, batch_size: int) -> Iterator[kdistill.Batch]:
        val = list(range(self._n_train if self._n_train is not None else 0, len(self._units)))
        for i in range(0, len(val), batch_size):
            yield self._batch(val[i:i + batch_size], keys=False)

    def train_keys(self) -> torch.Tensor:
        """Row numbers of the training units (stable for a given table, tokenizer, options and seed)."""
        if self._n_train is None:
            raise ConfigError("data.options.streaming: a streamed source gives its rows no stable keys, so teacher outputs "
                              "cannot be cached for it; use streaming: false")
        return torch.arange(self._n_train)

    def batch_for_keys(self, keys: torch.Tensor) -> kdistill.Batch:
        """Full-width rows (seq_len), so a cache holds one shape; padded training batches are a prefix of it."""
        self.train_keys()
        return self._batch(keys.long().tolist(), width=self.options.seq_len)

    def longest_prompt(self) -> tuple[int, str] | None:
        """The training examples' longest prompt: the tokens before the first counted one (all of a prompt
        alone, less the padding token after it)."""
        if self._n_train is None:
            return None
        longest: tuple[int, str] | None = None
        for unit in self._units[:self._n_train]:
            for ex in unit:
                n = len(ex.ids) - 1 if self.format == "prompt" else next((i for i, c in enumerate(ex.counts) if c), 0)
                if longest is None or n > longest[0]:
                    longest = (n, f"{self._where()} row {ex.row}")
        return longest

    @property
    def n_train(self) -> int | None:
        """Training units (rows when packed, examples when padded); None when streaming (not known ahead)."""
        return self._n_train

    @property
    def n_val(self) -> int:
        return len(self._units) - (self._n_train or 0)

    def fingerprint(self) -> str:
        return self._fingerprint

    def answer_spans(self, keys: torch.Tensor) -> list[list[tuple[int, int, int]]]:
        """For each training unit in `keys` (a batch's `Batch.keys`), where its examples' completion_ids sit:
        (table row, position, n) means labels[position + j] is that row's completion_ids[j] for j < n (n is
        less than their length when the example was cut at seq_len). Only examples whose completion_ids were
        taken as they are (prompt + completion in the chat template, from a folder `kdistill generate` wrote
        with top_k) have a span; what a teacher stored per generated token goes at these positions."""
        self.train_keys()
        spans: list[list[tuple[int, int, int]]] = []
        for unit in keys.long().tolist():
            at, found = 0, []
            for ex in self._units[unit]:
                if ex.answer is not None:
                    start, length = ex.answer
                    n = min(length, len(ex.ids) - start)
                    if n > 0:
                        found.append((ex.row, at + start - 1, n))
                at += len(ex.ids) - 1
            spans.append(found)
        return spans

    # ------------------------------------------------------------------ streaming

    def _held_out(self, row: int) -> bool:
        """A row is for validation when a seeded hash of its number falls below val_fraction: decided row by row,
        without knowing how many rows there are."""
        if self.options.val_fraction == 0:
            return False
        digest = hashlib.sha256(f"{self._seed}/{row}".encode()).digest()
        return int.from_bytes(digest[:8], "little") / 2 ** 64 < self.options.val_fraction

    def _stream_rows(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row number, row) in file order, from `first` on, at most max_examples."""
        o = self.options
        stop = None if o.max_examples is None else o.first + o.max_examples
        table = read_table(o.paths, "data.options.paths", o.split, streaming=True)
        if self._columns is not None and table.column_names:  # known once the first row was read
            table = table.select_columns(self._used())
        for row, record in enumerate(table.skip(o.first) if o.first else table, start=o.first):
            if stop is not None and row >= stop:
                return
            yield row, record

    def _stream_examples(self, rows: Iterable[tuple[int, dict[str, Any]]]) -> Iterator[Example]:
        chunk: list[tuple[int, dict[str, Any]]] = []
        for item in rows:
            chunk.append(item)
            if len(chunk) == RENDER_ROWS:
                yield from self._fit(self._render(self._tokenizer, chunk, self.format, self._columns))
                chunk = []
        if chunk:
            yield from self._fit(self._render(self._tokenizer, chunk, self.format, self._columns))

    def _setup_stream(self) -> None:
        """Read from the start until the validation examples are found (and two training ones): the only rows held."""
        o = self.options
        rows = self._stream_rows()
        try:
            row, first = next(rows)
        except StopIteration:
            raise ConfigError(f"data.options.first: {o.first} skips every row of {self._where()}") from None
        self.format, self._columns = self._format(list(first))
        self._ids = self._takes_ids(list(first))
        self._check_template()
        cap = (o.max_val_examples or 0) if o.val_fraction > 0 else 0
        val: list[Example] = []
        seen: list[Example] = []
        for ex in self._stream_examples(itertools.chain([(row, first)], rows)):
            if self._held_out(ex.row):
                if len(val) < cap:
                    val.append(ex)
            elif len(seen) < SEEN_AHEAD:
                seen.append(ex)
            if len(val) >= cap and len(seen) >= SEEN_AHEAD:
                break
        self._report_fit(" read ahead")
        if len(seen) < 2:
            raise ConfigError(f"data.options.paths: {self._where()} gives {len(seen)} usable training example(s); at least 2 "
                              "are needed")
        if cap and not val:
            raise ConfigError(f"data.options.val_fraction: no row of {self._where()} was held out for validation at "
                              f"{o.val_fraction}; raise it, or set it to 0")
        self._units = list(self._units_of(val))
        self._n_train = None
        self._cursor: tuple[int, int, Iterator[list[list[Example]]]] | None = None
        self._fingerprint = self._digest(val + seen, len(val))
        log.info("data: %s as %s, streamed (shuffle buffer %d), %d validation examples", os.path.basename(self._where()),
                 self.format, o.shuffle_buffer, len(val))

    def _shuffled(self, rows: Iterable[Any], epoch: int) -> Iterator[Any]:
        """A buffer of shuffle_buffer items, drawn from at random as new ones come in (seeded per epoch)."""
        g = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
        size, buffer = self.options.shuffle_buffer, []
        for item in rows:
            if len(buffer) < size:
                buffer.append(item)
                continue
            pick = int(torch.randint(size, (1,), generator=g))
            yield buffer[pick]
            buffer[pick] = item
        for pick in torch.randperm(len(buffer), generator=g).tolist():
            yield buffer[pick]

    def _stream_units(self, batch_size: int) -> Iterator[list[Example]]:
        """Training units of epoch 0, 1, ... in turn: held-out rows left out, the rest shuffled, rendered, packed;
        padded, they come in batches of similar length, shuffled within windows of the epoch."""
        for epoch in itertools.count():
            rows = (item for item in self._stream_rows() if not self._held_out(item[0]))
            units = self._units_of(self._stream_examples(self._shuffled(rows, epoch)))
            n = 0
            # packed rows go as they come; padded examples are read a window ahead
            window_size = batch_size * BUCKET_BATCHES if self.options.layout == "pad" else 1
            for window_index in itertools.count():
                window = list(itertools.islice(units, window_size))
                if not window:
                    break
                n += len(window)
                if self.options.layout == "pad":
                    window.sort(key=lambda u: len(u[0].ids))
                    batches = [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
                    g = torch.Generator().manual_seed((self._seed * 1_000_003 + epoch) * 1_000_003 + window_index)
                    window = [unit for b in torch.randperm(len(batches), generator=g).tolist() for unit in batches[b]]
                yield from window
            self._report_fit(f" streamed up to epoch {epoch}")
            if n == 0:
                raise ConfigError(f"data.options.paths: {self._where()} gives no usable training example")

    def _stream_groups(self, batch_size: int) -> Iterator[list[list[Example]]]:
        units = self._stream_units(batch_size)
        while True:
            yield list(itertools.islice(units, batch_size))

    def _stream_group(self, index: int, batch_size: int) -> list[list[Example]]:
        """Batch `index` of the stream: the next one, or read again from the start (a resume, an earlier index)."""
        if self._cursor is None or self._cursor[0] != batch_size or self._cursor[1] > index:
            self._cursor = (batch_size, 0, self._stream_groups(batch_size))
        size, at, groups = self._cursor
        for _ in range(index - at):
            next(groups)
        self._cursor = (size, index + 1, groups)
        return next(groups)


@kdistill.hookimpl
def kd_register_data_sources():
    return [Conversations]
