"""Token streams on disk and their cache.

Each split's stream is written to disk as it grows, one group of documents at a time, so memory holds one
group whatever the size of the data. The folder is written beside its place and renamed (atomic.py): Ctrl-C,
a crash or a full disk leaves no half-written cache entry or prepared folder, and the next run starts over.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmtune import atomic
from lmtune.data.chat import encode, has_text
from lmtune.data.sources import Source, eval_source, identity, sources, train_split
from lmtune.data.split import content_hash, document_length, overlap_warning, split_threshold
from lmtune.data.tokens import Workers, token_dtype, tokenizer_fingerprint, tokenizer_pool
from lmtune.data.types import RENDERED, Corpus, SourcePlan, Split
from lmtune.errors import LmtuneError, first_line
from lmtune.events import Report, silent

# Bump when the cached token format, the way documents are joined or the split changes (3: checksums; 4: the
# held-out documents chosen by a hash of their content, streams written as they grow; 5: one entry per source
# of the data plan, a .txt file's byte-order mark not read as text).
CACHE_VERSION = 5

HEADER = 128  # bytes of a 1-D .npy header of any length: numpy pads it so that the array can grow in place


def npy_header(dtype: Any, length: int) -> bytes:
    out = io.BytesIO()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
    np.lib.format.write_array_header_1_0(out, header)
    assert len(out.getvalue()) == HEADER, "numpy pads a 1-D header to a fixed size"
    return out.getvalue()


class Stream:
    """One split's token stream as it is written: NAME.npy (ids) and, for chat data, NAME.mask.npy (True on
    response tokens) and NAME.starts.npy (where each conversation starts, then the length). Each .npy
    header is written with its length when the stream is closed."""

    def __init__(self, folder: Path, name: str, dtype: Any, chat: bool):
        self.name, self.chat = name, chat
        self.paths = {"ids": folder / f"{name}.npy"}
        self.dtypes = {"ids": np.dtype(dtype), "mask": np.dtype(bool), "starts": np.dtype(np.int64)}
        if chat:
            self.paths |= {"mask": folder / f"{name}.mask.npy", "starts": folder / f"{name}.starts.npy"}
        self.files = {kind: path.open("w+b") for kind, path in self.paths.items()}
        self.reset()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()

    def reset(self) -> None:
        """Empty again (a second pass over the data starts over)."""
        self.documents = self.tokens = self.bytes = 0
        for f in self.files.values():
            f.seek(0)
            f.truncate()
            f.write(bytes(HEADER))
        if self.chat:
            self.files["starts"].write(np.zeros(1, np.int64).data)

    def add(self, split: Split) -> None:
        """Append documents (a Split of them: its ids, and for chat its mask and starts)."""
        self.files["ids"].write(np.ascontiguousarray(split.ids, self.dtypes["ids"]).data)
        if self.chat and split.mask is not None and split.starts is not None:
            self.files["mask"].write(np.ascontiguousarray(split.mask).data)
            self.files["starts"].write(np.ascontiguousarray(split.starts[1:] + self.tokens, np.int64).data)
        self.documents += split.documents
        self.tokens += len(split.ids)
        self.bytes += split.bytes

    def read_back(self) -> np.ndarray:
        """The ids written so far (for one document, split by its tokens)."""
        self.files["ids"].flush()
        return np.fromfile(self.paths["ids"], dtype=self.dtypes["ids"], offset=HEADER)

    def close(self) -> dict[str, int]:
        """Write each file's header with its length; returns the counts for meta.json."""
        lengths = {"ids": self.tokens, "mask": self.tokens, "starts": self.documents + 1}
        for kind, f in self.files.items():
            f.seek(0)
            f.write(npy_header(self.dtypes[kind], lengths[kind]))
            f.close()
        return {"documents": self.documents, "bytes": self.bytes, "tokens": self.tokens}


@dataclass
class Tally:
    """What one pass over a split's documents found."""

    documents: int = 0  # non-empty documents
    empty: int = 0  # empty or blank ones (chat: conversations without a response), skipped
    lowest: int = 2**64  # the lowest content hash
    hashes: list[np.ndarray] = field(default_factory=list)  # each document's content hash, when asked to keep them
    lengths: list[np.ndarray] = field(default_factory=list)  # and its characters
    found: set[int] = field(default_factory=set)  # hashes it shares with the documents it was checked against


