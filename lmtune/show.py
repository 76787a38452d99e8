"""`lmtune data show`: the first training rows exactly as training sees them, token by token.

The rows come from the functions training uses (`data.load_corpus`, `batches.training_rows`, the collate
`batches.pad_batch`), so what is shown is what the model gets: the chat template's text, the tokens, the
EOS, the rows' conversations (several in a row when they are packed) and which tokens the loss counts.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
from rich.text import Text

from lmtune import batches, data, loss
from lmtune.config import Config, absolute_paths
from lmtune.data.types import Split
from lmtune.errors import LmtuneError
from lmtune.events import Report
from lmtune.model import from_pretrained, load_model, new_model_config

log = logging.getLogger("lmtune")


@dataclass
class Piece:
    """One token as shown (or the few tokens whose bytes make up one character between them)."""

    text: str
    loss: bool  # the loss counts it: some token before it in its conversation or block predicts it
    eos: bool
    label: str | None = None  # "conversation N" where a conversation starts in a packed row


@dataclass
class Shown:
    title: str  # which row, which conversations, how many tokens, how many in the loss
    pieces: list[Piece]


@dataclass
class View:
    about: list[str]  # what the data became: tokenizer, template, rows
    rows: list[Shown] = field(default_factory=list)


def training_view(cfg: Config, n: int, report: Report = lambda e: None) -> View:
    """The first `n` training rows of `cfg.data` with `cfg.model`'s tokenizer, as `finetune` would make them."""
    given = cfg.data_label  # as the user wrote it, for the output
    cfg = absolute_paths(cfg)  # the same token cache entry as the run's: this run prepares it
    plan = data.decide(cfg)
    if len(plan.sources) > 1:
        raise LmtuneError("lmtune data show shows one source; give --data once")
    tokenizer = data.tokenizer_for(cfg, plan, report)
    corpus = data.load_corpus(plan.sources[0], tokenizer, report)
    chat = corpus.format in ("chat", "preference")
    plan = rows_shape(cfg, plan, tokenizer, report)
    block_size, packing = plan.block_size or 0, bool(plan.packing)
    if chat:
        for warning in template_warnings(corpus.train, tokenizer):
            log.warning(warning)
    rows = batches.training_rows(corpus, block_size, packing)
    name = Path(str(tokenizer.name_or_path)).name or type(tokenizer).__name__
    src = plan.sources[0]
    about = [
        f"{given}: {corpus.format} data; tokenizer of {name} ({len(tokenizer):,} tokens, EOS {tokenizer.eos_token})",
        f"data plan: a {src.form}; validation: {src.describe_validation()}",
    ]
    if corpus.format == "preference":
        template = "lmtune's simple one" if tokenizer.chat_template == data.SIMPLE_TEMPLATE else "the tokenizer's own"
        about += [
            f"chat template: {template}; each pair is its prompt answered twice, the chosen answer then the rejected "
            "one; the DPO loss scores the answers' tokens only (their summed log-probabilities), each ending with EOS",
            f"{rows.conversations:,} pairs, one per row, up to {block_size} tokens a side ({corpus.empty_documents:,} "
            f"bad pairs skipped before: a side missing or blank, or chosen = rejected); {rows.truncated:,} sides cut "
            f"short at the block size, {rows.skipped:,} pairs skipped (an answer with no token left)",
        ]
    elif chat:
        template = "lmtune's simple one" if tokenizer.chat_template == data.SIMPLE_TEMPLATE else "the tokenizer's own"
        how = "packed into" if packing else "one per row in"
        about += [
            f"chat template: {template}; loss on the responses only, each conversation ending with EOS",
            f"{rows.conversations:,} conversations {how} {len(rows.dataset):,} rows of up to {block_size} tokens "
            f"({corpus.empty_documents:,} without a response skipped before, as training skips them); "
            f"{rows.truncated:,} cut short at the block size (losing their end and its EOS), {rows.skipped:,} skipped "
            "(no response token left)",
        ]
    else:
        about.append(
            f"documents joined by EOS and cut into {len(rows.dataset):,} blocks of {block_size} tokens "
            f"({rows.dropped:,} left over at the end); every token but each block's first is a target"
        )
    shown = min(n, len(rows.dataset))
    about.append(
        f"below: the first {shown:,} of the {len(rows.dataset):,} rows; training takes them in a shuffled order"
    )
    view = View(about)
    if isinstance(rows.dataset, batches.Pairs):
        for i in range(shown):
            view.rows += pair_rows(i, rows.dataset, tokenizer)
        return view
    for i in range(shown):
        # Collated alone, as training collates a batch (a row alone has no padding).
        inputs, labels, positions, _ = batches.pad_batch([rows.dataset[i]], tokenizer.pad_token_id)
        view.rows.append(shown_row(i, rows, corpus.train, tokenizer, inputs[0], labels[0], positions))
    return view


