"""Local text files, tokenized with the student's tokenizer and packed into fixed-length blocks."""

from __future__ import annotations

import glob
import hashlib
import os
from typing import Iterator

import torch
from pydantic import Field

import kdistill
from kdistill import ConfigError, resolve_path

_CHUNK_CHARS = 1 << 16  # tokenize long files piecewise, cut at line ends


class TextFiles(kdistill.DataSource):
    """Plain text files packed into blocks of `seq_len`; a seeded split into train and validation.

    Every batch is a pure function of (seed, batch index), so a resumed run sees the same data.
    """

    name = "text-files"

    class Options(kdistill.Options):
        paths: list[kdistill.LocalPattern] = Field(min_length=1, description="files or glob patterns (pkg://PACKAGE/FILE allowed)")
        seq_len: int = Field(256, ge=2, le=1 << 20)
        val_fraction: float = Field(0.05, ge=0, lt=1)
        max_val_blocks: int | None = Field(256, ge=1)
        max_train_blocks: int | None = Field(None, ge=1)
        encoding: str = "utf-8"

    def _files(self) -> list[str]:
        files: list[str] = []
        for i, pattern in enumerate(self.options.paths):
            local = str(resolve_path(pattern, f"data.options.paths[{i}]"))
            matches = sorted(glob.glob(local)) if glob.has_magic(local) else [local]
            matches = [m for m in matches if not glob.has_magic(m)]
            found = [m for m in matches if os.path.isfile(m)]
            if not found:
                raise ConfigError(f"data.options.paths[{i}]: no such file: {pattern}")
            files += found
        return files

    def _tokenize(self, tokenizer, text: str) -> list[int]:
        ids: list[int] = []
        start = 0
        while start < len(text):
            end = min(len(text), start + _CHUNK_CHARS)
            if end < len(text):
                cut = text.rfind("\n", start, end)
                end = cut + 1 if cut > start else end
            ids += tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
            start = end
        return ids

    @classmethod
    def no_validation_split(cls, options):
        return "data.options.val_fraction: 0" if options.val_fraction == 0 else None

    def setup(self, tokenizer, seed: int) -> None:
        o = self.options
        ids: list[int] = []
        for path in self._files():
            try:
                with open(path, encoding=o.encoding) as handle:
                    ids += self._tokenize(tokenizer, handle.read())
            except UnicodeDecodeError as exc:
                raise ConfigError(f"data.options.paths: {path} is not {o.encoding} text ({exc.reason} at byte {exc.start})") from None
            if tokenizer.eos_token_id is not None:
                ids.append(tokenizer.eos_token_id)
        tokens = torch.tensor(ids, dtype=torch.long)
        n_blocks = (len(tokens) - 1) // o.seq_len
        if n_blocks < 2:
            raise ConfigError(f"data.options.paths: {len(tokens)} tokens make fewer than 2 blocks of seq_len {o.seq_len}")
        starts = torch.arange(n_blocks) * o.seq_len
        self._blocks = torch.stack([tokens[s:s + o.seq_len + 1] for s in starts.tolist()])
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed))
        n_val = min(int(n_blocks * o.val_fraction), o.max_val_blocks or n_blocks)
        if o.val_fraction > 0:
            n_val = max(1, n_val)
        self._val = order[:n_val].sort().values
        self._train = order[n_val:]
        if o.max_train_blocks is not None:
            self._train = self._train[:o.max_train_blocks]
        self._seed = seed
        self._epoch_cache: tuple[int, torch.Tensor] | None = None
        digest = hashlib.sha256(tokens.numpy().tobytes())
        digest.update(f"{o.seq_len}/{seed}/{n_val}/{len(self._train)}".encode())
        self._fingerprint = digest.hexdigest()[:16]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            g = torch.Generator().manual_seed(self._seed * 1_000_003 + epoch)
            self._epoch_cache = (epoch, self._train[torch.randperm(len(self._train), generator=g)])
        return self._epoch_cache[1]

    def _batch(self, rows: torch.Tensor) -> kdistill.Batch:
        blocks = self._blocks[rows]
        return kdistill.Batch(input_ids=blocks[:, :-1].contiguous(), labels=blocks[:, 1:].contiguous(),
                              attention_mask=torch.ones_like(blocks[:, :-1]), keys=rows.clone())

    def train_keys(self) -> torch.Tensor:
        """Block numbers in the packed text (stable for a given text, tokenizer and seq_len)."""
        return self._train.sort().values

    def batch_for_keys(self, keys: torch.Tensor) -> kdistill.Batch:
        return self._batch(keys.long())

    def train_batch(self, index: int, batch_size: int) -> kdistill.Batch:
        n = len(self._train)
        rows = []
        for pos in range(index * batch_size, (index + 1) * batch_size):
            rows.append(int(self._epoch_order(pos // n)[pos % n]))
        return self._batch(torch.tensor(rows))

    def val_batches(self, batch_size: int) -> Iterator[kdistill.Batch]:
        for i in range(0, len(self._val), batch_size):
            yield self._batch(self._val[i:i + batch_size])

    @property
    def n_train(self) -> int:
        return len(self._train)

    @property
    def n_val(self) -> int:
        return len(self._val)

    def fingerprint(self) -> str:
        return self._fingerprint


@kdistill.hookimpl
def kd_register_data_sources():
    return [TextFiles]