def tokenize_split(
    source: Source,
    what: str,
    to_validation: Callable[[np.ndarray], np.ndarray],
    streams: dict[str, Stream],
    tokenizer: Any,
    workers: Workers | None,
    report: Report,
    keep: bool = False,
    against: np.ndarray | None = None,
) -> Tally:
    """Tokenize a split's documents a group at a time onto the end of streams["train"], or of
    streams["validation"] for those `to_validation(hashes)` marks. keep: keep their hashes and lengths;
    against: find which of these hashes they have too."""
    tally = Tally()
    eos, dtype = tokenizer.eos_token_id, streams["train"].dtypes["ids"]
    # Bytes read as the display's unit: MB, or KB for a file under 10 MB (whose MB would show as 0/0).
    unit, scale = (source.unit, 1) if source.unit != "MB" else ("MB", 10**6) if source.total >= 10**7 else ("KB", 1000)
    start, tokens = time.perf_counter(), 0
    for docs, done in source.groups():
        kept = [d for d in docs if has_text(d)]
        tally.empty += len(docs) - len(kept)
        if kept:
            hashes = np.fromiter(map(content_hash, kept), np.uint64, len(kept))
            tally.documents += len(kept)
            tally.lowest = min(tally.lowest, int(hashes.min()))
            if keep:
                tally.hashes.append(hashes)
                tally.lengths.append(np.fromiter(map(document_length, kept), np.int64, len(kept)))
            if against is not None:
                tally.found.update(hashes[np.isin(hashes, against)].tolist())
            encoded = encode(kept, tokenizer, silent, what, workers)
            held = to_validation(hashes)
            for name, which in (("train", ~held), ("validation", held)):
                if which.any():
                    split = encoded.split(np.flatnonzero(which).tolist(), eos, dtype)
                    streams[name].add(split)
                    tokens += len(split.ids)
        rate = tokens / max(time.perf_counter() - start, 1e-9)
        report({
            "event": "phase", "phase": f"tokenizing {what}, {unit}", "done": done // scale,
            "total": source.total // scale, "info": f"{rate / 1e6:.2f}M tokens/s",
        })  # fmt: skip
    return tally


