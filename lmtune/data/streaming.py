"""--streaming: data too large to download, read as a stream (the datasets library's IterableDataset) and
tokenized as training takes its blocks.

The training rows are blocks of text packed from each source's stream in its order, skipping the documents
the hash split holds out (when the plan holds them out), so they are the blocks prepared data of the same
documents would give, unshuffled. Several sources are interleaved by weight, a block at a time. A stream
that ends is read again from its start, so the run always takes its --max-steps steps. Validation is where
the plan says: validation data of the source's own, its validation split (a local folder's validation files
whole, as without --streaming; the first VALIDATION_DOCUMENTS of a hub dataset's), or the held-out documents
among the stream's first ones. A resumed run takes the same blocks in the same order: the loop skips the
batches it had trained on, which reads and tokenizes that part of the stream again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

import lmtune.data.sources as sources
from lmtune.data.chat import encode as encode_documents
from lmtune.data.chat import has_text
from lmtune.data.prepared import eval_split
from lmtune.data.split import content_hash, split_threshold
from lmtune.data.tokens import join, token_dtype, tokenize
from lmtune.data.types import CHUNK, Corpus, DataPlan, Source, SourcePlan, Split, log
from lmtune.errors import LmtuneError, first_line
from lmtune.events import Report, silent

VALIDATION_DOCUMENTS = 1000  # documents evaluated on; enough for a stable loss, read before training starts
SCAN_DOCUMENTS = 200_000  # documents of the stream read at most to find held-out ones for validation

Row = tuple[torch.Tensor, torch.Tensor, None]  # (T,) inputs, labels; no position ids (plain blocks)


def open_stream(src: SourcePlan, split: str = "train") -> Source:
    """A split of a hub dataset or of local files as a stream of texts: nothing is downloaded ahead. A local
    folder's split is its files named for it, as without --streaming."""
    import datasets

    if sources.is_local(src.data):
        files = [
            f for f in sources.local_files(src.data) if not Path(src.data).is_dir() or sources.split_of(f) == split
        ]
        if sources.FORMATS[files[0].suffix.lower()] == "text":  # read a piece at a time already
            return sources.file_source(files, src.data, src)
        kind, options = sources.FORMATS[files[0].suffix.lower()], {"data_files": [str(f) for f in files]}
        name, config, split = kind, None, "train"
    else:
        (name, config), options = sources.hub_name(src.data), {}
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True, **options)
    except Exception as err:  # datasets raises many types for "not there"; all mean the same to a user
        raise LmtuneError(f"cannot stream `{src.data}` ({first_line(err)}); check the name and your network") from None
    columns = list(ds.column_names or [])
    if (fmt := sources.data_format(columns, src, src.data)) != "text":
        raise LmtuneError(f"--streaming reads text data; prepare {fmt} data (lmtune prepare) instead")
    if src.text_column not in columns:
        raise LmtuneError(
            f"{src.data} has no column `{src.text_column}`; it has {', '.join(columns)}. Pass --text-column"
        )

    def read() -> Iterator[tuple[list[Any], int]]:
        rows = 0
        for batch in ds.select_columns([src.text_column]).iter(batch_size=CHUNK):
            rows += len(batch[src.text_column])
            yield [t or "" for t in batch[src.text_column]], rows

    return Source(src.data, "text", 0, "rows", read)


