"""Training text: read documents, tokenize them once into token streams on disk (the verified cache, or a
folder written by `lmtune prepare`), each document followed by EOS, in memory that does not grow with the data."""

from __future__ import annotations

import codecs
import functools
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lmtune import atomic
from lmtune.config import Config
from lmtune.errors import LmtuneError, first_line
from lmtune.events import Report, silent
from lmtune.runs import home

log = logging.getLogger("lmtune")

ALIASES = {"wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1")}
LOCAL_TYPES = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Bump when the cached token format, the way documents are joined or the split changes (3: checksums; 4: the
# held-out documents chosen by a hash of their content, streams written as they grow).
CACHE_VERSION = 4
SPLIT_SEED = 0  # the held-out documents depend on the data only, so every run compares on the same ones
# The share of the validation text (in characters) that, when it repeats training documents, makes the
# overlap a warning rather than a note: below it, the repeats are short lines such as headings (WikiText-2's
# test split repeats 200 of its validation split's 1,160 paragraphs, all headings, 0.4% of its text).
OVERLAP_WARNING = 0.01
# A tokenizer call takes at most CHUNK documents (or pieces of one) and about BATCH_CHARS characters: enough
# for the Rust tokenizer, little enough to report progress and heed Ctrl-C every second or two and to bound
# memory (it holds ~280 bytes per token while it works: one 50 MiB line tokenized whole peaked at 11.7 GB).
CHUNK = 1000
BATCH_CHARS = 1_000_000
# A document longer than this is tokenized in pieces of about this many characters, their ids joined (one
# 50 MiB line: 11.7 GB and 2m45s whole, 1.45 GB and 38 s in pieces, the same ids). 100k characters is
# ~25k GPT-2 tokens, so almost every document is tokenized whole.
MAX_PIECE_CHARS = 100_000
# Where a long document may be cut: one whitespace character between two others (see `cuts`).
CUT = re.compile(r"(?<=\S)\s(?=\S)")
# Documents are read, tokenized and written a group of about this many characters at a time: what memory
# holds of the data at once, whatever its size (with 2 workers each gets a few BATCH_CHARS batches).
GROUP_CHARS = 8_000_000
# A .txt file is read this many characters at a time; the text after its last document boundary is carried over.
READ_CHARS = 4_000_000
PARAGRAPH_END = re.compile(r"\n[ \t]*\n")  # a blank line, one holding only spaces too (WikiText's are " \n")


@dataclass
class Split:
    """One split as a single token stream: each document followed by EOS.

    Chat data adds `mask` and `starts`: its examples are scored and trained on one by one, and only
    the response tokens count.
    """

    ids: np.ndarray  # (N,) token ids, uint16 or int32; a memory map when read from disk
    documents: int
    bytes: int  # UTF-8 bytes of the scored text (all of it; for chat, the responses), for bits per byte
    mask: np.ndarray | None = None  # (N,) bool: True on response tokens (chat only)
    starts: np.ndarray | None = None  # (documents + 1,) where each example starts in `ids`, then N (chat only)


@dataclass
class Corpus:
    train: Split
    validation: Split
    validation_source: str  # where validation came from, said in the logs and the summary
    empty_documents: int  # empty or blank documents (chat: conversations without a response) skipped
    cached: bool
    format: str = "text"  # "text" or "chat"
    overlap_warning: str | None = None  # validation documents that are training documents too; said every run


# --- reading documents ------------------------------------------------------------------------
#
# A split's documents are a `Source`: read in groups as they are tokenized, never all at once. A .txt file
# is read a piece at a time; tables (.jsonl, .csv, .parquet, hub datasets) are the datasets library's
# memory-mapped Arrow tables, iterated in batches of rows.


def is_local(spec: str) -> bool:
    return (
        Path(spec).expanduser().exists() or Path(spec).suffix.lower() in LOCAL_TYPES or spec.startswith((".", "/", "~"))
    )


def local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if not path.exists():
        raise LmtuneError(
            f"no such file: {spec}; pass a .txt, .jsonl, .json, .csv or .parquet file, a folder, or a hub dataset name"
        )
    files = [p for p in folder_files(path) if p.suffix.lower() in LOCAL_TYPES] if path.is_dir() else [path]
    if not files:
        raise LmtuneError(f"folder {spec} holds no .txt, .jsonl, .json, .csv or .parquet files")
    kinds = {LOCAL_TYPES.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise LmtuneError(f"cannot read {spec}: lmtune reads .txt, .jsonl, .json, .csv and .parquet files")
    if len(kinds) > 1:
        raise LmtuneError(
            f"folder {spec} mixes file types ({', '.join(sorted(k for k in kinds if k))}); keep one type per folder"
        )
    return files


def folder_files(folder: Path) -> list[Path]:
    """Every file in a folder and below, sorted, as the datasets library chooses them: not hidden ones.

    Skipped below the folder: names starting with "." (.ipynb_checkpoints/ holds copies of the data,
    .git/ its history) or folders starting with "__" (__MACOSX/ from unzipping). Linked folders are
    followed (Python 3.11's Path.rglob does not enter them), each real folder once, so a link to a folder
    above ends instead of looping and two links to one folder do not read it twice.
    """
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.stat(root)
        if (real.st_dev, real.st_ino) in seen:
            dirs.clear()
            continue
        seen.add((real.st_dev, real.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))  # sorted: the same link wins each time
        files += [Path(root, n) for n in names if not n.startswith(".") and Path(root, n).is_file()]
    return sorted(files)


def split_txt(text: str, mode: str) -> list[str]:
    if mode == "file":
        return [text]
    if mode == "line":
        return text.splitlines()
    # Paragraphs end at a blank line, one holding only spaces too (WikiText's are " \n").
    return re.split(r"\n[ \t]*\n", text)


Conversation = list[dict[str, str]]  # [{"role": "user", "content": "..."}, {"role": "assistant", ...}]
Documents = Sequence[str | Conversation]  # texts, or (chat) conversations
ROLES = ("system", "user", "assistant")


def data_format(columns: list[str], cfg: Config, source: str) -> str:
    """text or chat: chat when asked, or (auto) when the data has `messages` or `prompt` and `response` columns."""
    has_chat = "messages" in columns or {"prompt", "response"} <= set(columns)
    if cfg.data_format == "chat" and not has_chat:
        raise LmtuneError(
            f"{source} has no `messages` column and no `prompt` and `response` columns, which chat data needs; "
            f"it has {', '.join(columns)}"
        )
    return "chat" if cfg.data_format == "chat" or (cfg.data_format == "auto" and has_chat) else "text"


def check_conversation(messages: Any, source: str, row: int) -> Conversation:
    """A list of {role, content} messages with known roles and text content, or a clear error naming the row."""
    if not isinstance(messages, list) or not messages:
        raise LmtuneError(f"{source} row {row}: `messages` must be a non-empty list of {{role, content}} objects")
    out = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str | None):
            raise LmtuneError(
                f"{source} row {row}: each message needs a role ({', '.join(ROLES)}) and text content, got {m!r:.80}"
            )
        out.append({"role": m["role"], "content": m["content"] or ""})
    return out


@functools.cache
def _hub_dataset(name: str, config: str | None) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, config)
    except Exception as err:  # datasets raises many types for "not there"; all mean the same to a user
        first = first_line(err)
        raise LmtuneError(
            f"cannot load hub dataset `{name}{':' + config if config else ''}` ({first}); "
            "check the name and your network, or pass a local file"
        ) from None


