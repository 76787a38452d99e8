"""Tokenizing: documents to token ids, in batches, here or in forked worker processes; long documents in
pieces whose ids are joined; streams joined with EOS."""

from __future__ import annotations

import hashlib
import itertools
import multiprocessing
import os
import re
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmtune.data.types import CHUNK
from lmtune.events import Report

# A tokenizer call takes at most CHUNK documents (or pieces of one) and about BATCH_CHARS characters: enough
# for the Rust tokenizer, little enough to report progress and heed Ctrl-C every second or two and to bound
# memory (it holds ~280 bytes per token while it works: one 50 MiB line tokenized whole peaked at 11.7 GB).
BATCH_CHARS = 1_000_000
# A document longer than this is tokenized in pieces of about this many characters, their ids joined (one
# 50 MiB line: 11.7 GB and 2m45s whole, 1.45 GB and 38 s in pieces, the same ids). 100k characters is
# ~25k GPT-2 tokens, so almost every document is tokenized whole.
MAX_PIECE_CHARS = 100_000
# Where a long document may be cut: one whitespace character between two others (see `cuts`).
CUT = re.compile(r"(?<=\S)\s(?=\S)")


def tokenizer_fingerprint(tokenizer: Any, template: bool = True) -> str:
    """What decides a tokenizer's tokens: its vocabulary and rules, its EOS, and (template: for chat data) its
    chat template; text data is the same tokens whatever the template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    chat_template = getattr(tokenizer, "chat_template", None) if template else None
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}|{chat_template}".encode()).hexdigest()


def tokenize(
    docs: Sequence[str], tokenizer: Any, report: Report, what: str, workers: Workers | None = None
) -> list[np.ndarray]:
    """Token ids of each document, in batches (CHUNK, BATCH_CHARS): here, or in worker processes.

    A long document goes in pieces (`cuts`) whose ids are joined, so it is still one document. Progress
    counts pieces: the documents, unless some are long.
    """
    long = {i: cuts(d) for i, d in enumerate(docs) if len(d) > MAX_PIECE_CHARS}
    total = len(docs) + sum(len(c) - 2 for c in long.values())
    pieces = ((i, a, b) for i, d in enumerate(docs) for a, b in itertools.pairwise(long.get(i, (0, len(d)))))
    batches = list(piece_batches(pieces))
    texts = ([docs[i][a:b] for i, a, b in batch] for batch in batches)
    results = in_order(workers, texts) if workers else (token_ids(t, tokenizer) for t in texts)
    out: list[np.ndarray] = []
    held: list[np.ndarray] = []  # the ids of the pieces of a long document, until its last one
    done = 0
    for batch, ids in zip(batches, results, strict=True):
        for (i, _, b), x in zip(batch, ids, strict=True):
            held.append(x)
            if b == len(docs[i]):
                out.append(held[0] if len(held) == 1 else np.concatenate(held))
                held = []
        done += len(batch)
        report({"event": "phase", "phase": f"tokenizing {what}", "done": done, "total": total})
    return out


def piece_batches(pieces: Iterable[tuple[int, int, int]]) -> Iterator[list[tuple[int, int, int]]]:
    """(document, start, end) pieces in batches of at most CHUNK pieces and about BATCH_CHARS characters."""
    batch: list[tuple[int, int, int]] = []
    chars = 0
    for i, a, b in pieces:
        batch.append((i, a, b))
        chars += b - a
        if len(batch) >= CHUNK or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# The tokenizer of a worker process: its parent sets it before the workers fork, so each has a copy.
_worker_tokenizer: Any = None


def token_ids(texts: list[str], tokenizer: Any = None) -> list[np.ndarray]:
    """The ids of each text (int32). The Rust tokenizer is called directly where there is one: measured here
    1.35x faster than through transformers' __call__, which builds a BatchEncoding around the same ids."""
    tok = tokenizer if tokenizer is not None else _worker_tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        lists = [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    else:
        lists = tok(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.int32) for x in lists]


