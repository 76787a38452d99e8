"""--streaming: data too large to download, read as a stream (the datasets library's IterableDataset) and
tokenized as training takes its blocks.

The training rows are blocks of text packed from the stream in its order, skipping the documents the hash
split holds out (data.py), so they are the blocks prepared data of the same documents would give, unshuffled.
Validation is --validation-data, else the dataset's `validation` split, else the held-out documents among the
stream's first ones; at most VALIDATION_DOCUMENTS of them, tokenized before training. The run takes
--max-steps steps. A resumed run takes the same blocks in the same order: the loop skips the batches it had
trained on, which reads and tokenizes that part of the stream again (about 1M tokens/s on 2 cores).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from lmtune import data
from lmtune.batches import Row
from lmtune.config import Config
from lmtune.errors import LmtuneError, first_line
from lmtune.events import Report, silent

VALIDATION_DOCUMENTS = 1000  # documents evaluated on; enough for a stable loss, read before training starts
SCAN_DOCUMENTS = 200_000  # documents of the stream read at most to find held-out ones for validation


def open_stream(spec: str, cfg: Config, split: str = "train") -> data.Source:
    """A split of a hub dataset or of local files as a stream of texts: nothing is downloaded ahead."""
    import datasets

    if data.is_local(spec):
        files = data.local_files(spec)
        if files[0].suffix.lower() == ".txt":  # read a piece at a time already
            return data.file_source(files, spec, cfg)
        kind, options = data.LOCAL_TYPES[files[0].suffix.lower()], {"data_files": [str(f) for f in files]}
        name, config, split = kind, None, "train"
    else:
        (name, config), options = data.hub_name(spec), {}
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True, **options)
    except Exception as err:  # datasets raises many types for "not there"; all mean the same to a user
        raise LmtuneError(f"cannot stream `{spec}` ({first_line(err)}); check the name and your network") from None
    columns = list(ds.column_names or [])
    if cfg.data_format == "chat" or data.data_format(columns, cfg, spec) == "chat":
        raise LmtuneError("--streaming reads text data; prepare chat data (lmtune prepare) instead")
    if cfg.text_column not in columns:
        raise LmtuneError(f"{spec} has no column `{cfg.text_column}`; it has {', '.join(columns)}. Pass --text-column")

    def read() -> Iterator[tuple[list[Any], int]]:
        rows = 0
        for batch in ds.select_columns([cfg.text_column]).iter(batch_size=data.CHUNK):
            rows += len(batch[cfg.text_column])
            yield [t or "" for t in batch[cfg.text_column]], rows

    return data.Source(spec, "text", 0, "rows", read)


class StreamedBlocks(IterableDataset):  # type: ignore[type-arg]
    """Blocks of `block_size` tokens packed from a stream of documents, each followed by EOS, tokenized a
    CHUNK of documents at a time as they are taken; documents the hash split holds out are skipped."""

    def __init__(self, source: data.Source, tokenizer: Any, block_size: int, held_below: int | None, rows: int):
        self.source, self.tokenizer, self.block_size, self.held_below = source, tokenizer, block_size, held_below
        self.rows = rows

    def __len__(self) -> int:
        return self.rows  # what the run takes: the loop counts its batches by it

    def __iter__(self) -> Iterator[Row]:
        eos, dtype = self.tokenizer.eos_token_id, data.token_dtype(self.tokenizer)
        carry = np.zeros(0, dtype)  # tokens after the last full block
        for docs, _ in self.source.read():
            kept = [d for d in docs if data.has_text(d)]
            if self.held_below is not None:
                kept = [d for d in kept if data.content_hash(d) >= self.held_below]
            if not kept:
                continue
            carry = np.concatenate(
                [carry, data.join(data.tokenize(kept, self.tokenizer, silent, "stream"), eos, dtype)]
            )
            full = len(carry) // self.block_size * self.block_size
            for start in range(0, full, self.block_size):
                ids = torch.from_numpy(carry[start : start + self.block_size].astype(np.int64))
                yield ids, ids, None
            carry = carry[full:]


def validation_corpus(cfg: Config, tokenizer: Any, report: Report) -> data.Corpus:
    """The validation split of a streamed run, as a Corpus with an empty training split (the stream is read
    as training goes)."""
    assert cfg.data, "checked by the caller"
    if not cfg.max_steps:
        raise LmtuneError("--streaming needs --max-steps: a stream has no length to count epochs by")
    if data.is_prepared(cfg.data):
        raise LmtuneError(f"{cfg.data} is prepared data, read from disk; drop --streaming")
    if cfg.validation_data:
        split = data.eval_split(cfg.validation_data, cfg, tokenizer, report)
        return corpus_of(split, cfg.validation_data)
    if not data.is_local(cfg.data) and "validation" in split_names(cfg.data):
        docs = first_documents(open_stream(cfg.data, cfg, "validation"), VALIDATION_DOCUMENTS, None)
        return corpus_of(encode(docs, tokenizer, report), f"the `validation` split of {cfg.data}")
    threshold = data.split_threshold(cfg.validation_percent)
    docs = first_documents(open_stream(cfg.data, cfg), VALIDATION_DOCUMENTS, threshold)
    if not docs:
        raise LmtuneError(
            f"none of the first {SCAN_DOCUMENTS:,} documents of {cfg.data} is held out for validation; "
            "pass --validation-data or a larger --validation-percent"
        )
    where = f"{cfg.validation_percent:g}% of the documents of {cfg.data}, held out (the first {len(docs):,})"
    return corpus_of(encode(docs, tokenizer, report), where)


def split_names(spec: str) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(*data.hub_name(spec)))
    except Exception:  # unknown: the held-out share will do
        return []


def first_documents(source: data.Source, wanted: int, held_below: int | None) -> list[str]:
    """The first `wanted` non-empty documents of a stream (those the hash split holds out, with `held_below`),
    reading at most SCAN_DOCUMENTS."""
    out: list[str] = []
    read = 0
    for docs, _ in source.read():
        for d in docs:
            read += 1
            if data.has_text(d) and (held_below is None or data.content_hash(d) < held_below):
                out.append(d)
            if len(out) == wanted or read >= SCAN_DOCUMENTS:
                return out
    return out


def encode(docs: list[str], tokenizer: Any, report: Report) -> data.Split:
    encoded = data.encode(docs, tokenizer, report, "validation data")
    return encoded.split(range(len(docs)), tokenizer.eos_token_id, data.token_dtype(tokenizer))


def corpus_of(validation: data.Split, source: str) -> data.Corpus:
    empty = data.Split(np.zeros(0, np.int32), 0, 0)
    return data.Corpus(empty, validation, source, 0, cached=False)


def training_blocks(cfg: Config, tokenizer: Any, block_size: int, rows: int) -> StreamedBlocks:
    """The training rows of a streamed run: `rows` blocks at most, for this process."""
    assert cfg.data, "checked by the caller"
    held_out = not cfg.validation_data and (data.is_local(cfg.data) or "validation" not in split_names(cfg.data))
    held_below = data.split_threshold(cfg.validation_percent) if held_out else None
    return StreamedBlocks(open_stream(cfg.data, cfg), tokenizer, block_size, held_below, rows)
