"""A table row as a document: a conversation (its messages checked), or a preference pair."""

from __future__ import annotations

from typing import Any

from lmtune.data.types import ROLES, Conversation, Pair
from lmtune.errors import LmtuneError


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


def document(
    batch: dict[str, list[Any]], columns: list[str], i: int, row: int, source: str
) -> str | Conversation | Pair:
    """Row i of a batch: its text, its conversation (checked, named by its row in the table), or its pair."""
    if columns == ["messages"]:
        return check_conversation(batch["messages"][i], source, row)
    if "chosen" in columns:
        prompt = batch["prompt"][i] if "prompt" in batch else None
        return pair(prompt, batch["chosen"][i], batch["rejected"][i], source, row)
    if columns == ["prompt", "response"]:
        prompt, response = batch["prompt"][i], batch["response"][i]
        return check_conversation(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], source, row
        )
    return batch[columns[0]][i] or ""


def pair(prompt: Any, chosen: Any, rejected: Any, source: str, row: int) -> Pair:
    """A preference row as a Pair: plain strings (prompt, two answers), or as TRL's preference format has it,
    `chosen` and `rejected` as lists of messages, the prompt either its own list (or string) or, absent, the
    turns the two sides share at the start. A missing side becomes an empty answer: a bad pair, counted and
    skipped by the plan, not an error."""

    def turns(value: Any, role: str) -> Conversation:
        if value is None or (isinstance(value, str) and not value.strip()):
            return []
        if isinstance(value, str):
            return [{"role": role, "content": value}]
        return check_conversation(value, source, row) if value else []

    shared = turns(prompt, "user")
    good, bad = turns(chosen, "assistant"), turns(rejected, "assistant")
    if prompt is None and good and bad:  # the prompt is the turns both sides start with
        n = 0
        while n < min(len(good), len(bad)) - 1 and good[n] == bad[n]:
            n += 1
        shared, good, bad = good[:n], good[n:], bad[n:]
    for answer in (good, bad):
        if any(m["role"] != "assistant" for m in answer):
            raise LmtuneError(
                f"{source} row {row}: `chosen` and `rejected` must answer the prompt with assistant turns"
            )
    return Pair(shared, good, bad)