def default_workers() -> int:
    """Tokenizing processes: one per core this process may use (LMTUNE_TOKENIZE_WORKERS overrides); on Linux
    only, where forking a process that runs threads (torch's, the tokenizer's) is safe for a child that only
    tokenizes (macOS's system libraries may abort such a child; Windows cannot fork)."""
    if sys.platform != "linux":
        return 1
    if os.environ.get("LMTUNE_TOKENIZE_WORKERS"):
        return max(1, int(os.environ["LMTUNE_TOKENIZE_WORKERS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Workers:
    """Forked processes that tokenize, each single-threaded."""

    pool: Any
    count: int


@contextmanager
def tokenizer_pool(tokenizer: Any, workers: int) -> Iterator[Workers | None]:
    """`workers` forked processes that tokenize; None for one: tokenize here (the Rust tokenizer's threads)."""
    global _worker_tokenizer
    if workers <= 1 or getattr(tokenizer, "backend_tokenizer", None) is None:
        yield None
        return
    _worker_tokenizer = tokenizer
    # The workers are forked with SIGTERM at its default action, which their initializer keeps: one stuck
    # before it ran (on a lock another thread held at the fork) would otherwise keep a run's Python handler,
    # which never runs there, and the pool's end, sending SIGTERM, would wait for it forever.
    term = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=quiet_worker)
    finally:
        signal.signal(signal.SIGTERM, term)
    try:
        with pool:
            yield Workers(pool, workers)  # leaving the block terminates them, on an error or Ctrl-C too
    finally:
        _worker_tokenizer = None


def quiet_worker() -> None:
    """A worker leaves Ctrl-C to its parent, which stops it with SIGTERM (the parent's own handlers, inherited
    by the fork, would keep it alive), and uses one thread: its siblings use the other cores."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def in_order(workers: Workers, batches: Iterable[list[str]]) -> Iterator[list[np.ndarray]]:
    """token_ids of each batch from the workers, in order, with two batches per worker in flight (Pool.imap
    would queue every batch at once, and with them the whole text)."""
    pending: deque[Any] = deque()
    for texts in batches:
        pending.append(workers.pool.apply_async(token_ids, (texts,)))
        if len(pending) >= 2 * workers.count:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def cuts(doc: str) -> list[int]:
    """Where to cut a long document into pieces of about MAX_PIECE_CHARS: [0, ..., len(doc)].

    A cut falls just before one whitespace character between two others ("word| word"), where byte-level
    pre-tokenizers split the text anyway: GPT-2's and Llama 3's regexes both start a token at a space,
    newline or tab that follows a non-space, so the joined ids are exactly those of the whole document
    (checked on 50 MiB of WikiText in one line). A run of spaces is never cut: GPT-2 splits "a   b" as "a",
    "  ", " b", which a cut could change. Text with no such character for MAX_PIECE_CHARS (a blob of
    data, a script written without spaces) is cut mid-word, and the tokens at that cut may differ. A
    tokenizer that prepends "▁" to every text it is given (Llama 2's tokenizer.json does, in its
    normalizer) may add a token at each cut.
    """
    out = [0]
    while len(doc) - out[-1] > MAX_PIECE_CHARS:
        target = out[-1] + MAX_PIECE_CHARS
        found = CUT.search(doc, target, target + MAX_PIECE_CHARS)
        out.append(found.start() if found else target)
    return [*out, len(doc)]


def join(docs: list[np.ndarray], eos: int, dtype: Any) -> np.ndarray:
    """One stream: each document followed by EOS, so the model learns where documents end."""
    if not docs:
        return np.zeros(0, dtype=dtype)
    eos_arr = np.array([eos], dtype=docs[0].dtype)
    return np.concatenate([x for d in docs for x in (d, eos_arr)]).astype(dtype, copy=False)


def token_dtype(tokenizer: Any) -> Any:
    """uint16 halves the memory and disk of a stream whenever the vocabulary fits (GPT-2's 50,257 does)."""
    return np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32
