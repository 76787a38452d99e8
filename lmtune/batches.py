"""What the training loop iterates over: packed blocks of text, or chat examples one per row, as batches.

`data.py` reads and tokenizes; this cuts the token streams into training rows and collates them.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lmtune import loss
from lmtune.data.types import Corpus, Split
from lmtune.errors import LmtuneError


def pack(ids: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """Cut the stream into full blocks of `block_size` tokens, no padding. Returns (blocks, tokens dropped)."""
    n_blocks = len(ids) // block_size
    return np.asarray(ids[: n_blocks * block_size]).reshape(n_blocks, block_size), len(ids) - n_blocks * block_size


Row = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]  # (T,) inputs, labels, position ids or None


class Blocks(Dataset):
    """Packed blocks as a dataset; the (n, T) array stays a memory map until a batch is taken."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> Row:
        ids = torch.from_numpy(self.blocks[i].astype(np.int64))
        return ids, ids, None  # every token is a target; positions 0, 1, 2, ...


class Examples(Dataset):
    """Chat examples cut to the block size, labels IGNORE outside the responses. With `packing`, several
    conversations share a row, their position ids restarting at each (transformers then keeps their
    attention apart); without, one conversation per row."""

    def __init__(self, split: Split, block_size: int, packing: bool = False):
        assert split.starts is not None and split.mask is not None, "chat splits only"
        self.ids, self.mask, self.packing = split.ids, split.mask, packing
        whole = list(itertools.pairwise(split.starts.tolist()))
        spans = [(s, min(e, s + block_size)) for s, e in whole]
        self.truncated = sum(e - s > block_size for s, e in whole)
        self.dropped = sum(max(0, e - s - block_size) for s, e in whole)  # tokens cut off
        # A conversation is kept if a response token is left to predict after the cut (its first token
        # predicts nothing).
        kept = [(s, e) for s, e in spans if self.mask[s + 1 : e].any()]
        self.skipped = len(spans) - len(kept)
        self.conversations = len(kept)
        self.rows = pack_spans(kept, block_size) if packing else [[span] for span in kept]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Row:
        ids, labels, positions = [], [], []
        for s, e in self.rows[i]:
            piece = torch.from_numpy(np.asarray(self.ids[s:e], dtype=np.int64))
            target = piece.masked_fill(~torch.from_numpy(np.asarray(self.mask[s:e])), loss.IGNORE)
            target[0] = loss.IGNORE  # a conversation's first token is not predicted from the one before it
            ids.append(piece)
            labels.append(target)
            positions.append(torch.arange(e - s))
        return torch.cat(ids), torch.cat(labels), torch.cat(positions) if self.packing else None