def rows_shape(cfg: Config, plan: data.DataPlan, tokenizer: Any, report: Report) -> data.DataPlan:
    """The plan's block size and packing, decided by the function training decides them with.

    Packing depends on the model (whether it keeps packed conversations apart), so for chat data with
    packing on the model is loaded as training loads it; otherwise its config is enough.
    """
    from lmtune import setup

    if plan.chat and cfg.packing:
        report({"event": "phase", "phase": "loading model"})
        return setup.rows_shape(cfg, plan, load_model(cfg, tokenizer), True)
    if cfg.from_scratch:
        config = new_model_config(cfg, tokenizer)
    else:
        from transformers import AutoConfig

        assert cfg.model, "checked by the caller"
        config = from_pretrained(AutoConfig, cfg.model, "model config", trust_remote_code=cfg.trust_remote_code)
    # The block size reads only the model's config: no weights are needed to know its context.
    return setup.rows_shape(cfg, plan, SimpleNamespace(config=config), True)


def shown_row(
    i: int, rows: batches.Rows, split: Split, tokenizer: Any, inputs: Any, labels: Any, positions: Any
) -> Shown:
    """Row `i` as pieces of text, with its title."""
    ids = inputs.tolist()
    # Position t is in the loss when its label is a token: the loss compares it with what t - 1 predicts,
    # so the first position of a row never is.
    in_loss = [t > 0 and label != loss.IGNORE for t, label in enumerate(labels.tolist())]
    spans = getattr(rows.dataset, "rows", None)  # chat: the conversations (start, end) of each row
    numbers = [] if spans is None or split.starts is None else [conversation(split, s) for s, _ in spans[i]]
    starts = {0} if numbers else set()
    if positions is not None:  # packed: a conversation starts where its position ids restart
        starts |= {t for t, p in enumerate(positions[0].tolist()) if p == 0}
    labels_at = dict(zip(sorted(starts), (f"conversation {c + 1:,}" for c in numbers), strict=False))
    pieces = []
    for a, b, text in decoded(tokenizer, ids):
        label = next((labels_at[t] for t in range(a, b) if t in labels_at), None) if len(numbers) > 1 else None
        eos = tokenizer.eos_token_id in ids[a:b]
        pieces.append(Piece(text, any(in_loss[a:b]), eos, label))
    scored, total = sum(in_loss), len(rows.dataset)
    if not numbers:
        title = f"block {i + 1:,} of {total:,} ({len(ids):,} tokens, {scored:,} in the loss)"
    elif len(numbers) == 1:
        assert spans is not None and split.starts is not None
        cut = ", cut at the block size" if spans[i][0][1] < split.starts[numbers[0] + 1] else ""
        title = f"row {i + 1:,} of {total:,}: conversation {numbers[0] + 1:,} ({len(ids):,} tokens{cut}, {scored:,} in the loss)"
    else:
        which = ", ".join(f"{c + 1:,}" for c in numbers[:-1]) + f" and {numbers[-1] + 1:,}"
        title = f"row {i + 1:,} of {total:,}: conversations {which} ({len(ids):,} tokens, {scored:,} in the loss)"
    return Shown(title, pieces)


def pair_rows(i: int, pairs: batches.Pairs, tokenizer: Any) -> list[Shown]:
    """Pair `i` as training collates it: its chosen side, then its rejected side, each with the tokens scored."""
    inputs, labels, _, _ = batches.pad_pairs([pairs[i]], tokenizer.pad_token_id)
    out = []
    for side, name in enumerate(("chosen", "rejected")):
        start, end = (pairs.pairs[i][1], pairs.pairs[i][2])[side]
        length = end - start  # without the padding
        ids, labs = inputs[0, side, :length].tolist(), labels[0, side, :length].tolist()
        in_loss = [t > 0 and label != loss.IGNORE for t, label in enumerate(labs)]
        pieces = [
            Piece(text, any(in_loss[a:b]), tokenizer.eos_token_id in ids[a:b]) for a, b, text in decoded(tokenizer, ids)
        ]
        title = f"pair {i + 1:,} of {len(pairs):,}, {name} ({len(ids):,} tokens, {sum(in_loss):,} scored: the answer)"
        out.append(Shown(title, pieces))
    return out