def write_streams(src: SourcePlan, tokenizer: Any, report: Report, folder: Path, workers: int, key: str) -> None:
    """Tokenize one source (and its validation data, from where the plan says) into token streams in the empty
    `folder`, with meta.json (counts, each file's size and checksum, the tokenizer's fingerprint, `key`). Memory
    does not grow with the data."""
    report({"event": "phase", "phase": f"reading {src.data}"})
    splits = sources(src.data, src)
    train = train_split(splits, src.data)
    val: Source | None = None
    where = ""
    source = src.describe_validation()
    if src.validation == "data":
        assert src.validation_data, "the plan names it"
        val, where = eval_source(src.validation_data, src), f"--validation-data {src.validation_data}"
    elif src.validation == "split":
        val, where = splits["validation"], f"validation: {source}"
    chat = train.format in RENDERED  # chat or preference pairs: rendered, stored with their masks
    if val is not None and val.format != train.format:
        kinds = {"text": "plain text", "chat": "chat", "preference": "preference pairs"}
        raise LmtuneError(
            f"the training data is {kinds[train.format]} but the validation data ({source}) is {kinds[val.format]}"
        )
    fingerprint = tokenizer_fingerprint(tokenizer)  # before chat data gives it a template
    warning = None
    with ExitStack() as stack:
        # Chat data is rendered with its template and tokenized here; it is rarely large.
        pool = None if chat else stack.enter_context(tokenizer_pool(tokenizer, workers))
        streams = {
            name: stack.enter_context(Stream(folder, name, token_dtype(tokenizer), chat))
            for name in ("train", "validation")
        }

        def run(source: Source, what: str, to_validation: Callable[[np.ndarray], np.ndarray], **kw: Any) -> Tally:
            return tokenize_split(source, what, to_validation, streams, tokenizer, pool, report, **kw)

        if val is not None:
            v = run(val, "validation data", lambda h: np.ones(len(h), bool), keep=True)
            hashes = np.concatenate(v.hashes) if v.hashes else np.zeros(0, np.uint64)
            t = run(train, "training data", lambda h: np.zeros(len(h), bool), against=hashes)
            if t.found:
                repeated = np.isin(hashes, np.fromiter(t.found, np.uint64, len(t.found)))
                lengths = np.concatenate(v.lengths)
                share = lengths[repeated].sum() / max(1, lengths.sum())
                warning = overlap_warning(int(repeated.sum()), len(hashes), share, f"--data {src.data}, {where}")
        else:
            threshold = split_threshold(src.validation_percent)
            t = run(train, "training data", lambda h: h < np.uint64(threshold))
            lowest = t.lowest
            if t.documents >= 2 and not streams["validation"].documents:
                # No hash fell under the threshold (little data): hold out the document with the lowest.
                for s in streams.values():
                    s.reset()
                t = run(train, "training data", lambda h: h <= np.uint64(lowest))
            elif t.documents == 1 and not chat:
                # One document (a single file read whole): hold out its last tokens instead.
                hold_out_the_tail(streams, src.validation_percent)
                source = f"the last {src.validation_percent:g}% of the tokens of {src.data}, held out"
        if not t.documents:
            what = {"chat": "0 conversations with a response", "text": "0 non-empty documents"}.get(
                train.format, f"0 good preference pairs of {t.empty:,}: each lacks a side or has chosen = rejected"
            )
            raise LmtuneError(f"{src.data} holds no text ({what})")
        if chat and val is None and t.documents == 1:
            raise LmtuneError(f"{src.data} holds one conversation; pass --validation-data or more conversations")
        if not streams["validation"].documents:
            raise LmtuneError(f"validation data from {source} holds no text")
        if not streams["train"].documents:  # every document went to validation: they are all one text
            raise LmtuneError(
                f"every document of {src.data} is the same text ({t.documents:,} copies), so the held-out share "
                "holds out all of them and leaves nothing to train on; pass --validation-data, or varied documents"
            )
        counts = {name: s.close() for name, s in streams.items()}
    meta = {
        "key": key,  # the cache key: a prepared folder with the same one need not be prepared again
        "validation_source": source,
        "empty_documents": t.empty,
        "format": train.format,
        "overlap_warning": warning,
        # The tokenizer as it was, and (chat) with the template it was given: either reads these tokens.
        # Text: any template (a chat source mixed in may have given it one).
        "tokenizer": sorted({fingerprint, tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(tokenizer, chat)}),
        "data": {key: getattr(src, key) for key in SOURCE_KEYS},
        "files": {p.name: {"bytes": p.stat().st_size, "sha256": checksum(p)} for p in sorted(folder.glob("*.npy"))},
        **counts,
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


# The settings that decide a prepared folder's tokens, besides the tokenizer.
SOURCE_KEYS = ("data", "validation_data", "text_column", "data_format", "validation_percent", "txt_documents")


def hold_out_the_tail(streams: dict[str, Stream], percent: float) -> None:
    """A single document: the last `percent` of its tokens (at least one) become the validation split."""
    written = streams["train"] if streams["train"].documents else streams["validation"]
    ids, nbytes = written.read_back(), written.bytes
    for s in streams.values():
        s.reset()
    cut = len(ids) - max(1, round(len(ids) * percent / 100))
    train_bytes = round(nbytes * cut / len(ids))
    streams["train"].add(Split(ids[:cut], 1, train_bytes))
    streams["validation"].add(Split(ids[cut:], 1, nbytes - train_bytes))


# --- the token cache ----------------------------------------------------------------------------


def cache_key(src: SourcePlan, tokenizer: Any) -> str:
    """What decides a source's tokens: the data (files by path, size and mtime), where its validation comes
    from, the settings that read it, and the tokenizer."""
    key_parts = [
        CACHE_VERSION,
        identity(src.data),
        identity(src.validation_data),
        src.validation,
        src.text_column,
        src.txt_documents,
        src.validation_percent,
        src.data_format,
        tokenizer_fingerprint(tokenizer, template=src.data_format in RENDERED),
    ]
    return hashlib.sha256(json.dumps(key_parts, default=str).encode()).hexdigest()[:24]


def write_folder(
    src: SourcePlan,
    tokenizer: Any,
    report: Report,
    folder: Path,
    workers: int,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """write_streams into `folder`, written beside it and renamed: an interruption or a full disk leaves nothing."""
    key = cache_key(src, tokenizer)  # before chat data gives the tokenizer a template
    try:
        with atomic.written_beside(folder, folder=True) as tmp:
            write_streams(src, tokenizer, report, tmp, workers, key)
            if extra:
                extra(tmp)
    except OSError as err:  # a full disk, mostly; or a file that cannot be read or written, named
        where = f" ({err.filename})" if err.filename else ""
        raise LmtuneError(
            f"could not write the tokens of {src.data} in {folder}: {err.strerror or first_line(err)}{where}; nothing "
            "partial was left (free some space, or write elsewhere: LMTUNE_HOME, or lmtune prepare --output)"
        ) from None


class DamagedCache(Exception):
    """A token cache entry that is not what was written; the message says which file and how."""


def checksum(path: Path) -> str:
    """sha256 of a file's bytes, read in pieces (never the whole file in memory).

    Every cached run checks every file in full, as a sampled check would miss a damaged page in the
    middle, the one damage that trains silently. Measured on this project's 2-core EPYC, hashing 100M
    uint16 tokens (200 MB): sha256 0.11 s (the CPU's SHA instructions, as on most x86 since 2017 and
    ARMv8), blake2b 0.16 s, crc32 0.07 s; read_cache checks such an entry in 0.16 s, and a billion tokens
    in a second or two, which took many minutes to tokenize and take hours to train on.
    """
    digest = hashlib.sha256()  # (hashlib.file_digest would do this, from Python 3.11)
    with path.open("rb") as f:
        while piece := f.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def read_cache(folder: Path) -> Corpus:
    """A cache entry or prepared folder, memory-mapped, after checking each file's size, checksum and length
    against meta.json."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        files = {file: (int(v["bytes"]), str(v["sha256"])) for file, v in meta["files"].items()}
        chat = meta["format"] in RENDERED
        counts = {name: (meta[name]["tokens"], meta[name]["documents"]) for name in ("train", "validation")}
    except KeyError as err:
        raise DamagedCache(f"meta.json: no {err}") from None
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise DamagedCache(f"meta.json: {first_line(err)}") from None
    for file, (size, digest) in files.items():
        if not (folder / file).is_file():
            raise DamagedCache(f"{file}: missing")
        if (folder / file).stat().st_size != size:
            raise DamagedCache(f"{file}: {(folder / file).stat().st_size:,} bytes, {size:,} when written")
        if checksum(folder / file) != digest:
            raise DamagedCache(f"{file}: its bytes differ from those written (sha256)")

    def load(file: str, length: int, mmap: bool = False) -> np.ndarray:
        if file not in files:
            raise DamagedCache(f"{file}: not listed in meta.json")
        array = np.load(folder / file, mmap_mode="r" if mmap else None)
        if len(array) != length:  # the checksum covers the bytes; this catches a meta.json out of step
            raise DamagedCache(f"{file}: {len(array):,} entries, meta.json says {length:,}")
        return array

    splits = {}
    for name, (tokens, documents) in counts.items():
        splits[name] = Split(
            load(f"{name}.npy", tokens, mmap=True),  # mapped, not read: a large stream costs no memory
            documents,
            meta[name]["bytes"],
            load(f"{name}.mask.npy", tokens) if chat else None,
            load(f"{name}.starts.npy", documents + 1) if chat else None,
        )
    return Corpus(
        splits["train"], splits["validation"], meta["validation_source"], meta["empty_documents"], True,
        meta["format"], meta["overlap_warning"],
    )  # fmt: skip


# A prepared folder: a cache entry written where the user says, with the tokenizer it was made with.
