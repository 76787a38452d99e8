"""Loss, perplexity and bits per byte of a model on a token stream, each token scored once.

The same function scores validation during training and in `lmtune eval`, so their figures agree.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune import batches, checkpoint, data, loss, runs
from lmtune.config import Config, build
from lmtune.data import plan as data_plan
from lmtune.data import streaming
from lmtune.data.types import DataPlan, SourcePlan, Split
from lmtune.errors import LmtuneError, first_line
from lmtune.events import Report
from lmtune.generate import load
from lmtune.model import context_length, load_tokenizer, resolve_block_size


@dataclass
class Score:
    tokens: int  # tokens scored (predicted with at least one token of context before them)
    nll: float  # their summed negative log-likelihood, in nats
    stream_tokens: int  # tokens in the stream, scored or not
    bytes: int  # UTF-8 bytes of the text the stream encodes

    @property
    def loss(self) -> float:
        """Mean NLL per scored token (nats): a token-weighted mean, not a mean of batch means."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)

    @property
    def bits_per_byte(self) -> float:
        """Bits per UTF-8 byte of text: loss in bits times tokens per byte. Comparable across tokenizers."""
        return self.loss / math.log(2) * self.stream_tokens / self.bytes

    @classmethod
    def total(cls, scores: list[Score]) -> Score:
        """Several scores as one: the token-weighted whole (summed NLL over summed tokens)."""
        if len(scores) == 1:
            return scores[0]
        return cls(*(sum(getattr(s, f) for s in scores) for f in ("tokens", "nll", "stream_tokens", "bytes")))

    def as_dict(self) -> dict[str, float | int]:
        return {
            "tokens": self.tokens,
            "loss": self.loss,
            "perplexity": self.perplexity,
            "bits_per_byte": self.bits_per_byte,
        }


def windows(n: int, block_size: int, stride: int) -> list[tuple[int, int, int]]:
    """(start, end, first_target) of each window over a stream of n tokens.

    Every token from position 1 on is a target exactly once, predicted from up to `block_size` tokens
    that end right before it. With stride == block_size the windows do not overlap and each window's
    first token has no context in it, so it is not scored; with a smaller stride every token after
    the first is scored with at least block_size - stride tokens of history.
    """
    out, prev_end = [], 0
    for start in range(0, n, stride):
        end = min(start + block_size, n)
        first = max(prev_end, start + 1)
        if first < end:
            out.append((start, end, first))
        prev_end = end
        if end == n:
            break
    return out


@torch.no_grad()
def score(
    model: Any,
    split: Split,
    block_size: int,
    stride: int,
    batch_size: int,
    *,
    rank: int = 0,
    world: int = 1,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
    report: Report = lambda e: None,
    chunked: bool = True,
    packing: bool = False,
) -> Score:
    """Score `split` with `model`. Across processes each takes every world-th row; `reduce` sums.

    Chat splits are scored one conversation per window (cut to `block_size`), on their response tokens only;
    with `packing`, several conversations share a row as in training, each with its own position ids.
    chunked=False: always the full logits (a sharded model's output weights cannot be read outside forward).
    """
    device = next(model.parameters()).device
    ids = torch.from_numpy(np.asarray(split.ids, dtype=np.int64))
    response = None if split.mask is None else torch.from_numpy(np.asarray(split.mask, dtype=bool))
    every: list[list[tuple[int, int, int]]]  # rows of windows (start, end, first target)
    if split.starts is not None:  # chat: a conversation per window, its first token not a target
        spans = [(s, min(e, s + block_size)) for s, e in itertools.pairwise(split.starts.tolist())]
        rows = batches.pack_spans(spans, block_size) if packing else [[span] for span in spans]
        every = [[(s, e, s + 1) for s, e in row] for row in rows]
    else:
        every = [[window] for window in windows(len(ids), block_size, stride)]
    mine = every[rank::world]
    # Under FSDP each forward gathers the weights from all processes, so every process runs as many
    # batches: the ones with a row less get a copy of the first window that scores nothing.
    start, end, _ = every[0][0]
    mine += [[(start, end, end)]] * (math.ceil(len(every) / world) - len(mine))
    nll = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    chunked = chunked and loss.supported(model)
    was_training = model.training
    model.eval()
    for b in range(0, len(mine), batch_size):
        inputs, labels, positions = window_batch(mine[b : b + batch_size], ids, response, block_size, packing)
        inputs, labels = inputs.to(device), labels.to(device)
        positions = positions.to(device) if positions is not None else None
        targets = labels[:, 1:].flatten()  # position t predicts token t+1
        with autocast():  # causal, so right padding changes nothing before it
            nll += loss.next_token_nll(model, model, inputs, targets, chunked, positions).double()
        count += (targets != loss.IGNORE).sum()
        report({"event": "phase", "phase": "evaluating", "done": min(b + batch_size, len(mine)), "total": len(mine)})
    model.train(was_training)
    nll, count = reduce(nll), reduce(count)
    # Bits per byte relate the scored tokens to the bytes of their text: all of it, or (chat) the responses.
    stream_tokens = int(response.sum()) if response is not None else len(ids)
    return Score(int(count.item()), float(nll.item()), stream_tokens, split.bytes)