def hub_name(spec: str) -> tuple[str, str | None]:
    if spec in ALIASES:
        return ALIASES[spec]
    name, _, config = spec.partition(":")
    return name, config or None


def split_of(path: Path) -> str:
    """The split a file in a data folder belongs to, by its name, as the datasets library does it."""
    if re.search(r"(^|[-_.])(validation|valid|val|dev)([-_.]|$)", path.stem, re.IGNORECASE):
        return "validation"
    if re.search(r"(^|[-_.])test([-_.]|$)", path.stem, re.IGNORECASE):
        return "test"
    return "train"


@dataclass
class Source:
    """One split's documents, read in groups (with how far the reading got, for progress) when iterated."""

    name: str  # the file, folder or dataset (and split), for messages
    format: str  # "text" or "chat"
    total: int  # its size, for progress: bytes of text files, rows of tables
    unit: str  # "MB" or "rows"
    read: Callable[[], Iterator[tuple[list[Any], int]]]  # (documents, bytes or rows read so far); can be called again

    def groups(self) -> Iterator[tuple[list[Any], int]]:
        """The documents in groups of about GROUP_CHARS characters (one long document may be a group alone)."""
        group: list[Any] = []
        chars = 0
        for docs, done in self.read():
            for d in docs:
                group.append(d)
                chars += len(d) if isinstance(d, str) else sum(len(m["content"]) for m in d)
                if chars >= GROUP_CHARS:
                    yield group, done
                    group, chars = [], 0
        yield group, self.total


