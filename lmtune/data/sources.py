"""Reading sources: files, folders, tables and hub datasets, as documents (texts or conversations).

A split's documents are a `Source`: read in groups as they are tokenized, never all at once. A .txt file
is read a piece at a time; tables (.jsonl, .csv, .parquet, hub datasets) are the datasets library's
memory-mapped Arrow tables, iterated in batches of rows.
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from lmtune.data.rows import document
from lmtune.data.types import CHUNK, Documents, Source
from lmtune.errors import LmtuneError, first_line

ALIASES = {"wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1")}
# The file formats lmtune reads, by extension: the datasets library's builder for tables, or "text" for plain
# text, which lmtune reads itself. A new format is one entry; every message lists the extensions from here.
FORMATS = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
EXTENSIONS = ", ".join(FORMATS)
# A .txt file is read this many characters at a time; the text after its last document boundary is carried over.
READ_CHARS = 4_000_000
PARAGRAPH_END = re.compile(r"\n[ \t]*\n")  # a blank line, one holding only spaces too (WikiText's are " \n")
# A folder holding these is an lmtune run folder (or a prepared one): never read as data, even inside a data folder.
RUN_MARKERS = ("summary.json", "config.yaml", ".lmtune.lock", "data_plan.json")
# A prepared folder: a cache entry written where the user says, with the tokenizer it was made with.
PREPARED_TOKENIZER = "tokenizer"


class Reading(Protocol):
    """The settings reading needs: a run's config, or one source of its plan (the same names)."""

    @property
    def data_format(self) -> str: ...
    @property
    def text_column(self) -> str: ...
    @property
    def txt_documents(self) -> str: ...


def is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists() or Path(spec).suffix.lower() in FORMATS or spec.startswith((".", "/", "~"))


def local_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if not path.exists():
        raise LmtuneError(f"no such file: {spec}; pass a file ({EXTENSIONS}), a folder, or a hub dataset name")
    files = [p for p in folder_files(path) if p.suffix.lower() in FORMATS] if path.is_dir() else [path]
    if not files:
        raise LmtuneError(f"folder {spec} holds no {EXTENSIONS} files")
    kinds = {FORMATS.get(p.suffix.lower()) for p in files}
    if None in kinds:
        raise LmtuneError(f"cannot read {spec}: lmtune reads {EXTENSIONS} files")
    if len(kinds) > 1:
        raise LmtuneError(
            f"folder {spec} mixes file types ({', '.join(sorted(k for k in kinds if k))}); keep one type per folder"
        )
    return files