def conversation(split: Split, start: int) -> int:
    """The index of the conversation that starts at token `start` of the split."""
    assert split.starts is not None
    return int(np.searchsorted(split.starts, start, side="right")) - 1


def decoded(tokenizer: Any, ids: list[int]) -> list[tuple[int, int, str]]:
    """(first, end, text) of each token; a character whose bytes span several tokens (byte-level BPE) makes
    one piece of them all, since a part of it has no text to show."""
    out, first = [], 0
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[first:end], clean_up_tokenization_spaces=False)
        if text.endswith("\ufffd") and end < len(ids) and end - first < 4:  # UTF-8: at most 4 bytes
            continue
        out.append((first, end, text))
        first = end
    return out


def template_warnings(split: Split, tokenizer: Any) -> list[str]:
    """What the chat template does wrong across all the training conversations: answers it leaves no token
    of to train on, and responses it ends without EOS (the model then learns to write on, and generation
    stops only at EOS)."""
    assert split.starts is not None and split.mask is not None
    ids, mask, eos = np.asarray(split.ids), np.asarray(split.mask, dtype=bool), tokenizer.eos_token_id
    empty = responses = open_ended = 0
    after = ""  # what follows a response that does not end with EOS, as an example
    for s, e in itertools.pairwise(split.starts.tolist()):
        tokens, response = ids[s:e], mask[s:e]
        if not (response & (tokens != eos)).any():
            empty += 1
        edges = np.flatnonzero(np.diff(np.concatenate([[0], response.astype(np.int8), [0]])))
        for a, b in zip(edges[0::2], edges[1::2], strict=True):  # each run of response tokens
            responses += 1
            if not (tokens[a:b] == eos).any():
                open_ended += 1
                after = after or tokenizer.decode(tokens[b : b + 6].tolist())
    out = []
    conversations = len(split.starts) - 1
    if empty:
        out.append(
            f"the chat template leaves no token of the answer to train on in {empty:,} of {conversations:,} "
            "conversations (the loss sees at most the EOS lmtune adds): it writes no text for their assistant "
            "turns; check the template's assistant branch, or pass --tokenizer with another template"
        )
    if open_ended:
        out.append(
            f"the chat template ends {open_ended:,} of {responses:,} responses without EOS ({tokenizer.eos_token}): "
            f"after them the model learns to write on ({after!r} follows one), while `lmtune generate` stops only "
            "at EOS; end each assistant turn with {{ eos_token }} in the template"
        )
    return out


# --- as text -------------------------------------------------------------------------------------------

SEPARATOR = "·"  # between tokens, in plain output
OPEN, CLOSE = "⟦", "⟧"  # around the tokens the loss counts, in plain output
NEWLINE = "↵"  # shown before each newline, so that a token holding one can be seen
SHADES = ("on grey15", "on grey27")  # token backgrounds alternate on a terminal, to show where each ends
LEGEND_PLAIN = (
    f"tokens are separated by {SEPARATOR}; {OPEN} {CLOSE} enclose the tokens the loss counts; {NEWLINE} is a newline; "
    "[conversation N] starts a conversation in a packed row"
)


def legend(colour: bool) -> Text:
    """What the marks (plain) or colours (terminal) mean."""
    if not colour:
        return Text(LEGEND_PLAIN)
    return Text.assemble(
        ("counted in the loss", "bold green"), "  ", ("context only", "dim"), "  ", ("EOS", "bold magenta"),
        " (dim: not counted)", f"  {NEWLINE} newline; the shading alternates from token to token",
    )  # fmt: skip


def as_text(row: Shown, colour: bool) -> Text:
    """A row token by token: coloured on a terminal, marked with SEPARATOR, OPEN and CLOSE otherwise."""
    text = Text()
    inside = False  # within a run of loss tokens (plain)
    for i, piece in enumerate(row.pieces):
        if piece.label:
            if inside and not colour:
                text.append(CLOSE)
                inside = False
            if i:
                text.append("\n")
            text.append(f"[{piece.label}] ", style="bold cyan" if colour else "")
        shown = piece.text.replace("\n", f"{NEWLINE}\n")
        if colour:
            kind = (
                ("bold " if piece.loss else "dim ") + "magenta" if piece.eos else "bold green" if piece.loss else "dim"
            )
            text.append(shown, style=f"{kind} {SHADES[i % 2]}")
            continue
        mark = ""
        if piece.loss != inside:
            mark, inside = (OPEN if piece.loss else CLOSE), piece.loss
        elif i and not piece.label:
            mark = SEPARATOR
        text.append(mark + shown)
    if inside and not colour:
        text.append(CLOSE)
    return text