def sources(spec: str, cfg: Config) -> dict[str, Source]:
    """Each split's documents. A file is one split, 'train'; a folder's files named like validation/valid/val/dev
    or test form those splits; hub datasets have their own."""
    if is_prepared(spec):
        raise LmtuneError(
            f"{spec} holds tokens written by lmtune prepare, not text; train on it with lmtune finetune MODEL --data "
            f"{spec} (a new model: --tokenizer {Path(spec) / PREPARED_TOKENIZER})"
        )
    if not is_local(spec):
        ds = _hub_dataset(*hub_name(spec))
        return {split: table_source(ds[split], cfg, f"{spec} ({split})") for split in ds}
    files = local_files(spec)
    if len(files) == 1 and not Path(spec).expanduser().is_dir():
        return {"train": file_source(files, spec, cfg)}
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(split_of(f), []).append(f)
    return {split: file_source(group, spec, cfg) for split, group in sorted(by_split.items())}


def read_documents(spec: str, cfg: Config) -> dict[str, Documents]:
    """Every document by split, in lists: for small data (evaluation, training a tokenizer) and tests."""
    return {split: [d for docs, _ in s.read() for d in docs] for split, s in sources(spec, cfg).items()}


def file_source(files: list[Path], spec: str, cfg: Config) -> Source:
    if files[0].suffix.lower() != ".txt":
        return table_source(load_table(files, spec), cfg, spec)
    if cfg.data_format == "chat":
        raise LmtuneError(
            f"{spec} is plain text; chat data is JSONL (or a table) with `messages` or `prompt`/`response`"
        )

    def read() -> Iterator[tuple[list[str], int]]:
        before = 0
        for f in files:
            for docs, done in txt_documents(f, cfg.txt_documents):
                yield docs, before + done
            before += f.stat().st_size

    return Source(spec, "text", sum(f.stat().st_size for f in files), "MB", read)


def txt_documents(path: Path, mode: str) -> Iterator[tuple[list[str], int]]:
    """The documents of a .txt file, exactly as `split_txt` cuts the whole text, read READ_CHARS at a time,
    with the bytes read so far. Only the text after the last boundary read is carried over, so a file of any
    size is never held whole (one document is: a file read with --txt-documents file, or one huge paragraph)."""
    try:
        with path.open(encoding="utf-8") as f:  # universal newlines, as Path.read_text
            if mode == "file":
                yield [f.read()], path.stat().st_size
                return
            carry = ""
            while piece := f.read(READ_CHARS):
                docs, carry = cut_documents(carry, piece, mode)
                yield docs, f.buffer.tell()  # type: ignore[attr-defined]  # a BufferedReader: bytes read so far
            if mode == "paragraph" or carry:  # re.split always gives the text after the last boundary
                yield [carry], path.stat().st_size
    except UnicodeDecodeError as err:
        raise LmtuneError(f"{path} is not UTF-8 text ({err.reason} at byte {utf8_error_at(path)})") from None


def cut_documents(carry: str, piece: str, mode: str) -> tuple[list[str], str]:
    """The whole documents in carry + piece, and the text after them (a document that may go on).

    Paragraphs: a PARAGRAPH_END match found in the text read so far is one the whole text has too (it ends at
    its second newline), and a search that ran into the end of the text resumes with the carried text.
    Lines: the characters str.splitlines cuts at are single ones here (universal newlines made \\r\\n one \\n).
    """
    text = carry + piece
    if mode == "line":
        lines = text.splitlines()
        return (lines, "") if text[-1:] in LINE_ENDS else (lines[:-1], lines[-1])
    # Only a blank line that ends after the carried text is new: start at its last newline if only spaces follow.
    kept = carry.rstrip(" \t")
    start = len(kept) - 1 if kept.endswith("\n") else len(carry)
    docs, last = [], 0
    for m in PARAGRAPH_END.finditer(text, max(start, 0)):
        docs.append(text[last : m.start()])
        last = m.end()
    return docs, text[last:]


LINE_ENDS = frozenset("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029")  # where str.splitlines cuts