def folder_files(folder: Path) -> list[Path]:
    """Every file in a folder and below, sorted, as the datasets library chooses them: not hidden ones.

    Skipped below the folder: names starting with "." (.ipynb_checkpoints/ holds copies of the data,
    .git/ its history), folders starting with "__" (__MACOSX/ from unzipping), and lmtune's own run and
    prepared folders (their metrics, summary and tokenizer are not training text). Linked folders are
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
        if root != str(folder) and is_lmtune_folder(Path(root)):
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith((".", "__")))  # sorted: the same link wins each time
        files += [Path(root, n) for n in names if not n.startswith(".") and Path(root, n).is_file()]
    return sorted(files)


def is_lmtune_folder(path: Path) -> bool:
    """A run folder or a prepared folder: what lmtune wrote, never data to read as text."""
    return any((path / marker).exists() for marker in RUN_MARKERS) or is_prepared(str(path))


def split_txt(text: str, mode: str) -> list[str]:
    if mode == "file":
        return [text]
    if mode == "line":
        return text.splitlines()
    # Paragraphs end at a blank line, one holding only spaces too (WikiText's are " \n").
    return re.split(r"\n[ \t]*\n", text)


def data_format(columns: list[str], cfg: Reading, source: str) -> str:
    """text, chat or preference: chat when asked, or (auto) when the data has `messages` or `prompt` and
    `response` columns; preference when asked or (auto) when it has `chosen` and `rejected` (and `prompt`)."""
    has_pairs = {"chosen", "rejected"} <= set(columns)
    if cfg.data_format == "preference" and not has_pairs:
        raise LmtuneError(
            f"{source} has no `chosen` and `rejected` columns, which preference data needs; it has {', '.join(columns)}"
        )
    if cfg.data_format == "preference" or (cfg.data_format == "auto" and has_pairs):
        return "preference"
    has_chat = "messages" in columns or {"prompt", "response"} <= set(columns)
    if cfg.data_format == "chat" and not has_chat:
        raise LmtuneError(
            f"{source} has no `messages` column and no `prompt` and `response` columns, which chat data needs; "
            f"it has {', '.join(columns)}"
        )
    return "chat" if cfg.data_format == "chat" or (cfg.data_format == "auto" and has_chat) else "text"


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


def sources(spec: str, cfg: Reading) -> dict[str, Source]:
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


def read_documents(spec: str, cfg: Reading) -> dict[str, Documents]:
    """Every document by split, in lists: for small data (evaluation, training a tokenizer) and tests."""
    return {split: [d for docs, _ in s.read() for d in docs] for split, s in sources(spec, cfg).items()}


def file_source(files: list[Path], spec: str, cfg: Reading) -> Source:
    if FORMATS[files[0].suffix.lower()] != "text":
        return table_source(load_table(files, spec), cfg, spec)
    if cfg.data_format in ("chat", "preference"):
        raise LmtuneError(
            f"{spec} is plain text; chat data is JSONL (or a table) with `messages` or `prompt`/`response`, "
            "preference data with `prompt`, `chosen` and `rejected`"
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
        # utf-8-sig: a byte-order mark at the start (Windows editors write one) is not text to train on.
        with path.open(encoding="utf-8-sig") as f:  # universal newlines, as Path.read_text
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
            FORMATS[files[0].suffix.lower()], data_files=[str(f) for f in files], split="train"
        )
    except Exception as err:
        cause = err.__cause__ or err
        first = first_line(cause)
        raise LmtuneError(f"cannot read {spec}: {bad_jsonl_line(files) or other_columns(files) or first}") from None


def table_source(ds: Any, cfg: Reading, name: str) -> Source:
    """The rows of a table as texts from --text-column, or as conversations from chat columns, in batches."""
    fmt = data_format(ds.column_names, cfg, name)
    if fmt == "text":
        check_text_column(ds, cfg.text_column, name)
        columns = [cfg.text_column]
    elif fmt == "preference":
        columns = [c for c in ("prompt", "chosen", "rejected") if c in ds.column_names]
    else:
        columns = ["messages"] if "messages" in ds.column_names else ["prompt", "response"]

    def read() -> Iterator[tuple[list[Any], int]]:
        row = 0
        for batch in ds.select_columns(columns).iter(batch_size=CHUNK):
            yield [document(batch, columns, i, row + i + 1, name) for i in range(len(batch[columns[0]]))], row
            row += len(batch[columns[0]])

    return Source(name, fmt, ds.num_rows, "rows", read)


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
                except json.JSONDecodeError as err:  # its msg ends "... at"; the place is colno
                    what = err.msg.removesuffix(" at")
                    return f"{f} line {n}, column {err.colno}: {what}; expected one JSON object per line"
    return None


def other_columns(files: list[Path]) -> str | None:
    """'FILE has columns ..., FILE2 has ...' when the JSON Lines files of a folder do not share their columns
    (the datasets library says only "Couldn't cast"); by each file's first row."""
    seen: dict[Path, list[str]] = {}
    for f in files:
        if f.suffix.lower() != ".jsonl":
            continue
        with f.open(encoding="utf-8", errors="replace") as lines:
            first = next((line for line in lines if line.strip()), "")
        try:
            row = json.loads(first) if first else {}
        except json.JSONDecodeError:
            continue
        seen[f] = sorted(row) if isinstance(row, dict) else []
    columns = list(seen.items())
    for f, cols in columns[1:]:
        if cols != columns[0][1]:
            return (
                f"{columns[0][0]} has columns {', '.join(columns[0][1])} but {f} has {', '.join(cols) or 'none'}; "
                "the files of a folder must share their columns (move the other file out, or pass each file alone)"
            )
    return None


def train_split(splits: dict[str, Any], spec: str) -> Any:
    if "train" not in splits:
        raise LmtuneError(f"{spec} has only {' and '.join(splits)} data; training needs a `train` split or file")
    return splits["train"]


def eval_source(spec: str, cfg: Reading) -> Source:
    """The documents to evaluate on: a file whole; a folder's or hub dataset's validation (else test) split."""
    splits = sources(spec, cfg)
    for name in ("validation", "test", "train"):
        if name in splits:
            return splits[name]
    return next(iter(splits.values()))


def eval_documents(spec: str, cfg: Reading) -> Documents:
    return [d for docs, _ in eval_source(spec, cfg).read() for d in docs]


def identity(spec: str | None) -> Any:
    """What the data is, for the cache key: files by path, size and mtime; hub data by its fingerprint."""
    if spec is None:
        return None
    if is_local(spec):
        return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in local_files(spec)]
    ds = _hub_dataset(*hub_name(spec))
    return [spec, {split: ds[split]._fingerprint for split in ds}]


PREPARED_TOKENIZER = "tokenizer"


def is_prepared(spec: str | None) -> bool:
    """Whether --data names a folder written by `lmtune prepare` (or a token cache entry)."""
    if not spec:
        return False
    path = Path(spec).expanduser()
    return (path / "meta.json").is_file() and (path / "train.npy").is_file()
