"""The data layer's shared types, at the bottom of the package: every other file may import them, they
import nothing of lmtune's. A document passes the files in this order: `sources` (reading; `rows` makes a
table row a document), `chat` (templates), `tokens` (tokenizing), `split` (the held-out rule), `streams` (token streams on disk and
their cache), `prepared` (the corpus a run trains on), `streaming` (data read as training takes it); `plan`
decides once, before any of them runs, what each source is and where its validation comes from."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("lmtune")

# A tokenizer call, and a batch of table rows, take at most CHUNK documents.
CHUNK = 1000
# Documents are read, tokenized and written a group of about this many characters at a time: what memory
# holds of the data at once, whatever its size (with 2 workers each gets a few BATCH_CHARS batches).
GROUP_CHARS = 8_000_000

Conversation = list[dict[str, str]]  # [{"role": "user", "content": "..."}, {"role": "assistant", ...}]
ROLES = ("system", "user", "assistant")
# The data formats rendered with the chat template and stored with a mask of the scored tokens (not text).
RENDERED = ("chat", "preference")


@dataclass(frozen=True)
class Pair:
    """A preference pair: one prompt (its leading turns) answered twice, the chosen answer and the rejected one.
    Each side is the whole conversation as the chat template renders it; the loss scores the turns after
    the prompt only. Empty sides or identical ones make a bad pair (`bad`), counted and skipped."""

    prompt: Conversation  # the shared leading turns
    chosen: Conversation  # the answer turns after the prompt (assistant messages)
    rejected: Conversation

    def side(self, which: str) -> Conversation:
        """The whole conversation of one side: the prompt then that answer."""
        return [*self.prompt, *(self.chosen if which == "chosen" else self.rejected)]

    @property
    def bad(self) -> str | None:
        """Why this pair cannot train (a side missing or blank, both sides the same), or None."""
        if not self.prompt:
            return "no prompt"
        blank = [w for w in ("chosen", "rejected") if not any(m["content"].strip() for m in getattr(self, w))]
        if blank:
            return f"no {' and no '.join(blank)} answer"
        if self.chosen == self.rejected:
            return "chosen = rejected"
        return None

    def __len__(self) -> int:  # characters, for reading in groups
        return sum(len(m["content"]) for m in (*self.prompt, *self.chosen, *self.rejected))


Documents = Sequence[str | Conversation | Pair]  # texts, (chat) conversations, or (preference) pairs


@dataclass
class Split:
    """One split as a single token stream: each document followed by EOS.

    Chat data adds `mask` and `starts`: its examples are scored and trained on one by one, and only
    the response tokens count. Preference data is stored as chat data with each pair's two sides one after
    the other (chosen, then rejected): `documents` counts sides, twice the pairs.
    """

    ids: np.ndarray  # (N,) token ids, uint16 or int32; a memory map when read from disk
    documents: int
    bytes: int  # UTF-8 bytes of the scored text (all of it; for chat, the responses), for bits per byte
    mask: np.ndarray | None = None  # (N,) bool: True on response tokens (chat only)
    starts: np.ndarray | None = None  # (documents + 1,) where each example starts in `ids`, then N (chat only)


@dataclass
class Corpus:
    """One source's tokenized training and validation streams."""

    train: Split
    validation: Split
    validation_source: str  # where validation came from, said in the logs and the summary
    empty_documents: int  # empty or blank documents (chat: conversations without a response) skipped
    cached: bool
    format: str = "text"  # "text", "chat" or "preference"
    overlap_warning: str | None = None  # validation documents that are training documents too; said every run


@dataclass
class Source:
    """One split's documents, read in groups (with how far the reading got, for progress) when iterated."""

    name: str  # the file, folder or dataset (and split), for messages
    format: str  # "text", "chat" or "preference"
    total: int  # its size, for progress: bytes of text files, rows of tables; 0: unknown (a stream)
    unit: str  # "MB" or "rows"
    read: Callable[[], Iterator[tuple[list[Any], int]]]  # (documents, bytes or rows read so far); can be called again

    def groups(self) -> Iterator[tuple[list[Any], int]]:
        """The documents in groups of about GROUP_CHARS characters (one long document may be a group alone)."""
        group: list[Any] = []
        chars = 0
        for docs, done in self.read():
            for d in docs:
                group.append(d)
                chars += len(d) if isinstance(d, str | Pair) else sum(len(m["content"]) for m in d)
                if chars >= GROUP_CHARS:
                    yield group, done
                    group, chars = [], 0
        yield group, self.total


# Where a source's validation comes from, as the plan decides it (SourcePlan.validation).
VALIDATION_KINDS = {
    "data": "validation data of its own (--validation-data, or `validation:` in a recipe's data list)",
    "split": "the data's own validation split (a hub dataset's `validation`, a folder's valid/validation/dev file)",
    "held_out": "a share of the documents held out by a hash of their text (the last tokens of a single document)",
    "prepared": "the validation split written by lmtune prepare",
}


@dataclass(frozen=True)
class SourcePlan:
    """One source of training data as the plan decided it: what it is, how it is read, what it weighs and
    where its validation comes from. The reading functions take it where they took the config: it has the
    config's names for the settings they read (data_format, text_column, txt_documents)."""

    data: str  # the file, folder or hub dataset (local paths absolute)
    name: str  # short and unique among the run's sources: metrics, TensorBoard and the tables use it
    form: str  # "hub", "file", "folder" or "prepared"
    data_format: str  # "text", "chat" or "preference" (what auto found)
    text_column: str
    txt_documents: str
    weight: float | None  # relative weight as given; None: by size (each source once per epoch)
    validation: str  # a key of VALIDATION_KINDS
    validation_data: str | None  # kind "data": the file, folder or dataset
    validation_percent: float  # kind "held_out": the share held out
    streaming: bool = False

    def describe_validation(self) -> str:
        """Where validation comes from, in words (said in the plan; never parsed back)."""
        if self.validation == "data":
            return f"{self.validation_data}"
        if self.validation == "split":
            return f"the `validation` split of {self.data}"
        if self.validation == "prepared":
            return f"the validation split prepared in {self.data}"
        return f"{self.validation_percent:g}% of the documents of {self.data}, held out"


@dataclass(frozen=True)
class DataPlan:
    """What is trained on and what is held out, decided once (`plan.decide`) and read by everything after:
    training, streaming, `eval` and `eval --generate` of a run folder, `data show`, `prepare` and resume.
    Written into the run folder as data_plan.json."""

    sources: tuple[SourcePlan, ...]
    block_size: int | None = None  # tokens per row and evaluation window; set once the model is known
    packing: bool | None = None  # chat data packed several conversations a row; set once the model is known
    notes: tuple[str, ...] = field(default_factory=tuple)  # said with the plan (e.g. how weights were read)

    @property
    def chat(self) -> bool:
        return any(s.data_format == "chat" for s in self.sources)

    @property
    def preference(self) -> bool:
        """Preference pairs: trained with the DPO loss (all sources then are; the plan refuses a mix)."""
        return any(s.data_format == "preference" for s in self.sources)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPlan:
        return cls(
            tuple(SourcePlan(**s) for s in d["sources"]),
            d.get("block_size"),
            d.get("packing"),
            tuple(d.get("notes", ())),
        )
