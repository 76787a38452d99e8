"""Training text: read documents, tokenize them once (cached), join them with EOS and pack blocks."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmtune.config import Config
from lmtune.errors import LmtuneError
from lmtune.runs import home

log = logging.getLogger("lmtune")

ALIASES = {"wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1")}
LOCAL_TYPES = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CACHE_VERSION = 1  # bump when the cached token format or the way documents are joined changes
SPLIT_SEED = 0  # the held-out documents depend on the data only, so every run compares on the same ones
# Documents per tokenizer call: big enough for the Rust tokenizer's threads, small enough to report progress.
CHUNK = 1000

Report = Callable[[dict[str, Any]], None]


@dataclass
class Split:
    """One split as a single token stream: each document followed by EOS."""

    ids: np.ndarray  # (N,) token ids, uint16 or int32
    documents: int
    bytes: int  # UTF-8 bytes of the documents' text, for bits per byte


@dataclass
class Corpus:
    train: Split
    validation: Split
    validation_source: str  # where validation came from, said in the logs and the summary
    empty_documents: int  # empty or blank documents skipped (they would only add EOS tokens)
    cached: bool


# --- reading documents ------------------------------------------------------------------------


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
    files = (
        sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_TYPES)
        if path.is_dir()
        else [path]
    )
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


def split_txt(text: str, mode: str) -> list[str]:
    if mode == "file":
        return [text]
    if mode == "line":
        return text.splitlines()
    # Paragraphs end at a blank line, one holding only spaces too (WikiText's are " \n").
    return re.split(r"\n[ \t]*\n", text)


def column_texts(ds: Any, column: str, source: str) -> list[str]:
    if column not in ds.column_names:
        raise LmtuneError(f"{source} has no column `{column}`; it has {', '.join(ds.column_names)}. Pass --text-column")
    feature = ds.features[column]
    if getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise LmtuneError(f"column `{column}` of {source} holds {feature}, not text; pass --text-column")
    return [t or "" for t in ds[column]]


@functools.cache
def _hub_dataset(name: str, config: str | None) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, config)
    except Exception as err:  # datasets raises many types for "not there"; all mean the same to a user
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
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


def read_files(files: list[Path], spec: str, cfg: Config) -> list[str]:
    if files[0].suffix.lower() == ".txt":
        docs: list[str] = []
        for f in files:
            try:
                docs += split_txt(f.read_text(encoding="utf-8"), cfg.txt_documents)
            except UnicodeDecodeError as err:
                raise LmtuneError(f"{f} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        return docs
    import datasets

    try:
        ds = datasets.load_dataset(
            LOCAL_TYPES[files[0].suffix.lower()], data_files=[str(f) for f in files], split="train"
        )
    except Exception as err:
        cause = err.__cause__ or err
        first = (str(cause).splitlines() or [type(cause).__name__])[0]
        raise LmtuneError(f"cannot read {spec}: {bad_jsonl_line(files) or first}") from None
    return column_texts(ds, cfg.text_column, spec)


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


def read_documents(spec: str, cfg: Config) -> dict[str, list[str]]:
    """Documents by split name. A file is one split, 'train'; a folder's files named like
    validation/valid/val/dev or test form those splits; hub datasets have their own."""
    if not is_local(spec):
        ds = _hub_dataset(*hub_name(spec))
        return {split: column_texts(ds[split], cfg.text_column, f"{spec} ({split})") for split in ds}
    files = local_files(spec)
    if len(files) == 1 and not Path(spec).expanduser().is_dir():
        return {"train": read_files(files, spec, cfg)}
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(split_of(f), []).append(f)
    return {split: read_files(group, spec, cfg) for split, group in sorted(by_split.items())}


def train_split(splits: dict[str, list[str]], spec: str) -> list[str]:
    if "train" not in splits:
        raise LmtuneError(f"{spec} has only {' and '.join(splits)} data; training needs a `train` split or file")
    return splits["train"]


def identity(spec: str | None) -> Any:
    """What the data is, for the cache key: files by path, size and mtime; hub data by its fingerprint."""
    if spec is None:
        return None
    if is_local(spec):
        return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in local_files(spec)]
    ds = _hub_dataset(*hub_name(spec))
    return [spec, {split: ds[split]._fingerprint for split in ds}]


# --- tokenizing, cached -------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}".encode()).hexdigest()


def tokenize(docs: Sequence[str], tokenizer: Any, report: Report, what: str) -> list[np.ndarray]:
    """Token ids of each document, in batches so the Rust tokenizer can use every core."""
    out: list[np.ndarray] = []
    for start in range(0, len(docs), CHUNK):
        batch = docs[start : start + CHUNK]
        ids = tokenizer(list(batch), add_special_tokens=False)["input_ids"]
        out += [np.asarray(x, dtype=np.int64) for x in ids]
        report({"event": "phase", "phase": f"tokenizing {what}", "done": start + len(batch), "total": len(docs)})
    return out


def join(docs: list[np.ndarray], eos: int, dtype: Any) -> np.ndarray:
    """One stream: each document followed by EOS, so the model learns where documents end."""
    if not docs:
        return np.zeros(0, dtype=dtype)
    eos_arr = np.array([eos], dtype=np.int64)
    return np.concatenate([x for d in docs for x in (d, eos_arr)]).astype(dtype)


def token_dtype(tokenizer: Any) -> Any:
    """uint16 halves the memory and disk of a stream whenever the vocabulary fits (GPT-2's 50,257 does)."""
    return np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.int32


def to_split(texts: Sequence[str], tokens: list[np.ndarray], eos: int, dtype: Any) -> Split:
    return Split(join(tokens, eos, dtype), len(texts), sum(len(t.encode("utf-8")) for t in texts))


def build_corpus(cfg: Config, tokenizer: Any, report: Report) -> Corpus:
    assert cfg.data, "checked by the caller"
    report({"event": "phase", "phase": f"reading {cfg.data}"})
    splits = read_documents(cfg.data, cfg)
    texts = train_split(splits, cfg.data)
    if cfg.validation_data:
        val_texts, source = eval_documents(cfg.validation_data, cfg), cfg.validation_data
    elif "validation" in splits:
        val_texts, source = splits["validation"], f"the `validation` split of {cfg.data}"
    else:
        val_texts, source = None, f"{cfg.validation_percent:g}% of the documents of {cfg.data}, held out"

    kept = [t for t in texts if t.strip()]
    empty = len(texts) - len(kept)
    if not kept:
        raise LmtuneError(f"{cfg.data} holds no text (0 non-empty documents)")
    eos, dtype = tokenizer.eos_token_id, token_dtype(tokenizer)
    tokens = tokenize(kept, tokenizer, report, "training data")

    if val_texts is not None:
        val_kept = [t for t in val_texts if t.strip()]
        train = to_split(kept, tokens, eos, dtype)
        validation = to_split(val_kept, tokenize(val_kept, tokenizer, report, "validation data"), eos, dtype)
    elif len(kept) >= 2:
        order = np.random.default_rng(SPLIT_SEED).permutation(len(kept))
        n_val = max(1, round(len(kept) * cfg.validation_percent / 100))
        held = set(order[:n_val].tolist())
        train_idx = [i for i in range(len(kept)) if i not in held]
        val_idx = sorted(held)
        train = to_split([kept[i] for i in train_idx], [tokens[i] for i in train_idx], eos, dtype)
        validation = to_split([kept[i] for i in val_idx], [tokens[i] for i in val_idx], eos, dtype)
    else:
        # One document (a single file read whole): hold out its last tokens instead.
        stream = join(tokens, eos, dtype)
        cut = len(stream) - max(1, round(len(stream) * cfg.validation_percent / 100))
        nbytes = len(kept[0].encode("utf-8"))
        train = Split(stream[:cut], 1, round(nbytes * cut / len(stream)))
        validation = Split(stream[cut:], 1, nbytes - train.bytes)
        source = f"the last {cfg.validation_percent:g}% of the tokens of {cfg.data}, held out"
    if validation.documents == 0:
        raise LmtuneError(f"validation data from {source} holds no text")
    return Corpus(train, validation, source, empty, cached=False)


def eval_documents(spec: str, cfg: Config) -> list[str]:
    """The documents to evaluate on: a file whole; a folder's or hub dataset's validation (else test) split."""
    splits = read_documents(spec, cfg)
    for name in ("validation", "test", "train"):
        if name in splits:
            return splits[name]
    return next(iter(splits.values()))


def load_corpus(cfg: Config, tokenizer: Any, report: Report) -> Corpus:
    """Tokenized train and validation streams, from the cache when nothing that changes them changed."""
    key_parts = [
        CACHE_VERSION,
        identity(cfg.data),
        identity(cfg.validation_data),
        cfg.text_column,
        cfg.txt_documents,
        cfg.validation_percent,
        tokenizer_fingerprint(tokenizer),
    ]
    key = hashlib.sha256(json.dumps(key_parts, default=str).encode()).hexdigest()[:24]
    folder = home() / "tokens" / key
    if (folder / "meta.json").is_file():
        stored = json.loads((folder / "meta.json").read_text())
        splits = {
            name: Split(
                np.load(folder / f"{name}.npy", mmap_mode="r"), stored[name]["documents"], stored[name]["bytes"]
            )
            for name in ("train", "validation")
        }
        log.info("tokenized data from cache %s", folder)
        return Corpus(
            splits["train"], splits["validation"], stored["validation_source"], stored["empty_documents"], True
        )

    corpus = build_corpus(cfg, tokenizer, report)
    # Written to a temporary folder and renamed, so a crash never leaves a cache entry half-written.
    tmp = folder.with_name(key + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta: dict[str, Any] = {"validation_source": corpus.validation_source, "empty_documents": corpus.empty_documents}
    for name, split in (("train", corpus.train), ("validation", corpus.validation)):
        np.save(tmp / f"{name}.npy", split.ids)
        meta[name] = {"documents": split.documents, "bytes": split.bytes, "tokens": len(split.ids)}
    (tmp / "meta.json").write_text(json.dumps(meta))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return corpus


def eval_split(spec: str, cfg: Config, tokenizer: Any, report: Report) -> Split:
    """Any data as one evaluation stream, tokenized with `tokenizer` (not cached: eval reads it once)."""
    report({"event": "phase", "phase": f"reading {spec}"})
    texts = [t for t in eval_documents(spec, cfg) if t.strip()]
    if not texts:
        raise LmtuneError(f"{spec} holds no text (0 non-empty documents)")
    return to_split(texts, tokenize(texts, tokenizer, report, spec), tokenizer.eos_token_id, token_dtype(tokenizer))


# --- packing -----------------------------------------------------------------------------------------


def pack(ids: np.ndarray, block_size: int) -> tuple[np.ndarray, int]:
    """Cut the stream into full blocks of `block_size` tokens, no padding. Returns (blocks, tokens dropped)."""
    n_blocks = len(ids) // block_size
    return np.asarray(ids[: n_blocks * block_size]).reshape(n_blocks, block_size), len(ids) - n_blocks * block_size