class StreamedBlocks(IterableDataset):  # type: ignore[type-arg]
    """Blocks of `block_size` tokens packed from each source's stream, each document followed by EOS, tokenized a
    CHUNK of documents at a time as they are taken; documents the hash split holds out are skipped. Several
    sources take turns by weight (a weighted round robin: the one furthest below its share goes next)."""

    def __init__(self, plan: DataPlan, tokenizer: Any, block_size: int, rows: int):
        self.plan, self.tokenizer, self.block_size, self.rows = plan, tokenizer, block_size, rows

    def __len__(self) -> int:
        return self.rows  # what the run takes: the loop counts its batches by it

    def __iter__(self) -> Iterator[Row]:
        streams = [self.blocks(src) for src in self.plan.sources]
        weights = [src.weight or 1.0 for src in self.plan.sources]
        taken = [0] * len(streams)
        while True:
            i = min(range(len(streams)), key=lambda k: (taken[k] / weights[k], k))
            taken[i] += 1
            ids = torch.from_numpy(next(streams[i]).astype(np.int64))
            yield ids, ids, None

    def blocks(self, src: SourcePlan) -> Iterator[np.ndarray]:
        """The blocks of one source's stream, read again from its start each time it ends."""
        held_below = split_threshold(src.validation_percent) if src.validation == "held_out" else None
        eos, dtype = self.tokenizer.eos_token_id, token_dtype(self.tokenizer)
        passes = 0
        while True:
            passes += 1
            if passes > 1:
                log.warning(
                    "the stream of %s ended before the run's last step; reading it again from its start (pass %d)",
                    src.name,
                    passes,
                )
            carry = np.zeros(0, dtype)  # tokens after the last full block
            found = False
            for docs, _ in open_stream(src).read():
                kept = [d for d in docs if has_text(d)]
                if held_below is not None:
                    kept = [d for d in kept if content_hash(d) >= held_below]
                if not kept:
                    continue
                carry = np.concatenate([carry, join(tokenize(kept, self.tokenizer, silent, "stream"), eos, dtype)])
                full = len(carry) // self.block_size * self.block_size
                for start in range(0, full, self.block_size):
                    found = True
                    yield carry[start : start + self.block_size]
                carry = carry[full:]
            if not found:
                raise LmtuneError(
                    f"the stream of {src.data} holds no block of {self.block_size} tokens to train on; pass a smaller "
                    "--block-size or more data"
                )


def validation_corpora(plan: DataPlan, tokenizer: Any, report: Report) -> list[Corpus]:
    """Each source's validation split, as a Corpus with an empty training split (the stream is read as training
    goes)."""
    return [corpus_of(validation_of(src, tokenizer, report), src) for src in plan.sources]


def validation_of(src: SourcePlan, tokenizer: Any, report: Report) -> tuple[Split, str]:
    if src.validation == "data":
        assert src.validation_data, "the plan names it"
        return eval_split(src.validation_data, src, tokenizer, report), src.validation_data
    if src.validation == "split" and sources.is_local(src.data):  # the folder's validation files, whole
        docs = [d for docs, _ in sources.sources(src.data, src)["validation"].read() for d in docs if has_text(d)]
        return encode(docs, tokenizer, report), src.describe_validation()
    if src.validation == "split":
        docs = first_documents(open_stream(src, "validation"), VALIDATION_DOCUMENTS, None)
        return encode(docs, tokenizer, report), f"{src.describe_validation()} (the first {len(docs):,} documents)"
    threshold = split_threshold(src.validation_percent)
    docs = first_documents(open_stream(src), VALIDATION_DOCUMENTS, threshold)
    if not docs:
        raise LmtuneError(
            f"none of the first {SCAN_DOCUMENTS:,} documents of {src.data} is held out for validation; "
            "pass --validation-data or a larger --validation-percent"
        )
    return encode(docs, tokenizer, report), f"{src.describe_validation()} (the first {len(docs):,})"


def first_documents(source: Source, wanted: int, held_below: int | None) -> list[str]:
    """The first `wanted` non-empty documents of a stream (those the hash split holds out, with `held_below`),
    reading at most SCAN_DOCUMENTS."""
    out: list[str] = []
    read = 0
    for docs, _ in source.read():
        for d in docs:
            read += 1
            if has_text(d) and (held_below is None or content_hash(d) < held_below):
                out.append(d)
            if len(out) == wanted or read >= SCAN_DOCUMENTS:
                return out
    return out


def encode(docs: list[str], tokenizer: Any, report: Report) -> Split:
    if not docs:
        raise LmtuneError("the validation data holds no text")
    encoded = encode_documents(docs, tokenizer, report, "validation data")
    return encoded.split(range(len(docs)), tokenizer.eos_token_id, token_dtype(tokenizer))


def corpus_of(validation: tuple[Split, str], src: SourcePlan) -> Corpus:
    empty = Split(np.zeros(0, np.int32), 0, 0)
    return Corpus(empty, validation[0], validation[1], 0, cached=False)
