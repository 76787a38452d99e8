"""Training text: read documents, tokenize them once (cached), join them with EOS and pack blocks."""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmtune import atomic
from lmtune.config import Config
from lmtune.errors import LmtuneError, first_line
from lmtune.events import Report
from lmtune.runs import home

log = logging.getLogger("lmtune")

ALIASES = {"wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1")}
LOCAL_TYPES = {".txt": "text", ".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
CACHE_VERSION = 3  # bump when the cached token format or the way documents are joined changes (3: checksums)
SPLIT_SEED = 0  # the held-out documents depend on the data only, so every run compares on the same ones
# The share of the validation text (in characters) that, when it repeats training documents, makes the
# overlap a warning rather than a note: below it, the repeats are short lines such as headings (WikiText-2's
# test split repeats 200 of its validation split's 1,160 paragraphs, all headings, 0.4% of its text).
OVERLAP_WARNING = 0.01
# A tokenizer call takes at most CHUNK documents (or pieces of one) and about BATCH_CHARS characters: enough
# for the Rust tokenizer's threads, little enough to report progress and heed Ctrl-C every second or two and to
# bound memory (it holds ~280 bytes per token while it works: one 50 MiB line tokenized whole peaked at 11.7 GB).
CHUNK = 1000
BATCH_CHARS = 1_000_000
# A document longer than this is tokenized in pieces of about this many characters, their ids joined (one
# 50 MiB line: 11.7 GB and 2m45s whole, 1.45 GB and 38 s in pieces, the same ids). Ten pieces make a batch,
# to keep ten threads busy on one long document; 100k characters is ~25k GPT-2 tokens, so almost every
# document is tokenized whole.
MAX_PIECE_CHARS = 100_000
# Where a long document may be cut: one whitespace character between two others (see `cuts`).
CUT = re.compile(r"(?<=\S)\s(?=\S)")


@dataclass
class Split:
    """One split as a single token stream: each document followed by EOS.

    Chat data adds `mask` and `starts`: its examples are scored and trained on one by one, and only
    the response tokens count.
    """

    ids: np.ndarray  # (N,) token ids, uint16 or int32
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


def column_documents(ds: Any, cfg: Config, source: str) -> Documents:
    """The documents of a table: texts from --text-column, or conversations from chat columns."""
    if data_format(ds.column_names, cfg, source) == "text":
        return column_texts(ds, cfg.text_column, source)
    if "messages" in ds.column_names:
        return [check_conversation(m, source, row) for row, m in enumerate(ds["messages"], 1)]
    return [
        check_conversation([{"role": "user", "content": p}, {"role": "assistant", "content": r}], source, row)
        for row, (p, r) in enumerate(zip(ds["prompt"], ds["response"], strict=True), 1)
    ]


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


def read_files(files: list[Path], spec: str, cfg: Config) -> Documents:
    if files[0].suffix.lower() == ".txt":
        if cfg.data_format == "chat":
            raise LmtuneError(
                f"{spec} is plain text; chat data is JSONL (or a table) with `messages` or `prompt`/`response`"
            )
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
        first = first_line(cause)
        raise LmtuneError(f"cannot read {spec}: {bad_jsonl_line(files) or first}") from None
    return column_documents(ds, cfg, spec)


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


def read_documents(spec: str, cfg: Config) -> dict[str, Documents]:
    """Documents by split name. A file is one split, 'train'; a folder's files named like
    validation/valid/val/dev or test form those splits; hub datasets have their own."""
    if not is_local(spec):
        ds = _hub_dataset(*hub_name(spec))
        return {split: column_documents(ds[split], cfg, f"{spec} ({split})") for split in ds}
    files = local_files(spec)
    if len(files) == 1 and not Path(spec).expanduser().is_dir():
        return {"train": read_files(files, spec, cfg)}
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(split_of(f), []).append(f)
    return {split: read_files(group, spec, cfg) for split, group in sorted(by_split.items())}


def train_split(splits: dict[str, Documents], spec: str) -> Documents:
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
    template = getattr(tokenizer, "chat_template", None)  # decides how chat data is written
    return hashlib.sha256(f"{text}|{tokenizer.eos_token_id}|{template}".encode()).hexdigest()


def tokenize(docs: Sequence[str], tokenizer: Any, report: Report, what: str) -> list[np.ndarray]:
    """Token ids of each document, in batches (CHUNK, BATCH_CHARS) so the Rust tokenizer can use every core.

    A long document goes in pieces (`cuts`) whose ids are joined, so it is still one document. Progress
    counts pieces: the documents, unless some are long.
    """
    long = {i: cuts(d) for i, d in enumerate(docs) if len(d) > MAX_PIECE_CHARS}
    total = len(docs) + sum(len(c) - 2 for c in long.values())
    pieces = ((i, a, b) for i, d in enumerate(docs) for a, b in itertools.pairwise(long.get(i, (0, len(d)))))
    out: list[np.ndarray] = []
    held: list[np.ndarray] = []  # the ids of the pieces of a long document, until its last one
    batch: list[tuple[int, int, int]] = []  # (document, start, end)
    chars = done = 0
    for n, (i, a, b) in enumerate(pieces, 1):
        batch.append((i, a, b))
        chars += b - a
        if len(batch) < CHUNK and chars < BATCH_CHARS and n < total:
            continue
        ids = tokenizer([docs[i][a:b] for i, a, b in batch], add_special_tokens=False)["input_ids"]
        for (i, _, b), x in zip(batch, ids, strict=True):
            held.append(np.asarray(x, dtype=np.int64))
            if b == len(docs[i]):
                out.append(held[0] if len(held) == 1 else np.concatenate(held))
                held = []
        done += len(batch)
        report({"event": "phase", "phase": f"tokenizing {what}", "done": done, "total": total})
        batch, chars = [], 0
    return out


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
    eos_arr = np.array([eos], dtype=np.int64)
    return np.concatenate([x for d in docs for x in (d, eos_arr)]).astype(dtype)


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


def encode(docs: Documents, tokenizer: Any, report: Report, what: str) -> Encoded:
    """Token ids of each document (texts), or of each conversation with its response mask (chat)."""
    if not docs or isinstance(docs[0], str):
        texts = [d for d in docs if isinstance(d, str)]
        return Encoded(tokenize(texts, tokenizer, report, what), None, [len(t.encode("utf-8")) for t in texts])
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

    chat = bool(texts) and not isinstance(texts[0], str)
    kept = [t for t in texts if has_text(t)]
    empty = len(texts) - len(kept)
    if not kept:
        what = "0 conversations with a response" if chat else "0 non-empty documents"
        raise LmtuneError(f"{cfg.data} holds no text ({what})")
    eos, dtype = tokenizer.eos_token_id, token_dtype(tokenizer)
    enc = encode(kept, tokenizer, report, "training data")
    everything = range(len(kept))

    warning = None
    if val_texts is not None:
        if val_texts and isinstance(val_texts[0], str) == chat:
            kinds = ("chat", "plain text") if chat else ("plain text", "chat")
            raise LmtuneError(f"the training data is {kinds[0]} but the validation data ({source}) is {kinds[1]}")
        val_kept = [t for t in val_texts if has_text(t)]
        where = f"--validation-data {cfg.validation_data}" if cfg.validation_data else f"validation: {source}"
        warning = check_overlap(kept, val_kept, f"--data {cfg.data}, {where}")
        train = enc.split(everything, eos, dtype)
        validation = encode(val_kept, tokenizer, report, "validation data").split(range(len(val_kept)), eos, dtype)
    elif len(kept) >= 2:
        order = np.random.default_rng(SPLIT_SEED).permutation(len(kept))
        n_val = max(1, round(len(kept) * cfg.validation_percent / 100))
        held = set(order[:n_val].tolist())
        train_idx, val_idx = [i for i in everything if i not in held], sorted(held)
        # Held out of data that holds some documents twice, a held-out copy was trained on all the same.
        warning = check_overlap(
            [kept[i] for i in train_idx], [kept[i] for i in val_idx], f"--data {cfg.data}, validation: {source}"
        )
        train = enc.split(train_idx, eos, dtype)
        validation = enc.split(val_idx, eos, dtype)
    elif chat:
        raise LmtuneError(f"{cfg.data} holds one conversation; pass --validation-data or more conversations")
    else:
        # One document (a single file read whole): hold out its last tokens instead.
        stream = join(enc.ids, eos, dtype)
        cut = len(stream) - max(1, round(len(stream) * cfg.validation_percent / 100))
        nbytes = enc.nbytes[0]
        train = Split(stream[:cut], 1, round(nbytes * cut / len(stream)))
        validation = Split(stream[cut:], 1, nbytes - train.bytes)
        source = f"the last {cfg.validation_percent:g}% of the tokens of {cfg.data}, held out"
    if validation.documents == 0:
        raise LmtuneError(f"validation data from {source} holds no text")
    return Corpus(
        train, validation, source, empty, cached=False, format="chat" if chat else "text", overlap_warning=warning
    )


def check_overlap(train: Documents, validation: Documents, where: str) -> str | None:
    """Say how many validation documents are training documents too; returns the warning, if it is one.

    Documents are compared by content: the same text, or the same conversation, less the whitespace at
    either end (a paragraph at the end of a file keeps its newline). Repeats that hold at least
    OVERLAP_WARNING of the validation text are a warning; fewer, a note.
    """

    def content(doc: str | Conversation) -> Any:
        return doc.strip() if isinstance(doc, str) else tuple((m["role"], m["content"].strip()) for m in doc)

    def length(doc: str | Conversation) -> int:
        return len(doc) if isinstance(doc, str) else sum(len(m["content"]) for m in doc)

    wanted = {content(d) for d in validation}  # the validation side is the small one, usually
    found = {c for d in train if (c := content(d)) in wanted}
    shared = [d for d in validation if content(d) in found]
    if not shared:
        return None
    share = sum(map(length, shared)) / max(1, sum(map(length, validation)))
    said = f"{len(shared):,} of the {len(validation):,} validation documents also appear in the training data ({where})"
    if share < OVERLAP_WARNING:
        log.info("%s; they are %.1f%% of the validation text, too little to matter", said, 100 * share)
        return None
    warning = f"{said}; the evaluation overstates how well the model generalises"
    log.warning(warning)
    return warning


def eval_documents(spec: str, cfg: Config) -> Documents:
    """The documents to evaluate on: a file whole; a folder's or hub dataset's validation (else test) split."""
    splits = read_documents(spec, cfg)
    for name in ("validation", "test", "train"):
        if name in splits:
            return splits[name]
    return next(iter(splits.values()))


def load_corpus(cfg: Config, tokenizer: Any, report: Report) -> Corpus:
    """Tokenized train and validation streams, from the cache when nothing that changes them changed.

    A cache entry whose files are not what was written (truncated, overwritten, missing) is rebuilt, with
    one warning. Chat data sets the tokenizer's chat template when it has none (lmtune's SIMPLE_TEMPLATE,
    a constant: the key holds the tokenizer as it was).
    """
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
    key = hashlib.sha256(json.dumps(key_parts, default=str).encode()).hexdigest()[:24]
    folder = home() / "tokens" / key
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
    corpus = build_corpus(cfg, tokenizer, report)
    write_cache(corpus, folder)
    return corpus


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


def write_cache(corpus: Corpus, folder: Path) -> None:
    """The corpus's streams as .npy files, with meta.json holding each file's size and checksum."""
    # Written beside its place and renamed, so a crash never leaves a cache entry half-written.
    with atomic.written_beside(folder, folder=True) as tmp:
        meta: dict[str, Any] = {
            "validation_source": corpus.validation_source,
            "empty_documents": corpus.empty_documents,
            "format": corpus.format,
            "overlap_warning": corpus.overlap_warning,
            "files": {},
        }
        for name, split in (("train", corpus.train), ("validation", corpus.validation)):
            arrays = {f"{name}.npy": split.ids}
            if split.mask is not None and split.starts is not None:
                arrays |= {f"{name}.mask.npy": split.mask, f"{name}.starts.npy": split.starts}
            for file, array in arrays.items():
                np.save(tmp / file, array)
                meta["files"][file] = {"bytes": (tmp / file).stat().st_size, "sha256": checksum(tmp / file)}
            meta[name] = {"documents": split.documents, "bytes": split.bytes, "tokens": len(split.ids)}
        (tmp / "meta.json").write_text(json.dumps(meta))


def read_cache(folder: Path) -> Corpus:
    """A cache entry, after checking each file's size, checksum and token count against meta.json."""
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


def eval_split(spec: str, cfg: Config, tokenizer: Any, report: Report) -> Split:
    """Any data as one evaluation split, tokenized with `tokenizer` (not cached: eval reads it once)."""
    report({"event": "phase", "phase": f"reading {spec}"})
    docs = [d for d in eval_documents(spec, cfg) if has_text(d)]
    if not docs:
        raise LmtuneError(f"{spec} holds no text (0 non-empty documents)")
    return encode(docs, tokenizer, report, spec).split(range(len(docs)), tokenizer.eos_token_id, token_dtype(tokenizer))
