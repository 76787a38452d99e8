"""What the training loop iterates over: packed blocks of text, or chat examples one per row, as batches.

`data.py` reads and tokenizes; this cuts the token streams into training rows and collates them.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from lmtune import loss
from lmtune.data import Corpus, Split
from lmtune.errors import LmtuneError


def pack(ids: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """Cut the stream into full blocks of `block_size` tokens, no padding. Returns (blocks, tokens dropped)."""
    n_blocks = len(ids) // block_size
    return np.asarray(ids[: n_blocks * block_size]).reshape(n_blocks, block_size), len(ids) - n_blocks * block_size


class Blocks(Dataset):
    """Packed blocks as a dataset; the (n, T) array stays a memory map until a batch is taken."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(self.blocks[i].astype(np.int64))
        return ids, ids  # (inputs, labels): every token is a target


class Examples(Dataset):
    """Chat examples, one per row, cut to the block size; labels are IGNORE outside the responses."""

    def __init__(self, split: Split, block_size: int):
        assert split.starts is not None and split.mask is not None, "chat splits only"
        self.ids, self.mask = split.ids, split.mask
        whole = list(itertools.pairwise(split.starts.tolist()))
        rows = [(s, min(e, s + block_size)) for s, e in whole]
        self.truncated = sum(e - s > block_size for s, e in whole)
        self.dropped = sum(max(0, e - s - block_size) for s, e in whole)  # tokens cut off
        # A row is kept if a response token is left to predict after the cut (position 0 predicts nothing).
        self.rows = [(s, e) for s, e in rows if self.mask[s + 1 : e].any()]
        self.skipped = len(rows) - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = self.rows[i]
        ids = torch.from_numpy(np.asarray(self.ids[s:e], dtype=np.int64))
        return ids, ids.masked_fill(~torch.from_numpy(np.asarray(self.mask[s:e])), loss.IGNORE)


def pad_batch(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, T) inputs and labels right-padded to the longest row, and the real (unpadded) token count.

    Padding is never a target, and in a causal model no earlier position attends to it.
    """
    length = max(len(ids) for ids, _ in rows)
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), loss.IGNORE, dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        inputs[r, : len(ids)] = ids
        labels[r, : len(lab)] = lab
    return inputs, labels, sum(len(ids) for ids, _ in rows)


@dataclass
class Rows:
    """The training rows of a corpus and what cutting them cost, for the plan."""

    dataset: Blocks | Examples
    dropped: int  # tokens: left over after the last block, or cut from conversations longer than a block
    truncated: int = 0  # chat: conversations cut short
    skipped: int = 0  # chat: conversations with no response token left within the block


def training_rows(corpus: Corpus, block_size: int) -> Rows:
    """Text packed into blocks; chat data one conversation per row (packing would let one attend to another)."""
    if corpus.format == "chat":
        examples = Examples(corpus.train, block_size)
        if len(examples) == 0:
            raise LmtuneError(
                f"no training conversation has a response within --block-size {block_size}; pass a larger one"
            )
        return Rows(examples, examples.dropped, examples.truncated, examples.skipped)
    blocks, dropped = pack(corpus.train.ids, block_size)
    if len(blocks) == 0:
        raise LmtuneError(
            f"the training data has {len(corpus.train.ids)} tokens, fewer than one block of {block_size}; "
            "pass a smaller --block-size or more data"
        )
    return Rows(Blocks(blocks), dropped)