def window_batch(
    rows: list[list[tuple[int, int, int]]],
    ids: torch.Tensor,
    response: torch.Tensor | None,
    block_size: int,
    packed: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(B, T) inputs, labels (IGNORE where not scored) and, for packed rows, position ids restarting at each
    window; short rows right-padded (padding's positions go on from the last window's)."""
    inputs = torch.zeros(len(rows), block_size, dtype=torch.int64)
    labels = torch.full((len(rows), block_size), loss.IGNORE, dtype=torch.int64)
    positions = torch.zeros((len(rows), block_size), dtype=torch.int64) if packed else None
    for r, row in enumerate(rows):
        at = 0
        for start, end, first in row:
            n = end - start
            inputs[r, at : at + n] = ids[start:end]
            labels[r, at + first - start : at + n] = ids[first:end]
            if response is not None:
                labels[r, at : at + n].masked_fill_(~response[start:end], loss.IGNORE)
            if positions is not None:
                positions[r, at : at + n] = torch.arange(n)
            at += n
        if positions is not None:
            positions[r, at:] = positions[r, at - 1] + 1 + torch.arange(block_size - at)
    return inputs, labels, positions


def describe(tokenizer: Any, context: int, stride: int) -> str:
    """Which perplexity a figure is: they are only comparable with the same tokenizer, context and stride."""
    name = Path(str(getattr(tokenizer, "name_or_path", "") or "")).name or type(tokenizer).__name__
    return f"token-level perplexity; tokenizer {name} ({len(tokenizer)} tokens); context {context}; stride {stride}"


def trained_block_size(run: Path) -> int:
    """The block size `run` was trained with, as its summary.json says: the context its figures used."""
    path = run / runs.SUMMARY
    try:
        summary = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LmtuneError(f"cannot read {path} ({first_line(err)}); pass --block-size to evaluate without it") from None
    value = summary.get("block_size") if isinstance(summary, dict) else None
    if value is None:
        raise LmtuneError(f"{path} has no block_size; pass --block-size")
    if not isinstance(value, int) or isinstance(value, bool) or value < 2:
        raise LmtuneError(f"{path} has block_size {value!r}, not a number of tokens; pass --block-size")
    return value


def validation_name(src: SourcePlan) -> str:
    """The data a source's validation is, for the output: its validation data, else the source's own name."""
    return src.validation_data if src.validation == "data" and src.validation_data else src.data


def run_validation(plan: DataPlan, cfg: Config, tokenizer: Any, report: Report) -> list[Split]:
    """A run folder's validation data, each source's exactly as its plan held it out."""
    if cfg.streaming:
        return [c.validation for c in streaming.validation_corpora(plan, tokenizer, report)]
    corpora = data.load_corpora(plan, tokenizer, report)
    return [chosen_sides(c.validation) if c.format == "preference" else c.validation for c in corpora]


def chosen_sides(split: Split) -> Split:
    """A preference split's chosen sides as a chat split: what a DPO run's eval_loss scores (the chosen answers)."""
    assert split.starts is not None and split.mask is not None
    starts = split.starts.tolist()
    spans = [(starts[k], starts[k + 1]) for k in range(0, len(starts) - 1, 2)]
    ids = np.concatenate([np.asarray(split.ids[s:e]) for s, e in spans])
    mask = np.concatenate([np.asarray(split.mask[s:e]) for s, e in spans])
    return Split(ids, len(spans), split.bytes, mask, np.cumsum([0, *(e - s for s, e in spans)]).astype(np.int64))


def check_models(models: list[str]) -> None:
    """Before any work: every model can be found (its tokenizer loads), and none is an unfinished run, so that
    a missing second model does not lose the first one's figures."""
    for name in models:
        folder = Path(name).expanduser()
        # A run folder without its summary and without a model in it (a merged model keeps its run's config)
        model_there = any((folder / f).is_file() for f in ("config.json", "adapter_config.json"))
        if (folder / runs.CONFIG).is_file() and not (folder / runs.SUMMARY).is_file() and not model_there:
            kept = checkpoint.complete(folder / runs.CHECKPOINTS)
            newest = f"evaluate its newest checkpoint (lmtune eval {kept[-1]} --data DATA) or " if kept else ""
            raise LmtuneError(
                f"{name} is an unfinished run (no {runs.SUMMARY}): {newest}finish it first: "
                f"lmtune finetune --recipe {folder / runs.CONFIG} --output {folder} --resume"
            )
        load_tokenizer(name, what="model", needs_eos=False)


def evaluate_models(
    models: list[str],
    data_spec: str | None,
    block_size: int | None,
    stride: int | None,
    batch_size: int,
    text_column: str = "text",
    report: Report = lambda e: None,
) -> list[dict[str, Any]]:
    """Score each model on the same data: --data, else the validation data of the first run folder given."""

    def run_of(name: str) -> Path | None:
        return Path(name) if (Path(name) / runs.CONFIG).is_file() and (Path(name) / runs.SUMMARY).is_file() else None

    check_models(models)
    run = next((r for r in map(run_of, models) if r), None)
    if data_spec is None and run is None:
        raise LmtuneError("none of these models is a run folder with its own validation data; pass --data")
    run_cfg = build(str(run / runs.CONFIG)) if run else None
    run_plan = data_plan.read(run, run_cfg) if run and run_cfg else None
    streams: dict[str, list[Split]] = {}  # the data tokenized once per tokenizer: a run and its base share one
    results = []
    for name in models:
        report({"event": "phase", "phase": f"loading {name}"})
        net, tok = load(name)
        if tok.eos_token_id is None:
            raise LmtuneError(
                f"the tokenizer of {name} has no EOS token; lmtune eval scores documents joined by EOS into one "
                "stream, as training saw them, so it cannot score this model's perplexity (eval --generate can)"
            )
        own_run = run_of(name)
        window = resolve_block_size(block_size or (trained_block_size(own_run) if own_run else None), net)
        step = stride or window
        if step > window:
            raise LmtuneError(f"--stride {step} is longer than the block size of {window}; use at most {window}")
        key = data.tokenizer_fingerprint(tok)
        if data_spec:
            if key not in streams:
                streams[key] = [data.eval_split(data_spec, Config(text_column=text_column), tok, report)]
            splits, where = streams[key], data_spec
        else:
            assert run and run_cfg and run_plan
            if key not in streams:
                streams[key] = run_validation(run_plan, run_cfg, tok, report)
            splits = streams[key]
            where = f"the validation data of {run} ({'; '.join(map(validation_name, run_plan.sources))})"
        if sum(len(split.ids) for split in splits) < 2:
            raise LmtuneError(f"{where} is shorter than 2 tokens; nothing to score")
        # Chat: packed as training scores it (much faster); each source alone, then their token-weighted whole.
        packing = any(split.starts is not None for split in splits) and batches.packing_works(net)
        scores = [score(net, split, window, step, batch_size, report=report, packing=packing) for split in splits]
        s = Score.total(scores)
        result: dict[str, Any] = {
            "model": name, "data": where, **s.as_dict(), "context": window, "stride": step,
            "tokenizer": Path(str(tok.name_or_path)).name, "vocab": len(tok),
            "model_context": context_length(net), "perplexity_kind": describe(tok, window, step),
        }  # fmt: skip
        if len(scores) > 1 and run_plan:
            result["sources"] = [
                {"name": src.name, **one.as_dict()} for src, one in zip(run_plan.sources, scores, strict=True)
            ]
        results.append(result)
    return results
