"""Several sources mixed by weight: the rows of each epoch interleaved by a weighted round robin on real tokens.

Weights are shares of the training tokens (real tokens: padding does not count). Each epoch takes every
source at least once: a source whose share needs more tokens than it has repeats (a new shuffle each pass),
so an epoch holds max(tokens_i / share_i) tokens. The rows are then interleaved deterministically: the next
row comes from the source furthest below its share so far, so any stretch of a run, a single step included,
holds the shares within about one row. The order depends only on the seed and the epoch: resuming takes the
same rows in the same order, and every process computes the same order (each then takes its own batches).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from lmtune.batches import Rows


def row_tokens(dataset: Any) -> np.ndarray:
    """The real tokens of each row of a training dataset (packed blocks: all the block; chat rows: their spans)."""
    if hasattr(dataset, "rows"):  # chat examples: spans of conversations
        return np.array([sum(e - s for s, e in spans) for spans in dataset.rows], dtype=np.int64)
    return np.full(len(dataset), dataset.blocks.shape[1], dtype=np.int64)


class Mixed(Dataset):  # type: ignore[type-arg]
    """The rows of several sources as one dataset, in the order `MixSampler` draws them."""

    def __init__(self, parts: list[Rows], weights: list[float] | None, seed: int):
        self.parts = [p.dataset for p in parts]
        self.tokens = [row_tokens(d) for d in self.parts]  # per source: real tokens of each row
        sizes = np.array([t.sum() for t in self.tokens], dtype=np.float64)
        given = np.array(weights if weights else sizes, dtype=np.float64)
        self.shares = given / given.sum()  # normalised: shares of the training tokens
        epoch_tokens = max(sizes / self.shares)  # every source at least once
        # Rows of each source in an epoch: its share of the epoch's tokens, in rows (at least all of them).
        self.rows = [
            max(len(t), math.ceil(len(t) * share * epoch_tokens / size))
            for t, share, size in zip(self.tokens, self.shares, sizes, strict=True)
        ]
        self.offsets = np.cumsum([0, *map(len, self.parts)])
        self.seed = seed
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return sum(self.rows)

    def __getitem__(self, index: int) -> Any:
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[part][index - int(self.offsets[part])]

    def times_seen(self) -> list[float]:
        """How many times each source is seen in an epoch (1.0: once; more: it repeats)."""
        return [r / len(t) for r, t in zip(self.rows, self.tokens, strict=True)]

    def epoch_tokens(self) -> list[int]:
        """Real tokens each source gives an epoch."""
        return [int(self.tokens[i][self.source_order(i, 0)].sum()) for i in range(len(self.parts))]

    def source_order(self, i: int, epoch: int) -> np.ndarray:
        """Source i's rows for an epoch: shuffled passes over them, a new shuffle each pass, cut to its rows."""
        n, passes = len(self.tokens[i]), math.ceil(self.rows[i] / len(self.tokens[i]))
        rngs = (np.random.default_rng([self.seed, epoch, i, p]) for p in range(passes))
        return np.concatenate([rng.permutation(n) for rng in rngs])[: self.rows[i]]

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's rows (indices into this dataset), interleaved by the weighted round robin."""
        if self._order is not None and self._order[0] == epoch:
            return self._order[1]
        orders = [self.source_order(i, epoch) for i in range(len(self.parts))]
        cumulative = [np.cumsum(self.tokens[i][o]) for i, o in enumerate(orders)]  # tokens after each row taken
        taken = [0] * len(orders)
        heap = [(0.0, i) for i in range(len(orders))]  # (tokens taken / share, source): the lowest goes next
        out = np.empty(len(self), dtype=np.int64)
        for k in range(len(out)):
            _, i = heapq.heappop(heap)
            out[k] = self.offsets[i] + orders[i][taken[i]]
            taken[i] += 1
            if taken[i] < len(orders[i]):
                heapq.heappush(heap, (float(cumulative[i][taken[i] - 1]) / self.shares[i], i))
        self._order = (epoch, out)
        return out

    def tokens_by_source(self, epoch: int, rows: int) -> np.ndarray:
        """Real tokens of each source in the first `rows` rows of an epoch's order (past its end: from its
        start again, as Accelerate fills the last batches so that every process gets as many)."""
        order = self.order(epoch)
        taken = np.resize(order, rows) if rows > len(order) else order[:rows]
        parts = np.searchsorted(self.offsets, taken, side="right") - 1
        out = np.zeros(len(self.parts), dtype=np.int64)
        for i in range(len(self.parts)):
            out[i] = self.tokens[i][taken[parts == i] - self.offsets[i]].sum()
        return out


class MixSampler(Sampler):  # type: ignore[type-arg]
    """Draws a Mixed dataset's rows in the order of the epoch Accelerate sets (set_epoch)."""

    def __init__(self, mixed: Mixed):
        self.mixed, self.epoch = mixed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.mixed)

    def __iter__(self) -> Iterator[int]:
        return iter(self.mixed.order(self.epoch).tolist())