class Pairs(Dataset):
    """Preference pairs, a row each: the chosen side and the rejected side, each cut to the block size, labels
    IGNORE outside the answer. A pair is kept only if both answers keep a token to predict after the cut.

    `reference`: the reference model's summed log-probabilities of each pair's answers, (pairs, 2) for
    chosen and rejected, by the pair's place in the split; set once before training (dpo.py), NaN until then.
    """

    def __init__(self, split: Split, block_size: int):
        assert split.starts is not None and split.mask is not None, "preference splits only"
        self.ids, self.mask = split.ids, split.mask
        sides = list(itertools.pairwise(split.starts.tolist()))  # chosen, rejected, chosen, ...
        cut = [(s, min(e, s + block_size)) for s, e in sides]
        self.truncated = sum(e - s > block_size for s, e in sides)  # sides cut short
        self.dropped = sum(max(0, e - s - block_size) for s, e in sides)
        answered = [bool(self.mask[s + 1 : e].any()) for s, e in cut]
        # (pair index, chosen span, rejected span) of the pairs whose two answers keep a token after the cut
        self.pairs = [(k // 2, cut[k], cut[k + 1]) for k in range(0, len(cut), 2) if answered[k] and answered[k + 1]]
        self.skipped = len(cut) // 2 - len(self.pairs)
        self.conversations = len(self.pairs)
        self.rows = [[c, r] for _, c, r in self.pairs]  # spans of each row, for the mixture's token counts
        self.reference = np.full((len(cut) // 2, 2), np.nan)

    def __len__(self) -> int:
        return len(self.pairs)

    def side(self, span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = span
        piece = torch.from_numpy(np.asarray(self.ids[s:e], dtype=np.int64))
        target = piece.masked_fill(~torch.from_numpy(np.asarray(self.mask[s:e])), loss.IGNORE)
        target[0] = loss.IGNORE
        return piece, target

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        """chosen ids, chosen labels, rejected ids, rejected labels, (2,) reference log-probabilities."""
        k, chosen, rejected = self.pairs[i]
        return (*self.side(chosen), *self.side(rejected), torch.from_numpy(self.reference[k]))


def pad_pairs(
    rows: list[tuple[torch.Tensor, ...]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """A batch of pairs: (B, 2, T) inputs and labels (side 0 chosen, 1 rejected), right-padded to the longest
    side, the (B, 2) reference log-probabilities, and the real tokens. The same 4 places as `pad_batch`, the
    reference where its position ids are (pairs are never packed), so the loop hands either on alike."""
    length = max(len(ids) for row in rows for ids in (row[0], row[2]))
    inputs = torch.full((len(rows), 2, length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), 2, length), loss.IGNORE, dtype=torch.long)
    for r, (c_ids, c_lab, r_ids, r_lab, _) in enumerate(rows):
        inputs[r, 0, : len(c_ids)], labels[r, 0, : len(c_lab)] = c_ids, c_lab
        inputs[r, 1, : len(r_ids)], labels[r, 1, : len(r_lab)] = r_ids, r_lab
    reference = torch.stack([row[4] for row in rows])  # (B, 2) float64
    return inputs, labels, reference, sum(len(row[0]) + len(row[2]) for row in rows)


def pack_spans(spans: list[tuple[int, int]], block_size: int) -> list[list[tuple[int, int]]]:
    """Spans (conversations) into rows of at most `block_size` tokens, longest first, each into the fullest
    row it fits (best fit decreasing): little padding is left, and the result depends on the data only."""
    rows: list[list[tuple[int, int]]] = []
    room: list[tuple[int, int]] = []  # (tokens free, row), sorted
    for s, e in sorted(spans, key=lambda span: (span[0] - span[1], span[0])):
        at = bisect.bisect_left(room, (e - s, -1))
        if at == len(room):
            rows.append([(s, e)])
            free, row = block_size - (e - s), len(rows) - 1
        else:
            free, row = room.pop(at)
            rows[row].append((s, e))
            free -= e - s
        if free > 0:
            bisect.insort(room, (free, row))
    return rows


def pad_batch(rows: list[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int]:
    """(B, T) inputs, labels and position ids (None unless packed) right-padded to the longest row, and the
    real (unpadded) token count.

    Padding is never a target, and in a causal model no earlier position attends to it. In packed rows
    its position ids go on from the row's last conversation, so they stay within the model's context.
    """
    length = max(len(ids) for ids, _, _ in rows)
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), loss.IGNORE, dtype=torch.long)
    packed = rows[0][2] is not None
    positions = torch.zeros((len(rows), length), dtype=torch.long) if packed else None
    for r, (ids, lab, pos) in enumerate(rows):
        inputs[r, : len(ids)] = ids
        labels[r, : len(lab)] = lab
        if positions is not None and pos is not None:
            positions[r, : len(pos)] = pos
            positions[r, len(pos) :] = pos[-1] + 1 + torch.arange(length - len(pos))
    return inputs, labels, positions, sum(len(ids) for ids, _, _ in rows)


@torch.no_grad()
def packing_works(model: Any) -> bool:
    """Whether `model` keeps packed conversations apart: the second of two short sequences packed in one
    row, position ids restarting, gives the same outputs as alone. transformers does this for models whose
    masks come from `create_causal_mask` with the sdpa, eager and flex attention (flash attention reads the
    position ids itself); others would let one conversation attend to the one before it."""
    size = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    first, second = torch.arange(1, 7, device=device) % size, torch.arange(9, 13, device=device) % size
    positions = torch.cat([torch.arange(6), torch.arange(4)]).to(device)[None]
    was_training = model.training
    model.eval()
    try:
        together = model(input_ids=torch.cat([first, second])[None], position_ids=positions, use_cache=False)
        alone = model(input_ids=second[None], use_cache=False)
    except (TypeError, ValueError, RuntimeError):  # a model that takes no position ids
        return False
    finally:
        model.train(was_training)
    a, b = together.logits[0, 6:].float(), alone.logits[0].float()
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-3 * float(b.abs().max()) + 1e-6))


@dataclass
class Rows:
    """The training rows of a corpus and what cutting them cost, for the plan."""

    dataset: Any  # Blocks, Examples, Pairs, a Mixed dataset of several sources, or a stream's blocks
    dropped: int  # tokens: left over after the last block, or cut from conversations longer than a block
    conversations: int = 0  # chat: conversations trained on; preference: pairs
    truncated: int = 0  # chat: conversations cut short; preference: sides cut short
    skipped: int = 0  # chat: conversations with no response token left within the block; preference: pairs


def training_rows(corpus: Corpus, block_size: int, packing: bool = False, name: str = "") -> Rows:
    """Text cut into full blocks; chat data several conversations per row (`packing`) or one per row.
    `name`: the source, for messages when there are several."""
    of = f" of {name}" if name else ""
    if corpus.format == "preference":
        pairs = Pairs(corpus.train, block_size)
        if len(pairs) == 0:
            raise LmtuneError(
                f"no training pair{of} keeps a token of both answers within --block-size {block_size}; pass a larger one"
            )
        return Rows(pairs, pairs.dropped, pairs.conversations, pairs.truncated, pairs.skipped)
    if corpus.format == "chat":
        examples = Examples(corpus.train, block_size, packing)
        if len(examples) == 0:
            raise LmtuneError(
                f"no training conversation{of} has a response within --block-size {block_size}; pass a larger one"
            )
        return Rows(examples, examples.dropped, examples.conversations, examples.truncated, examples.skipped)
    blocks, dropped = pack(corpus.train.ids, block_size)
    if len(blocks) == 0:
        raise LmtuneError(
            f"the training data{of} has {len(corpus.train.ids)} tokens, fewer than one block of {block_size}; "
            "pass a smaller --block-size or more data"
        )
    return Rows(Blocks(blocks), dropped)


def optimizer_steps(batches: Any, accumulation: int) -> Any:
    """The micro-batches of each optimizer step, in lists: `accumulation` of them, fewer at an epoch's end."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == accumulation:
            yield group
            group = []
    if group:
        yield group


def split_rows(group: list[Any], pieces: int) -> list[Any]:
    """Each micro-batch of `group` cut into `pieces` micro-batches of fewer rows (the same tokens)."""
    if pieces == 1:
        return group
    out = []
    for inputs, labels, positions, real_tokens in group:
        parts = zip(
            inputs.tensor_split(pieces), labels.tensor_split(pieces),
            positions.tensor_split(pieces) if positions is not None else [None] * pieces, strict=True,
        )  # fmt: skip
        out += [(i, lab, pos, real_tokens) for i, lab, pos in parts if len(i)]
    return out
