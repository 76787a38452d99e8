"""Chat data: conversations rendered with the tokenizer's chat template (or lmtune's simple one), tokenized
with a mask of the response tokens, which are the only ones the loss counts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmtune.data.tokens import Workers, join, tokenize
from lmtune.data.types import CHUNK, Conversation, Documents, Pair, Split
from lmtune.errors import LmtuneError
from lmtune.events import Report

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


def render(tokenizer: Any, messages: Conversation, first: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The conversation as the chat template writes it, and the character spans of the responses in it
    (those from message `first` on: a preference pair's answers, not the assistant turns of its prompt).

    A response's span is what rendering it adds to the conversation before it plus the generation prompt,
    so the template's own end-of-turn marks count as part of the response, and the headings do not.
    """

    def text(msgs: Conversation, prompt: bool = False) -> str:
        out: str = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt)
        return out

    full = text(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
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


def has_text(doc: str | Conversation | Pair) -> bool:
    """A document worth training on: text that is not blank; a conversation with a non-blank response; a
    pair with a prompt and two answers that differ."""
    if isinstance(doc, Pair):
        return doc.bad is None
    if isinstance(doc, str):
        return bool(doc.strip())
    return any(m["role"] == "assistant" and m["content"].strip() for m in doc)


@dataclass
class Encoded:
    """Documents tokenized one by one; chat ones with their response masks, each ending in EOS. A preference
    pair is two sequences, chosen then rejected (`sides` 2), kept together."""

    ids: list[np.ndarray]
    masks: list[np.ndarray] | None  # chat only: True on response tokens
    nbytes: list[int]  # UTF-8 bytes of the scored text of each document (a pair: its chosen answer)
    sides: int = 1  # sequences per document

    def split(self, idx: Sequence[int], eos: int, dtype: Any) -> Split:
        nbytes = sum(self.nbytes[i] for i in idx)
        if self.masks is None:
            return Split(join([self.ids[i] for i in idx], eos, dtype), len(idx), nbytes)
        seqs = [i * self.sides + k for i in idx for k in range(self.sides)]
        ids = [self.ids[j] for j in seqs]
        starts = np.cumsum([0, *map(len, ids)]).astype(np.int64)
        mask = np.concatenate([self.masks[j] for j in seqs]) if ids else np.zeros(0, dtype=bool)
        stream = np.concatenate(ids).astype(dtype) if ids else np.zeros(0, dtype=dtype)
        return Split(stream, len(seqs), nbytes, mask, starts)


def encode(docs: Documents, tokenizer: Any, report: Report, what: str, workers: Workers | None = None) -> Encoded:
    """Token ids of each document (texts, here or by `workers`), or of each conversation with its response mask (chat)."""
    if not docs or isinstance(docs[0], str):
        texts = [d for d in docs if isinstance(d, str)]
        return Encoded(tokenize(texts, tokenizer, report, what, workers), None, [len(t.encode("utf-8")) for t in texts])
    ensure_chat_template(tokenizer)
    pairs = isinstance(docs[0], Pair)
    # (conversation, its first scored message): a pair is two, chosen then rejected, scored after the prompt.
    convs: list[tuple[Conversation, int]] = []
    for d in docs:
        if isinstance(d, Pair):
            convs += [(d.side("chosen"), len(d.prompt)), (d.side("rejected"), len(d.prompt))]
        elif not isinstance(d, str):
            convs.append((d, 0))
    all_ids, masks, nbytes = [], [], []
    eos = tokenizer.eos_token_id
    for start in range(0, len(convs), CHUNK):
        rendered = [render(tokenizer, c, first) for c, first in convs[start : start + CHUNK]]
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
        report({"event": "phase", "phase": f"tokenizing {what}", "done": start + len(rendered), "total": len(convs)})
    if pairs:  # bits per byte of a pair: of its chosen answer, the text eval_loss scores
        return Encoded(all_ids, masks, nbytes[::2], sides=2)
    return Encoded(all_ids, masks, nbytes)
