"""Preference tuning: the DPO loss (Rafailov et al. 2023, its sigmoid form) on pairs of answers, in the same loop.

For a pair (prompt x, chosen answer y_w, rejected answer y_l), with log pi(y|x) the SUM of the log-probabilities
of an answer's tokens (the paper's sequence log-likelihood, not a per-token mean):

    reward(y)  = beta * (log pi(y|x) - log ref(y|x))          the implicit reward
    loss       = -log sigmoid(reward(y_w) - reward(y_l))       the mean over the pairs of an optimizer step

The reference's log-probabilities are computed once, before step 1, and kept in the token cache (keyed on the
reference model and the tokens), so a training step is one forward and backward of the policy on both sides
together. With --lora the reference is the model with its adapter switched off: no second copy of the weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmtune import atomic, batches, loss, runs
from lmtune.data.types import Split
from lmtune.errors import LmtuneError
from lmtune.evaluate import Score

log = logging.getLogger("lmtune")

REFERENCE_VERSION = 1  # bump when the way reference log-probabilities are computed changes
PHASE = "scoring the reference's log-probabilities, pairs"
BASELINE = "step 0 scores the reference against itself: loss log 2 = 0.6931 and accuracy 0.5 by construction"


@dataclass
class Preference:
    """What DPO adds to a run: beta, the reference in words, and the pairs trained on and held out (each
    source's), which carry their reference log-probabilities once `score_reference` has run."""

    beta: float
    reference: str
    train: list[batches.Pairs]
    validation: list[batches.Pairs]
    validation_splits: list[Split]
    reference_seconds: float = 0.0  # the one pass over the pairs that scored the reference (0: from the cache)


def side_logps(
    model: Any, plain: Any, inputs: torch.Tensor, labels: torch.Tensor, chunked: bool, autocast: Callable[[], Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) summed log-probabilities of each side's answer tokens (chosen, rejected) in one forward of both
    sides together, and (B, 2) how many answer tokens each has. inputs, labels: (B, 2, T)."""
    b, _, t = inputs.shape
    with autocast():
        logps = loss.token_logprobs(model, plain, inputs.reshape(2 * b, t), labels.reshape(2 * b, t), chunked)
    return logps.sum(-1).view(b, 2), (labels[..., 1:] != loss.IGNORE).sum(-1)


def dpo_losses(
    policy: torch.Tensor, reference: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) DPO loss of each pair, and the implicit rewards of its chosen and rejected answers, from (B, 2)
    summed log-probabilities of the policy and of the reference."""
    rewards = beta * (policy - reference.to(policy.dtype))  # (B, 2)
    chosen, rejected = rewards[:, 0], rewards[:, 1]
    return -F.logsigmoid(chosen - rejected), chosen, rejected


def forward_backward(run: Any, group: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one optimizer step on preference pairs: returns the summed DPO loss, the pairs, and whether
    every loss was finite (on device).

    The loss is the mean over the step's pairs (as in the paper): each pair's loss is divided by the pairs of
    the whole step, all its micro-batches on all processes, so every pair weighs the same wherever it falls
    (the analogue of the token weighting of text and chat data)."""
    acc, beta = run.accelerator, run.dpo.beta
    device = acc.device
    step_pairs = acc.reduce(torch.tensor(sum(len(b[0]) for b in group), device=device), "sum").clamp(min=1)
    total, pairs = torch.zeros((), device=device), torch.zeros((), dtype=torch.long, device=device)
    finite = torch.ones((), dtype=torch.bool, device=device)
    for i, (inputs, labels, reference, _) in enumerate(group):  # (B, 2, T), (B, 2, T), (B, 2)
        with acc.no_sync(run.model) if i < len(group) - 1 else contextlib.nullcontext():
            policy, _ = side_logps(run.model, run.plain, inputs, labels, run.chunked, acc.autocast)
            losses, _, _ = dpo_losses(policy, reference, beta)
            acc.backward(losses.sum() / step_pairs * acc.num_processes)  # x processes: their average is the sum
        finite &= torch.isfinite(losses.detach().sum())
        total += losses.detach().sum()
        pairs += len(inputs)
    return total, pairs, finite


@torch.no_grad()
def pair_logps(
    model: Any,
    pairs: batches.Pairs,
    batch_size: int,
    pad_id: int,
    *,
    chunked: bool,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    rank: int = 0,
    world: int = 1,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(pairs in the split, 2) summed answer log-probabilities and answer tokens of the kept pairs (this process's
    share: every world-th), in eval mode; NaN and 0 for the others."""
    device = next(model.parameters()).device
    sums = np.full((len(pairs.reference), 2), np.nan)
    counts = np.zeros((len(pairs.reference), 2), dtype=np.int64)
    mine = list(range(rank, len(pairs), world))
    was_training = model.training
    model.eval()
    try:
        for b in range(0, len(mine), batch_size):
            rows = mine[b : b + batch_size]
            inputs, labels, _, _ = batches.pad_pairs([pairs[i] for i in rows], pad_id)
            s, c = side_logps(model, model, inputs.to(device), labels.to(device), chunked, autocast)
            at = [pairs.pairs[i][0] for i in rows]
            sums[at], counts[at] = s.double().cpu().numpy(), c.cpu().numpy()
            if report:
                report({"event": "phase", "phase": PHASE, "done": b + len(rows), "total": len(mine)})
    finally:
        model.train(was_training)
    return sums, counts


# --- the reference, once --------------------------------------------------------------------------------


def model_identity(name: str) -> Any:
    """What a model is, for the reference's cache key: a folder's files by name, size and time; a hub id."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [
            str(path.resolve()),
            [(str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files],
        ]
    return name


def reference_key(run: Any) -> str:
    """The reference log-probabilities depend on the reference model, the tokens of every pair (which hold the
    data, the tokenizer and its template), the block size they were cut to, and the precision."""
    digest = hashlib.sha256()
    for pairs in [*run.dpo.train, *run.dpo.validation]:
        for array in (pairs.ids, pairs.mask, np.asarray([p for _, *spans in pairs.pairs for s in spans for p in s])):
            digest.update(np.ascontiguousarray(array).data)
    parts = [
        REFERENCE_VERSION, model_identity(run.cfg.reference or run.cfg.model), run.cfg.dtype,
        run.accelerator.mixed_precision, run.block_size, digest.hexdigest(),
    ]  # fmt: skip
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


@contextlib.contextmanager
def reference_model(run: Any) -> Iterator[Any]:
    """The reference: --reference; else the starting model: with --lora the model with its adapter off, before
    step 1 the policy itself, and after a resume the starting weights loaded again."""
    from lmtune.model import load_model

    cfg = run.cfg
    if cfg.lora and not cfg.reference:
        with run.plain.disable_adapter():
            yield run.plain
        return
    if not cfg.reference and run.resume_from is None:
        yield run.plain
        return
    name = cfg.reference or cfg.model
    other = load_model(cfg.model_copy(update={"model": name, "from_scratch": False}), run.tokenizer)
    try:
        yield other.to(run.accelerator.device)
    finally:
        del other


def score_reference(run: Any) -> None:
    """The reference's log-probabilities of every training and validation pair, computed once before step 1 on
    the main process (the others read them from the cache it writes) and set on each Pairs."""
    sets = [*run.dpo.train, *run.dpo.validation]
    path = runs.home() / "tokens" / "references" / f"{reference_key(run)}.npz"
    start = time.perf_counter()
    with run.accelerator.main_process_first():
        if not path.is_file():
            run.say({"event": "phase", "phase": f"scoring the reference ({run.dpo.reference}) once"})
            with reference_model(run) as ref:
                scored = [
                    pair_logps(
                        ref, pairs, run.cfg.batch_size, run.tokenizer.pad_token_id,
                        chunked=run.chunked, autocast=run.accelerator.autocast, report=run.say,
                    )[0]
                    for pairs in sets
                ]  # fmt: skip
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic.written_beside(path) as tmp, tmp.open("wb") as f:
                np.savez(f, *scored)
            run.dpo.reference_seconds = time.perf_counter() - start
        else:
            log.info("reference log-probabilities from cache %s", path)
    with np.load(path) as saved:
        for i, pairs in enumerate(sets):
            pairs.reference = saved[f"arr_{i}"]
            kept = [k for k, _, _ in pairs.pairs]
            if not np.isfinite(pairs.reference[kept]).all():
                raise LmtuneError(
                    f"the reference log-probabilities in {path} are not finite; delete the file to score it again"
                )


# --- evaluation -------------------------------------------------------------------------------------------


@dataclass
class PairScore:
    """Sums over held-out pairs, each figure said per pair or per token (so sources add up)."""

    pairs: int
    loss: float  # summed DPO loss
    correct: float  # pairs whose chosen answer has the higher implicit reward (a tie counts half)
    margin: float  # summed reward margins, reward(chosen) - reward(rejected)
    chosen_logp: float  # summed log-probabilities of the chosen answers' tokens
    chosen_tokens: int
    rejected_logp: float
    rejected_tokens: int

    @classmethod
    def total(cls, scores: list[PairScore]) -> PairScore:
        return cls(*(sum(getattr(s, f) for s in scores) for f in cls.__dataclass_fields__))  # type: ignore[arg-type]

    def figures(self) -> dict[str, float]:
        """The reported figures: means over pairs, and log-probabilities per answer token."""
        n = max(self.pairs, 1)
        return {
            "eval_dpo_loss": self.loss / n,  # mean over pairs, as trained
            "eval_reward_accuracy": self.correct / n,
            "eval_reward_margin": self.margin / n,
            "eval_chosen_logp": self.chosen_logp / max(self.chosen_tokens, 1),  # per token
            "eval_rejected_logp": self.rejected_logp / max(self.rejected_tokens, 1),
        }


def score_pairs(run: Any, pairs: batches.Pairs, split: Split) -> tuple[PairScore, Score]:
    """One source's held-out pairs scored by the policy against the reference (pairs split across processes),
    and the NLL of their chosen answers as the usual Score (eval_loss: how likely the chosen answers are)."""
    acc = run.accelerator
    model = run.model if run.fsdp else run.plain
    sums, counts = pair_logps(
        model, pairs, run.cfg.batch_size, run.tokenizer.pad_token_id, chunked=run.chunked,
        autocast=acc.autocast, rank=acc.process_index, world=acc.num_processes,
    )  # fmt: skip
    mine = np.isfinite(sums[:, 0])
    policy, reference = torch.from_numpy(sums[mine]), torch.from_numpy(pairs.reference[mine])
    losses, chosen, rejected = dpo_losses(policy, reference, run.dpo.beta)
    margin = chosen - rejected
    local = torch.tensor(
        [
            float(mine.sum()), losses.sum().item(), ((margin > 0).double() + 0.5 * (margin == 0).double()).sum().item(),
            margin.sum().item(), float(sums[mine, 0].sum()), float(counts[mine, 0].sum()),
            float(sums[mine, 1].sum()), float(counts[mine, 1].sum()),
        ],
        dtype=torch.float64, device=acc.device,
    )  # fmt: skip
    t = acc.reduce(local, "sum").tolist()
    s = PairScore(int(t[0]), t[1], t[2], t[3], t[4], int(t[5]), t[6], int(t[7]))
    chosen_stream = chosen_answer_tokens(split)
    return s, Score(s.chosen_tokens, -s.chosen_logp, chosen_stream, split.bytes)


def chosen_answer_tokens(split: Split) -> int:
    """Answer tokens of the chosen sides of a preference split (its scored stream, for bits per byte)."""
    assert split.starts is not None and split.mask is not None
    starts = split.starts.tolist()
    return int(sum(split.mask[starts[k] : starts[k + 1]].sum() for k in range(0, len(starts) - 1, 2)))


def evaluate(run: Any, step: int) -> tuple[Score, list[Score], dict[str, Any]]:
    """Every source's held-out pairs: the chosen answers' NLL as Scores, and the DPO figures of the whole
    (and of each source when there are several), for the eval event."""
    results = [score_pairs(run, p, s) for p, s in zip(run.dpo.validation, run.dpo.validation_splits, strict=True)]
    whole = PairScore.total([r[0] for r in results])
    figures: dict[str, Any] = {**whole.figures(), "eval_pairs": whole.pairs}
    if step == 0:
        figures["baseline"] = (
            BASELINE if run.cfg.reference is None else "step 0: the starting model against --reference"
        )
    if len(results) > 1:
        figures["dpo_sources"] = [r[0].figures() for r in results]
    if not math.isfinite(figures["eval_dpo_loss"]) and step:
        raise LmtuneError(f"the evaluation DPO loss became {figures['eval_dpo_loss']} at step {step}")
    return Score.total([r[1] for r in results]), [r[1] for r in results], figures


# --- lmtune eval on preference data: any models, no reference -------------------------------------------------


def is_preference(data_spec: str | None, text_column: str) -> bool:
    """Whether `lmtune eval --data` names preference pairs (scored by `models_on_pairs`, not by perplexity)."""
    from lmtune import data
    from lmtune.config import Config

    return bool(data_spec) and data.eval_source(str(data_spec), Config(text_column=text_column)).format == "preference"


def models_on_pairs(
    models: list[str], data_spec: str, block_size: int | None, batch_size: int, text_column: str, report: Any
) -> list[dict[str, Any]]:
    """Each model on the same preference pairs, without a reference: the share of pairs whose chosen answer it
    gives the higher log-probability per token (a tie counts half), and the mean margin in log-probability per
    token, chosen minus rejected; so base, SFT and DPO models compare side by side."""
    from lmtune import data
    from lmtune.config import Config
    from lmtune.generate import load
    from lmtune.model import resolve_block_size

    results = []
    for name in models:
        report({"event": "phase", "phase": f"loading {name}"})
        net, tok = load(name)
        window = resolve_block_size(block_size, net)
        split = data.eval_split(data_spec, Config(text_column=text_column, data_format="preference"), tok, report)
        pairs = batches.Pairs(split, window)
        if not len(pairs):
            raise LmtuneError(f"no pair of {data_spec} keeps a token of both answers within {window} tokens")
        sums, counts = pair_logps(net, pairs, batch_size, tok.pad_token_id or 0, chunked=loss.supported(net))
        kept = np.isfinite(sums[:, 0])
        per_token = sums[kept] / counts[kept]  # (pairs, 2) mean log-probability per answer token
        margin = per_token[:, 0] - per_token[:, 1]
        results.append({
            "model": name, "data": data_spec, "pairs": int(kept.sum()), "skipped_pairs": len(pairs.reference) - int(kept.sum()),
            "pair_accuracy": float(((margin > 0) + 0.5 * (margin == 0)).mean()), "pair_margin": float(margin.mean()),
            "chosen_logp": float(sums[kept, 0].sum() / counts[kept, 0].sum()),
            "rejected_logp": float(sums[kept, 1].sum() / counts[kept, 1].sum()), "context": window,
        })  # fmt: skip
    return results