def utf8_error_at(path: Path) -> int:
    """The byte offset of the first byte that is not UTF-8 in a file, read a piece at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with path.open("rb") as f:
        while True:
            block = f.read(1 << 20)
            held = len(decoder.getstate()[0])  # bytes of a character begun in the previous block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                return offset - held + err.start
            if not block:
                return offset
            offset += len(block)


def load_table(files: list[Path], spec: str) -> Any:
    """Tabular files as one memory-mapped Arrow table (the datasets library converts them once, in its cache)."""
    import datasets

    try:
        return datasets.load_dataset(
            LOCAL_TYPES[files[0].suffix.lower()], data_files=[str(f) for f in files], split="train"
        )
    except Exception as err:
        cause = err.__cause__ or err
        first = first_line(cause)
        raise LmtuneError(f"cannot read {spec}: {bad_jsonl_line(files) or first}") from None


def table_source(ds: Any, cfg: Config, name: str) -> Source:
    """The rows of a table as texts from --text-column, or as conversations from chat columns, in batches."""
    fmt = data_format(ds.column_names, cfg, name)
    if fmt == "text":
        check_text_column(ds, cfg.text_column, name)
        columns = [cfg.text_column]
    else:
        columns = ["messages"] if "messages" in ds.column_names else ["prompt", "response"]

    def read() -> Iterator[tuple[list[Any], int]]:
        row = 0
        for batch in ds.select_columns(columns).iter(batch_size=CHUNK):
            yield [document(batch, columns, i, row + i + 1, name) for i in range(len(batch[columns[0]]))], row
            row += len(batch[columns[0]])

    return Source(name, fmt, ds.num_rows, "rows", read)


def document(batch: dict[str, list[Any]], columns: list[str], i: int, row: int, source: str) -> str | Conversation:
    """Row i of a batch: its text, or its conversation (checked, named by its row in the table)."""
    if columns == ["messages"]:
        return check_conversation(batch["messages"][i], source, row)
    if columns == ["prompt", "response"]:
        prompt, response = batch["prompt"][i], batch["response"][i]
        return check_conversation(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], source, row
        )
    return batch[columns[0]][i] or ""


def check_text_column(ds: Any, column: str, source: str) -> None:
    if column not in ds.column_names:
        raise LmtuneError(f"{source} has no column `{column}`; it has {', '.join(ds.column_names)}. Pass --text-column")
    feature = ds.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise LmtuneError(f"column `{column}` of {source} holds {feature}, not text; pass --text-column")


def bad_jsonl_line(files: list[Path]) -> str | None:
    """'FILE line N: ...' for the first line of JSON Lines that is not a JSON object (arrow counts rows from 0)."""
    for f in files:
        if f.suffix.lower() != ".jsonl":
            continue
        with f.open(encoding="utf-8", errors="replace") as lines:
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    if not isinstance(json.loads(line), dict):
                        return f"{f} line {n}: expected a JSON object"
                except json.JSONDecodeError as err:
                    return f"{f} line {n}: {err.msg}"
    return None


def train_split(splits: dict[str, Any], spec: str) -> Any:
    if "train" not in splits:
        raise LmtuneError(f"{spec} has only {' and '.join(splits)} data; training needs a `train` split or file")
    return splits["train"]


def eval_source(spec: str, cfg: Config) -> Source:
    """The documents to evaluate on: a file whole; a folder's or hub dataset's validation (else test) split."""
    splits = sources(spec, cfg)
    for name in ("validation", "test", "train"):
        if name in splits:
            return splits[name]
    return next(iter(splits.values()))


def eval_documents(spec: str, cfg: Config) -> Documents:
    return [d for docs, _ in eval_source(spec, cfg).read() for d in docs]


def identity(spec: str | None) -> Any:
    """What the data is, for the cache key: files by path, size and mtime; hub data by its fingerprint."""
    if spec is None:
        return None
    if is_local(spec):
        return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in local_files(spec)]
    ds = _hub_dataset(*hub_name(spec))
    return [spec, {split: ds[split]._fingerprint for split in ds}]


# --- tokenizing ---------------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    template = getattr(tokenizer, "chat_template", None)  # decides how chat data is written
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}|{template}".encode()).hexdigest()


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


# --- chat data ------------------------------------------------------------------------------------

# lmtune's chat template, for tokenizers without one (GPT-2's): plain headings a base model picks up
# fast. Each response ends with EOS, so the fine-tuned model learns to stop. (Changing it: bump CACHE_VERSION.)
SIMPLE_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> None:
    """The tokenizer's own chat template, or lmtune's simple one; saved with the tokenizer in the run folder."""
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SIMPLE_TEMPLATE


def render(tokenizer: Any, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template writes it, and the character spans of the responses in it.

    A response's span is what rendering it adds to the conversation before it plus the generation prompt,
    so the template's own end-of-turn marks count as part of the response, and the headings do not.
    """

    def text(msgs: Conversation, prompt: bool = False) -> str:
        out: str = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        return out

    full = text(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = text(messages[:i], prompt=True) if i else ""
        upto = text(messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            raise LmtuneError(
                "the tokenizer's chat template writes a conversation's earlier turns differently once later turns "
                "follow, so lmtune cannot tell which tokens are the responses; pass a --tokenizer without one"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def has_text(doc: str | Conversation) -> bool:
    """A document worth training on: text that is not blank; a conversation with a non-blank response."""
    if isinstance(doc, str):
        return bool(doc.strip())
    return any(m["role"] == "assistant" and m["content"].strip() for m in doc)


@dataclass
class Encoded:
    """Documents tokenized one by one; chat ones with their response masks, each ending in EOS."""

    ids: list[np.ndarray]
    masks: list[np.ndarray] | None  # chat only: True on response tokens
    nbytes: list[int]  # UTF-8 bytes of the scored text of each document

    def split(self, idx: Sequence[int], eos: int, dtype: Any) -> Split:
        nbytes = sum(self.nbytes[i] for i in idx)
        if self.masks is None:
            return Split(join([self.ids[i] for i in idx], eos, dtype), len(idx), nbytes)
        ids = [self.ids[i] for i in idx]
        starts = np.cumsum([0, *map(len, ids)]).astype(np.int64)
        mask = np.concatenate([self.masks[i] for i in idx]) if ids else np.zeros(0, dtype=bool)
        stream = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype=dtype)
        return Split(stream, len(idx), nbytes, mask, starts)


def encode(docs: Documents, tokenizer: Any, report: Report, what: str, workers: Workers | None = None) -> Encoded:
    """Token ids of each document (texts, here or by `workers`), or of each conversation with its response mask (chat)."""
    if not docs or isinstance(docs[0], str):
        texts = [d for d in docs if isinstance(d, str)]
        return Encoded(tokenize(texts, tokenizer, report, what, workers), None, [len(t.encode("utf-8")) for t in texts])
    ensure_chat_template(tokenizer)
    all_ids, masks, nbytes = [], [], []
    eos = tokenizer.eos_token_id
    for start in range(0, len(docs), CHUNK):
        rendered = [render(tokenizer, c) for c in docs[start : start + CHUNK] if not isinstance(c, str)]
        try:
            enc = tokenizer([t for t, _ in rendered], add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise LmtuneError("chat data needs a fast tokenizer (one with tokenizer.json)") from None
        for (text, spans), ids, offsets in zip(rendered, enc["input_ids"], enc["offset_mapping"], strict=True):
            ids_arr = np.asarray(ids, dtype=np.int64)
            off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (tokens, 2) character spans
            mask = np.zeros(len(ids_arr), dtype=bool)
            for a, b in spans:  # a token is a response token if its characters overlap a response
                mask |= (off[:, 0] < b) & (off[:, 1] > a)
            if spans and spans[-1][1] == len(text) and (not len(ids_arr) or ids_arr[-1] != eos):
                # The conversation ends with a response the template did not end with EOS: add it, so
                # the model learns to stop.
                ids_arr, mask = np.append(ids_arr, eos), np.append(mask, True)
            all_ids.append(ids_arr)
            masks.append(mask)
            nbytes.append(sum(len(text[a:b].encode("utf-8")) for a, b in spans))
        report({"event": "phase", "phase": f"tokenizing {what}", "done": start + len(rendered), "total": len(docs)})
    return Encoded(all_ids, masks, nbytes)


# --- the held-out split ---------------------------------------------------------------------------
#
# A document is held out when a hash of its content falls under the validation share: the same documents
# whatever the group size, the number of workers or the order of the files, and every copy of a document on
# the same side (so held-out validation never repeats training text).


def content_hash(doc: str | Conversation) -> int:
    """A document's identity, 64 bits: its text (a conversation's roles and texts) less the whitespace at
    either end, as the overlap check compares documents; hashed with SPLIT_SEED."""
    text = doc.strip() if isinstance(doc, str) else json.dumps([(m["role"], m["content"].strip()) for m in doc])
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, salt=SPLIT_SEED.to_bytes(16, "little"))
    return int.from_bytes(digest.digest(), "little")


def split_threshold(percent: float) -> int:
    """Documents whose hash is below this are held out: `percent` of them, on average."""
    return round(percent / 100 * 2**64)


def held_out(docs: Documents, percent: float) -> list[bool]:
    """Which of these non-empty documents the held-out split holds out, by the rule preparing applies: a hash
    under the threshold, else (when none is) the document with the lowest hash. For data read whole."""
    hashes = [content_hash(d) for d in docs]
    held = [h < split_threshold(percent) for h in hashes]
    if len(docs) >= 2 and not any(held):
        held = [h == min(hashes) for h in hashes]
    return held


def document_length(doc: str | Conversation) -> int:
    """Characters of text, for the share of the validation text that repeats training documents."""
    return len(doc) if isinstance(doc, str) else sum(len(m["content"]) for m in doc)


def overlap_warning(shared: int, total: int, share: float, where: str) -> str | None:
    """Say how many validation documents are training documents too; returns the warning, if it is one.

    Repeats that hold at least OVERLAP_WARNING of the validation text are a warning; fewer, a note.
    """
    said = f"{shared:,} of the {total:,} validation documents also appear in the training data ({where})"
    if share < OVERLAP_WARNING:
        log.info("%s; they are %.1f%% of the validation text, too little to matter", said, 100 * share)
        return None
    warning = f"{said}; the evaluation overstates how well the model generalises"
    log.warning(warning)
    return warning


# --- token streams on disk --------------------------------------------------------------------------
#
# Each split's stream is written to disk as it grows, one group of documents at a time, so memory holds one
# group whatever the size of the data. The folder is written beside its place and renamed (atomic.py): Ctrl-C,
# a crash or a full disk leaves no half-written cache entry or prepared folder, and the next run starts over.

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
    scale = 1_000_000 if source.unit == "MB" else 1
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
            "event": "phase", "phase": f"tokenizing {what}, {source.unit}", "done": done // scale,
            "total": source.total // scale, "info": f"{rate / 1e6:.2f}M tokens/s",
        })  # fmt: skip
    return tally


