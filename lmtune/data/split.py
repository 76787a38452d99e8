"""The held-out split: which documents are validation, decided by a hash of their content.

A document is held out when a hash of its content falls under the validation share: the same documents
whatever the group size, the number of workers or the order of the files, and every copy of a document on
the same side (so held-out validation never repeats training text).
"""

from __future__ import annotations

import hashlib
import json

from lmtune.data.types import Conversation, Documents, Pair, log

SPLIT_SEED = 0  # the held-out documents depend on the data only, so every run compares on the same ones
# The share of the validation text (in characters) that, when it repeats training documents, makes the
# overlap a warning rather than a note: below it, the repeats are short lines such as headings (WikiText-2's
# test split repeats 200 of its validation split's 1,160 paragraphs, all headings, 0.4% of its text).
OVERLAP_WARNING = 0.01


def content_hash(doc: str | Conversation | Pair) -> int:
    """A document's identity, 64 bits: its text (a conversation's roles and texts; a pair's prompt and both
    answers, so its two sides stay together) less the whitespace at either end, as the overlap check compares
    documents; hashed with SPLIT_SEED."""

    def turns(c: Conversation) -> list[tuple[str, str]]:
        return [(m["role"], m["content"].strip()) for m in c]

    if isinstance(doc, Pair):
        text = json.dumps([turns(doc.prompt), turns(doc.chosen), turns(doc.rejected)])
    else:
        text = doc.strip() if isinstance(doc, str) else json.dumps(turns(doc))
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


def document_length(doc: str | Conversation | Pair) -> int:
    """Characters of text, for the share of the validation text that repeats training documents."""
    return len(doc) if isinstance(doc, str | Pair) else sum(len(m["content"]) for m in doc)


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
