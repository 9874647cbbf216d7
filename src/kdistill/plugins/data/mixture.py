"""Task-specific distillation data: several text sources drawn with the recipe's weights (design 8.1)."""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch
from pydantic import Field

import kdistill
from kdistill.plugins.data.text_files import TextFiles

KEY_STRIDE = 1 << 40  # key = source index * KEY_STRIDE + block number in that source
DRAW_BLOCK = 4096  # draws generated per seeded block


class MixtureSource(kdistill.Options):
    name: str = Field(description="a label for the source (task, general, ...)")
    paths: list[kdistill.LocalPattern] = Field(min_length=1, description="files or glob patterns (pkg://PACKAGE/FILE allowed)")
    weight: float = Field(gt=0, description="relative share of training sequences drawn from this source")
    max_train_blocks: int | None = Field(None, ge=1)


class Mixture(kdistill.DataSource):
    """Each training sequence comes from one source, chosen at random with the sources' weights; each
    source goes through its own blocks in a fresh seeded order per epoch and starts a new epoch when it
    runs out (never re-reading an exhausted iterator). Every draw is a pure function of the seed and
    the sequence's position, so runs are reproducible and a resumed run sees the same data."""

    name = "mixture"

    class Options(kdistill.Options):
        sources: list[MixtureSource] = Field(min_length=1)
        seq_len: int = Field(256, ge=2, le=1 << 20)
        val_fraction: float = Field(0.05, ge=0, lt=1)
        max_val_blocks: int | None = Field(256, ge=1, description="per source")
        encoding: str = "utf-8"

    @classmethod
    def no_validation_split(cls, options):
        return "data.options.val_fraction: 0" if options.val_fraction == 0 else None

    def setup(self, tokenizer, seed: int) -> None:
        o = self.options
        self.parts = []
        for source in o.sources:
            part = TextFiles(TextFiles.Options(paths=source.paths, seq_len=o.seq_len, val_fraction=o.val_fraction,
                                               max_val_blocks=o.max_val_blocks, max_train_blocks=source.max_train_blocks,
                                               encoding=o.encoding))
            part.setup(tokenizer, seed)
            self.parts.append(part)
        weights = torch.tensor([s.weight for s in o.sources], dtype=torch.float64)
        self._cumulative = (weights / weights.sum()).cumsum(0)
        self._cumulative[-1] = 1.0
        self._seed = seed
        self._choices: list[torch.Tensor] = []  # per draw block: the source of each draw
        self._ranks: list[torch.Tensor] = []  # per draw block: how many earlier draws of the block had its source
        self._counts: list[torch.Tensor] = [torch.zeros(len(self.parts), dtype=torch.long)]  # draws per source before each block
        digest = hashlib.sha256()
        for source, part in zip(o.sources, self.parts):
            digest.update(f"{source.name}/{source.weight}/{part.fingerprint()}/".encode())
        digest.update(str(seed).encode())
        self._fingerprint = digest.hexdigest()[:16]

    def _block(self, b: int) -> torch.Tensor:
        while len(self._choices) <= b:
            g = torch.Generator().manual_seed(self._seed * 1_000_003 + 7919 * len(self._choices) + 1)
            draws = torch.searchsorted(self._cumulative, torch.rand(DRAW_BLOCK, generator=g, dtype=torch.float64), right=True)
            draws = draws.clamp(max=len(self.parts) - 1)
            ranks = torch.empty_like(draws)
            for source in range(len(self.parts)):
                hits = (draws == source).nonzero().flatten()
                ranks[hits] = torch.arange(len(hits))
            self._choices.append(draws)
            self._ranks.append(ranks)
            self._counts.append(self._counts[-1] + torch.bincount(draws, minlength=len(self.parts)))
        return self._choices[b]

    def draw(self, position: int) -> tuple[int, int]:
        """(source, the how-many-th draw from that source) of the training sequence at `position`."""
        b, i = divmod(position, DRAW_BLOCK)
        source = int(self._block(b)[i])
        return source, int(self._counts[b][source]) + int(self._ranks[b][i])

    def sources_of(self, positions: range) -> list[int]:
        return [self.draw(p)[0] for p in positions]

    def _rows(self, positions: range) -> tuple[list[int], list[int]]:
        sources, rows = [], []
        for p in positions:
            source, n = self.draw(p)
            part = self.parts[source]
            sources.append(source)
            rows.append(int(part._epoch_order(n // part.n_train)[n % part.n_train]))
        return sources, rows

    def _batch(self, sources: list[int], rows: list[int]) -> kdistill.Batch:
        blocks = torch.stack([self.parts[s]._blocks[r] for s, r in zip(sources, rows)])
        keys = torch.tensor([s * KEY_STRIDE + r for s, r in zip(sources, rows)], dtype=torch.long)
        return kdistill.Batch(input_ids=blocks[:, :-1].contiguous(), labels=blocks[:, 1:].contiguous(),
                              attention_mask=torch.ones_like(blocks[:, :-1]), keys=keys)

    def train_batch(self, index: int, batch_size: int) -> kdistill.Batch:
        return self._batch(*self._rows(range(index * batch_size, (index + 1) * batch_size)))

    def val_batches(self, batch_size: int) -> Iterator[kdistill.Batch]:
        for part in self.parts:
            yield from part.val_batches(batch_size)

    def train_keys(self) -> torch.Tensor:
        return torch.cat([part.train_keys() + i * KEY_STRIDE for i, part in enumerate(self.parts)])

    def batch_for_keys(self, keys: torch.Tensor) -> kdistill.Batch:
        keys = keys.long()
        return self._batch((keys // KEY_STRIDE).tolist(), (keys % KEY_STRIDE).tolist())

    def fingerprint(self) -> str:
        return self._fingerprint


@kdistill.hookimpl
def kd_register_data_sources():
    return [Mixture]