def write_streams(cfg: Config, tokenizer: Any, report: Report, folder: Path, workers: int, key: str) -> None:
    """Tokenize cfg.data (and its validation data) into token streams in the empty `folder`, with meta.json
    (counts, each file's size and checksum, the tokenizer's fingerprint, `key`). Memory does not grow with the data."""
    assert cfg.data, "checked by the caller"
    report({"event": "phase", "phase": f"reading {cfg.data}"})
    splits = sources(cfg.data, cfg)
    train = train_split(splits, cfg.data)
    val: Source | None = None
    where = ""
    if cfg.validation_data:
        val, where = eval_source(cfg.validation_data, cfg), f"--validation-data {cfg.validation_data}"
        source = cfg.validation_data
    elif "validation" in splits:
        val, source = splits["validation"], f"the `validation` split of {cfg.data}"
        where = f"validation: {source}"
    else:
        source = f"{cfg.validation_percent:g}% of the documents of {cfg.data}, held out"
    chat = train.format == "chat"
    if val is not None and val.format != train.format:
        kinds = ("chat", "plain text") if chat else ("plain text", "chat")
        raise LmtuneError(f"the training data is {kinds[0]} but the validation data ({source}) is {kinds[1]}")
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
                warning = overlap_warning(int(repeated.sum()), len(hashes), share, f"--data {cfg.data}, {where}")
        else:
            threshold = split_threshold(cfg.validation_percent)
            t = run(train, "training data", lambda h: h < np.uint64(threshold))
            lowest = t.lowest
            if t.documents >= 2 and not streams["validation"].documents:
                # No hash fell under the threshold (little data): hold out the document with the lowest.
                for s in streams.values():
                    s.reset()
                t = run(train, "training data", lambda h: h <= np.uint64(lowest))
            elif t.documents == 1 and not chat:
                # One document (a single file read whole): hold out its last tokens instead.
                hold_out_the_tail(streams, cfg.validation_percent)
                source = f"the last {cfg.validation_percent:g}% of the tokens of {cfg.data}, held out"
        if not t.documents:
            what = "0 conversations with a response" if chat else "0 non-empty documents"
            raise LmtuneError(f"{cfg.data} holds no text ({what})")
        if chat and val is None and t.documents == 1:
            raise LmtuneError(f"{cfg.data} holds one conversation; pass --validation-data or more conversations")
        if not streams["validation"].documents:
            raise LmtuneError(f"validation data from {source} holds no text")
        counts = {name: s.close() for name, s in streams.items()}
    meta = {
        "key": key,  # the cache key: a prepared folder with the same one need not be prepared again
        "validation_source": source,
        "empty_documents": t.empty,
        "format": "chat" if chat else "text",
        "overlap_warning": warning,
        # The tokenizer as it was, and (chat) with the template it was given: either reads these tokens.
        "tokenizer": sorted({fingerprint, tokenizer_fingerprint(tokenizer)}),
        "data": {key: getattr(cfg, key) for key in SOURCE_KEYS},
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


# --- the token cache and prepared folders ---------------------------------------------------------


def load_corpus(cfg: Config, tokenizer: Any, report: Report, workers: int | None = None) -> Corpus:
    """Tokenized train and validation streams (memory-mapped): from a folder written by `lmtune prepare`,
    from the cache when nothing that changes them changed, else tokenized now into the cache.

    A cache entry whose files are not what was written (truncated, overwritten, missing) is rebuilt, with
    one warning. Chat data sets the tokenizer's chat template when it has none (lmtune's SIMPLE_TEMPLATE,
    a constant: the key holds the tokenizer as it was).
    """
    if is_prepared(cfg.data):
        log.info("tokenized data prepared in %s", cfg.data)
        return read_prepared(Path(str(cfg.data)).expanduser(), cfg, tokenizer)
    folder = home() / "tokens" / cache_key(cfg, tokenizer)
    if folder.is_dir():
        try:
            corpus = read_cache(folder)
        except DamagedCache as err:
            log.warning("token cache entry %s is damaged (%s); rebuilding it", folder, err)
        else:
            if corpus.format == "chat":
                ensure_chat_template(tokenizer)
            log.info("tokenized data from cache %s", folder)
            if corpus.overlap_warning:
                log.warning(corpus.overlap_warning)
            return corpus
    write_folder(cfg, tokenizer, report, folder, workers or default_workers())
    corpus = read_cache(folder)
    corpus.cached = False
    return corpus


def cache_key(cfg: Config, tokenizer: Any) -> str:
    """What decides the tokens: the data (files by path, size and mtime), the settings and the tokenizer."""
    key_parts = [
        CACHE_VERSION,
        identity(cfg.data),
        identity(cfg.validation_data),
        cfg.text_column,
        cfg.txt_documents,
        cfg.validation_percent,
        cfg.data_format,
        tokenizer_fingerprint(tokenizer),
    ]
    return hashlib.sha256(json.dumps(key_parts, default=str).encode()).hexdigest()[:24]


def write_folder(
    cfg: Config, tokenizer: Any, report: Report, folder: Path, workers: int, extra: Callable[[Path], None] | None = None
) -> None:
    """write_streams into `folder`, written beside it and renamed: an interruption or a full disk leaves nothing."""
    key = cache_key(cfg, tokenizer)  # before chat data gives the tokenizer a template
    try:
        with atomic.written_beside(folder, folder=True) as tmp:
            write_streams(cfg, tokenizer, report, tmp, workers, key)
            if extra:
                extra(tmp)
    except OSError as err:  # a full disk, mostly; or a file that cannot be read or written, named
        where = f" ({err.filename})" if err.filename else ""
        raise LmtuneError(
            f"could not write the tokens of {cfg.data} in {folder}: {err.strerror or first_line(err)}{where}; nothing "
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
        chat = meta["format"] == "chat"
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
PREPARED_TOKENIZER = "tokenizer"


def is_prepared(spec: str | None) -> bool:
    """Whether --data names a folder written by `lmtune prepare` (or a token cache entry)."""
    if not spec:
        return False
    path = Path(spec).expanduser()
    return (path / "meta.json").is_file() and (path / "train.npy").is_file()


def read_prepared(folder: Path, cfg: Config, tokenizer: Any) -> Corpus:
    """A prepared folder's streams, checked whole, after checking they are this tokenizer's tokens."""
    if cfg.validation_data:
        raise LmtuneError(
            f"{folder} holds tokens prepared with their validation split; pass --validation-data to lmtune prepare"
        )
    try:
        corpus = read_cache(folder)
        meta = json.loads((folder / "meta.json").read_text())
        fingerprints, made_from = list(meta["tokenizer"]), meta["data"]["data"]
    except (DamagedCache, KeyError, TypeError) as err:
        raise LmtuneError(
            f"prepared data {folder} is damaged ({err}); prepare it again with lmtune prepare ... --overwrite"
        ) from None
    if tokenizer_fingerprint(tokenizer) not in fingerprints:
        raise LmtuneError(
            f"{folder} holds tokens of another tokenizer than this run's ({tokenizer.name_or_path}); train with the "
            f"one it was made with (--tokenizer {folder / PREPARED_TOKENIZER}), or prepare the data for this one: "
            f"lmtune prepare {made_from} --tokenizer {tokenizer.name_or_path}"
        )
    if corpus.format == "chat":
        ensure_chat_template(tokenizer)
    if corpus.overlap_warning:
        log.warning(corpus.overlap_warning)
    return corpus


def prepare(cfg: Config, output: Path, overwrite: bool, report: Report, workers: int | None = None) -> dict[str, Any]:
    """`lmtune prepare`: tokenize cfg.data once into the folder `output` (token streams, meta.json with the
    counts, checksums and fingerprints, and the tokenizer), for `lmtune finetune MODEL --data OUTPUT`.
    Returns what it holds; a folder already prepared from the same data, settings and tokenizer is kept."""
    from lmtune.config import absolute_paths
    from lmtune.model import get_tokenizer  # model.py imports this module

    if not cfg.data:
        raise LmtuneError("no data: lmtune prepare DATA --model M (a file, a folder or a hub dataset name)")
    if not cfg.model and not cfg.tokenizer:
        raise LmtuneError("pass --model M or --tokenizer T: the data is prepared as that tokenizer's tokens")
    cfg = absolute_paths(cfg)
    output = output.expanduser().absolute()
    check_prepare_output(cfg, output)
    tokenizer = get_tokenizer(cfg, report)
    start = time.perf_counter()
    key = cache_key(cfg, tokenizer)
    kept = not overwrite and prepared_key(output) == key
    if not kept:
        if output.exists() and not overwrite:
            raise LmtuneError(
                f"{output} holds data prepared from other data, settings or tokenizer; pass --overwrite to replace it"
            )
        save_tokenizer = lambda folder: tokenizer.save_pretrained(folder / PREPARED_TOKENIZER)  # noqa: E731
        write_folder(cfg, tokenizer, report, output, workers or default_workers(), save_tokenizer)
    corpus = read_prepared(output, cfg.model_copy(update={"validation_data": None}), tokenizer)
    seconds = time.perf_counter() - start
    tokens = len(corpus.train.ids) + len(corpus.validation.ids)
    return {
        "output": str(output), "already_prepared": kept, "format": corpus.format,
        "documents": corpus.train.documents, "empty_documents": corpus.empty_documents,
        "train_tokens": len(corpus.train.ids), "validation_documents": corpus.validation.documents,
        "validation_tokens": len(corpus.validation.ids), "validation": corpus.validation_source,
        "seconds": seconds, "tokens_per_second": tokens / seconds, "overlap_warning": corpus.overlap_warning,
    }  # fmt: skip


def check_prepare_output(cfg: Config, output: Path) -> None:
    """An --output that is free or holds prepared data; never one that holds the data."""
    for spec in (cfg.data, cfg.validation_data):
        if spec and is_local(spec) and Path(spec).expanduser().resolve().is_relative_to(output.resolve()):
            raise LmtuneError(f"--output {output} holds the data {spec}; write the prepared data elsewhere")
    if output.exists() and not is_prepared(str(output)):
        raise LmtuneError(f"{output} exists and is not prepared data; choose another --output")


def prepared_key(folder: Path) -> str | None:
    """The cache key a prepared folder was written with, if it is one."""
    try:
        return str(json.loads((folder / "meta.json").read_text())["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def eval_split(spec: str, cfg: Config, tokenizer: Any, report: Report) -> Split:
    """Any data as one evaluation split, tokenized with `tokenizer` (not cached: eval reads it once)."""
    report({"event": "phase", "phase": f"reading {spec}"})
    docs = [d for d in eval_documents(spec, cfg) if has_text(d)]
    if not docs:
        raise LmtuneError(f"{spec} holds no text (0 non-empty documents)")
    return encode(docs, tokenizer, report, spec).split(range(len(docs)), tokenizer.eos_token_id, token_dtype(tokenizer))
