"""`lmtune finetune`: the story of a run. Check the inputs, prepare, score the base model, train, finish.

`finetune` tells it top to bottom; `train` is the loop. What does not change during a run is one record
(`Run`), what does is another (`Progress`, which is also exactly what a checkpoint holds); the named
steps are plain functions of the two.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import broadcast_object_list, gather_object

from lmtune import atomic, batches, card, checkpoint, data, dpo, hub, loss, runs
from lmtune.config import Config
from lmtune.data import plan as data_plan
from lmtune.errors import LmtuneError, first_line
from lmtune.evaluate import Score, score
from lmtune.events import Report, log_report
from lmtune.model import checkpoint_activations, checkpointing
from lmtune.setup import Run, check_inputs, peak_memory, prepare, timed_passes
from lmtune.stop import StopSignals, final_save_failed, non_finite, resume_hint

log = logging.getLogger("lmtune")


def shared(default: Any) -> Any:
    """A Progress field kept in a checkpoint's state.json (the same in every process)."""
    return field(default=default, metadata={"checkpoint": "state.json"})


@dataclass
class Progress:
    """Where a run is: the loop's changing state, and exactly what a checkpoint holds. The `shared` fields
    go to state.json; loss_sum, loss_tokens and the RNG are each process's own (training_state.pt)."""

    step: int = shared(0)  # optimizer steps done
    epoch: int = shared(0)
    batch_in_epoch: int = shared(0)  # micro-batches of this epoch done
    tokens_seen: int = shared(0)
    train_seconds: float = shared(0.0)  # time in training steps; evaluations and saves not counted
    best_step: int | None = shared(None)  # the best evaluation (lower by more than --early-stopping-delta) ...
    best_loss: float | None = shared(None)  # ... and its loss; step 0 (the base model) is not a candidate
    evals_since_best: int = shared(0)  # evaluations in a row without an improvement: --early-stopping's count
    stopped_early_at: int | None = shared(None)
    loss_sum: torch.Tensor = field(default_factory=lambda: torch.zeros(()))  # token-weighted, since the last log
    loss_tokens: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))  # label tokens in it
    rng: dict[str, Any] | None = None  # a resumed process's random states, restored right before its next step
    # Not saved: a checkpoint is written only while it is 0.
    bad_step: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.long))  # first non-finite step

    def saved(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(what goes to state.json, this process's part of training_state.pt)."""
        common = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("checkpoint")}
        own = {"rng": checkpoint.rng_state(), "loss_sum": self.loss_sum.item(), "loss_tokens": self.loss_tokens.item()}
        return common, own

    @classmethod
    def restored(cls, common: dict[str, Any], own: dict[str, Any], device: Any) -> Progress:
        """The inverse of `saved`, on `device`."""
        # .get: a checkpoint written before a field existed holds its default
        p = cls(
            **{f.name: common.get(f.name, f.default) for f in fields(cls) if f.metadata.get("checkpoint")},
            rng=own["rng"],
        )
        p.to(device)
        p.loss_sum.fill_(own["loss_sum"])
        p.loss_tokens.fill_(own["loss_tokens"])
        return p

    def to(self, device: Any) -> Progress:
        self.loss_sum, self.loss_tokens, self.bad_step = (
            t.to(device) for t in (self.loss_sum, self.loss_tokens, self.bad_step)
        )
        return self


# --- the story ------------------------------------------------------------------------------------


def finetune(
    cfg: Config,
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    resume: bool | Literal["auto"] = False,
    force: bool = False,
    report: Report = log_report,
) -> dict[str, Any]:
    """Fine-tune (or train from scratch) as `cfg` says. Returns the summary, or the plan with dry_run.

    resume: continue the run in cfg.output from its newest complete checkpoint; "auto": that if there is
    one, else start the run (a finished run is returned as it is, with `already_finished`); force: even if
    settings that decide the model or the data order, or the data itself, changed.
    """
    cfg, output = check_inputs(cfg, dry_run)
    # The run folder is held from here to the end, so a second run on it is refused before it tokenizes.
    # By the first process only (accelerate's main process is global rank 0, RANK under torchrun).
    holds_folder = not dry_run and os.environ.get("RANK", "0") == "0"
    with runs.Lock(output) if holds_folder else contextlib.nullcontext(), StopSignals() as stop:
        inputs = {"model": cfg.model, "tokenizer": cfg.tokenizer, "validation data": cfg.validation_data}
        for d in cfg.data_sources():
            inputs |= {f"data {d.path}": d.path, f"validation data {d.validation}": d.validation}
        start = runs.check_output(output, cfg.model, overwrite, resume, inputs, check=not dry_run)
        if start == runs.FINISHED:  # --resume auto on a finished run: nothing to do
            return {**json.loads((output / runs.SUMMARY).read_text()), "already_finished": True}
        resume_from = checkpoint.find_resume_checkpoint(output, report) if start == runs.RESUME else None
        saved, tensors = checkpoint.load(resume_from) if resume_from else ({}, {})  # a damaged one fails now
        run = prepare(cfg, output, resume_from, report)
        run.plan["start"] = runs.describe_start(start, resume_from)
        if dry_run:
            return {**run.plan, **timed_passes(run)}
        run.say({"event": "plan", **run.plan})
        if saved:
            held_out = any(src.validation == "held_out" for src in run.data_plan.sources)
            acc = run.accelerator
            checkpoint.check_resumable(saved, run.cfg, acc.num_processes, run.fsdp, held_out, output, force)
            check_same_plan(run, force)
            checkpoint.check_same_data(saved, data_fingerprint(run), output, force)
            checkpoint.check_target(saved["step"], run.total_steps, output)
        start_run_folder(run, saved, overwrite or start == runs.START_OVER)
        progress = resumed(run, saved, tensors) if saved else Progress().to(run.accelerator.device)
        if run.dpo:  # preference pairs: the reference's log-probabilities, once (or from the cache)
            dpo.score_reference(run)
        stop.armed = True  # from here a signal asks for a checkpoint at the next step
        base = Score(**saved["base"]) if saved else evaluate(run, progress)
        if stop.requested(run.accelerator):
            raise stop.error(progress.step, resume_from, output)
        last = train(run, progress, base, stop)
        return finish(run, progress, base, stop, last)


def check_same_plan(run: Run, force: bool) -> None:
    """Resume only with the data plan the run started with (data_plan.json): another source, format or
    validation would make it another run (a folder that gained a valid.txt since, say)."""
    if not (run.output / data_plan.PLAN).is_file() or force:
        return
    before = data_plan.read(run.output).sources
    changed = [
        f"{a.name}: {key} {getattr(a, key)!r} -> {getattr(b, key)!r}"
        for a, b in zip(before, run.data_plan.sources, strict=False)
        for key in ("data", "form", "data_format", "validation", "validation_data")
        if getattr(a, key) != getattr(b, key)
    ]
    if len(before) != len(run.data_plan.sources) or changed:
        raise LmtuneError(
            f"cannot resume {run.output}: its data plan ({data_plan.PLAN}) differs from this one's: "
            f"{'; '.join(changed) or 'other sources'}; resume with the run's data, or pass --force"
        )


def start_run_folder(run: Run, saved: dict[str, Any], overwrite: bool) -> None:
    """The run folder: the config first (a recipe that repeats the run), metrics as they come, summary last."""

    def write() -> None:
        run.output.mkdir(parents=True, exist_ok=True)
        if overwrite:
            runs.clear(run.output)
        atomic.write_text(run.output / runs.CONFIG, run.cfg.to_yaml())
        data_plan.write(run.data_plan, run.output)  # what `eval`, `eval --generate` and resume read back
        if saved:  # what was logged after the checkpoint will be logged again
            checkpoint.keep_metrics_until(run.output / runs.METRICS, saved["step"])

    on_main(run, write, lambda err: cannot_write(run, runs.CONFIG, err))
    if run.cfg.report_to != "none":  # the tracker's run: RUN/lmtune/ for tensorboard, project "lmtune" for wandb
        run.accelerator.init_trackers(
            "lmtune",
            # Trackers take plain values: several sources' list as its JSON text.
            config={k: json.dumps(v) if isinstance(v, list) else v for k, v in run.cfg.model_dump().items()},
            init_kwargs={"wandb": {"name": run.output.name, "dir": str(run.output)}},
        )


# --- the loop ---------------------------------------------------------------------------------------


def train(run: Run, p: Progress, base: Score, stop: StopSignals) -> tuple[Score, list[Score], dict[str, Any]] | None:
    """Optimizer steps until run.total_steps (or an early stop), evaluating and checkpointing on the way.
    Returns the evaluation of the step it stopped early at (the final one, already done), else None."""
    acc, cfg, model = run.accelerator, run.cfg, run.model
    start_epoch, skip = p.epoch, p.batch_in_epoch  # where the data starts: an epoch, and batches done in it
    if skip >= len(run.loader):
        start_epoch, skip = start_epoch + 1, 0
    model.train()
    pieces = 1  # each micro-batch is split into this many (more after running out of GPU memory)
    tick = time.perf_counter()
    scored = None
    for epoch in range(start_epoch, run.epochs):
        if p.step >= run.total_steps or p.stopped_early_at is not None:
            break
        p.epoch = epoch
        run.loader.set_epoch(epoch)
        # Resuming: the random state goes back where the stopped run had it, which is before a new
        # epoch's data iterator draws its seed from it, and after, mid-epoch.
        if p.rng is not None and not skip:
            checkpoint.set_rng_state(p.rng)
            p.rng = None
        # Resuming mid-epoch: the same order, `skip` batches in; skipped batches are never loaded.
        epoch_batches = acc.skip_first_batches(run.loader, skip) if skip else run.loader
        p.batch_in_epoch, skip = skip, 0
        for group in batches.optimizer_steps(epoch_batches, cfg.gradient_accumulation_steps):  # its micro-batches
            if p.rng is not None:
                checkpoint.set_rng_state(p.rng)
                p.rng = None
            # forward and backward; out of GPU memory, the same step again in micro-batches of half the rows
            while True:
                try:
                    step_once = dpo.forward_backward if run.dpo else forward_backward  # DPO: loss summed over pairs
                    nll, n_labels, finite = step_once(run, batches.split_rows(group, pieces))
                    break
                except torch.OutOfMemoryError:
                    pieces = fewer_rows(run, group, pieces, p.step + 1)
            p.loss_sum += nll
            p.loss_tokens += n_labels
            p.batch_in_epoch += len(group)
            # Every process gets as many batches (accelerate's even_batches); of packed text, of the same
            # shape, so this is exact; of chat data it is this process's share times processes.
            p.tokens_seen += sum(real_tokens for *_, real_tokens in group) * acc.num_processes
            # clip, step
            if cfg.max_grad_norm:
                norm = acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                # FSDP2 returns the norm as a DTensor, which cannot be combined with a plain tensor
                finite &= torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
            run.scheduler.step()
            p.bad_step = torch.where((p.bad_step == 0) & ~finite, p.step + 1, p.bad_step)  # on device: no sync
            p.step += 1
            run.say({"event": "progress", "step": p.step, "total_steps": run.total_steps})

            # log: the only host-device sync of a training step, once every log_every steps
            if p.step % cfg.log_every == 0 or p.step == run.total_steps:
                check_finite(run, p)
                mean = (acc.reduce(p.loss_sum, "sum") / acc.reduce(p.loss_tokens, "sum")).item()
                p.train_seconds += time.perf_counter() - tick
                tick = time.perf_counter()
                record(run, {
                    "event": "train", "step": p.step, "epoch": epoch, "tokens": p.tokens_seen,
                    "loss": mean, "perplexity": None if run.dpo else math.exp(min(mean, 700)),  # DPO: the DPO loss
                    "lr": run.scheduler.get_last_lr()[0],
                    "tokens_per_second": p.tokens_seen / p.train_seconds, "elapsed": p.train_seconds,
                })  # fmt: skip
                p.loss_sum.zero_()
                p.loss_tokens.zero_()

            # evaluate and checkpoint (not counted as training time); a signal saves one at once
            stopping = stop.requested(acc)
            last = p.step >= run.total_steps
            best = False  # this step's evaluation is the best so far: --keep-best keeps its checkpoint
            if run.eval_every and p.step % run.eval_every == 0 and not last:
                p.train_seconds += time.perf_counter() - tick
                scored = evaluate_sources(run, p)
                best = judge(run, p, judged_loss(scored[0], scored[2]))
                tick = time.perf_counter()
            if p.stopped_early_at is not None:  # the schedule is left as it is: the run just ends here
                break
            if stopping or (run.save_every and p.step % run.save_every == 0 and not last) or (best and cfg.keep_best):
                p.train_seconds += time.perf_counter() - tick
                saved_to = save_checkpoint(run, p, base)
                tick = time.perf_counter()
                if stopping:
                    raise stop.error(p.step, saved_to or run.output, run.output)
            if last:
                break
    p.train_seconds += time.perf_counter() - tick
    check_finite(run, p)
    return scored if p.stopped_early_at is not None else None


# --- the named steps -------------------------------------------------------------------------------


def forward_backward(run: Run, group: list[Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one optimizer step from its micro-batches; returns their summed NLL, label tokens, and
    whether every loss was finite (all on device).

    Each micro-batch's summed loss is divided by the label tokens of the whole step, all its micro-batches
    on all processes (counted on device: no sync), so every token weighs the same. Gradients add up
    locally and are averaged across processes on the last micro-batch.
    """
    acc = run.accelerator
    step_tokens = acc.reduce(sum(loss.label_count(labels) for _, labels, _, _ in group), "sum").clamp(min=1)
    total, tokens = torch.zeros((), device=acc.device), torch.zeros((), dtype=torch.long, device=acc.device)
    finite = torch.ones((), dtype=torch.bool, device=acc.device)
    for i, (inputs, labels, positions, _) in enumerate(group):  # (B, T) each, positions or None
        with acc.no_sync(run.model) if i < len(group) - 1 else contextlib.nullcontext():
            nll, n_labels = loss.next_token_loss(run.model, run.plain, inputs, labels, run.chunked, acc, positions)
            acc.backward(nll / step_tokens * acc.num_processes)  # x processes: their average is the sum
        finite &= torch.isfinite(nll.detach())
        total += nll.detach()
        tokens += n_labels
    return total, tokens, finite


def fewer_rows(run: Run, group: list[Any], pieces: int, step: int) -> int:
    """After CUDA ran out of memory: twice as many micro-batches of half the rows for this step and the
    next (the same tokens per step, and the same gradients: every token weighs the same), said once; at
    one row, activation checkpointing switched on (the same gradients again, recomputed)."""
    run.optimizer.zero_grad(set_to_none=True)  # what the failed attempt accumulated
    torch.cuda.empty_cache()
    rows = math.ceil(len(group[0][0]) / pieces)
    alone = run.accelerator.num_processes == 1
    if rows == 1 and alone and not checkpointing(run.plain):
        checkpoint_activations(run.plain)
        log.warning(
            "out of GPU memory at step %d with micro-batches of 1 row: going on with activation checkpointing "
            "(--gradient-checkpointing: each layer's activations recomputed in backward)", step,
        )  # fmt: skip
        return pieces
    if rows == 1 or not alone:
        # Several processes would have to agree on the split before their next collective.
        more = "" if checkpointing(run.plain) else " --gradient-checkpointing,"
        raise LmtuneError(
            f"out of GPU memory at step {step} with micro-batches of {rows} row(s) of up to {group[0][0].shape[1]} "
            "tokens; pass a smaller --batch-size with more --gradient-accumulation-steps (the same tokens per "
            f"step), a smaller --block-size,{more} --lora, or --lora --quantize 4bit (`--dry-run` shows what fits)"
        )
    log.warning(
        "out of GPU memory at step %d: going on with micro-batches of %d rows instead of %d, twice as many "
        "(the same tokens per step)", step, math.ceil(rows / 2), rows,
    )  # fmt: skip
    return pieces * 2


def record(run: Run, event: dict[str, Any]) -> None:
    """A figure of the run: to metrics.jsonl, to the tracker, and to the user."""

    def write() -> None:
        with (run.output / runs.METRICS).open("a") as f:
            f.write(json.dumps(event) + "\n")

    on_main(run, write, lambda err: cannot_write(run, runs.METRICS, err))
    if run.cfg.report_to != "none":
        numbers = {k: v for k, v in event.items() if k not in ("event", "step") and isinstance(v, int | float)}
        for one in event.get("sources", []):  # eval_loss/NAME: a curve per source
            numbers |= {f"{k}/{one['name']}": v for k, v in one.items() if k.startswith("eval_")}
        run.accelerator.log(numbers, step=event["step"])
    run.say(event)


def evaluate(run: Run, p: Progress) -> Score:
    """Score the validation data (each source's) and record it; returns the token-weighted whole."""
    return evaluate_sources(run, p)[0]


def evaluate_sources(run: Run, p: Progress) -> tuple[Score, list[Score], dict[str, Any]]:
    """Score each source's validation data (windows split across processes) and record it, with the
    token-weighted whole, and for preference pairs the DPO figures. Step 0: before training."""
    figures: dict[str, Any] = {}
    if run.dpo:  # preference pairs: eval_loss is the chosen answers' NLL; the DPO figures beside it
        s, scores, figures = dpo.evaluate(run, p.step)
    else:
        s, scores = score_validation(run)
    if p.step and not math.isfinite(s.loss):  # the weights went bad: stop before they are saved
        raise non_finite(run.output, run.cfg.learning_rate, f"the evaluation loss became {s.loss} at step {p.step}")
    event = {
        "event": "eval",
        "step": p.step,
        "tokens": p.tokens_seen,
        "eval_loss": s.loss,
        "eval_perplexity": s.perplexity,
        **{k: v for k, v in figures.items() if k != "dpo_sources"},
    }
    if len(scores) > 1:  # each source's own figures beside the whole (a curve each in TensorBoard)
        event["sources"] = [
            {"name": src.name, "eval_loss": one.loss, "eval_perplexity": one.perplexity, "eval_tokens": one.tokens}
            | (figures["dpo_sources"][i] if run.dpo else {})
            for i, (src, one) in enumerate(zip(run.data_plan.sources, scores, strict=True))
        ]
    record(run, event)
    return s, scores, figures


def score_validation(run: Run) -> tuple[Score, list[Score]]:
    """Each source's validation tokens scored (windows split across processes), and their token-weighted whole."""
    acc = run.accelerator
    scores = [
        # FSDP's wrapper gathers the weights in its forward (FSDP 1 only unwraps to a module of shards).
        score(
            run.model if run.fsdp else run.plain,
            split,
            run.block_size,
            run.block_size,
            run.cfg.batch_size,
            rank=acc.process_index,
            world=acc.num_processes,
            autocast=acc.autocast,
            reduce=lambda t: acc.reduce(t, "sum"),
            report=run.say,
            chunked=run.chunked,
            packing=run.cfg.packing,
        )
        for split in run.validation
    ]
    return Score.total(scores), scores


def judged_loss(s: Score, figures: dict[str, Any]) -> float:
    """What --keep-best and --early-stopping judge an evaluation by: the DPO loss for preference pairs, else the
    evaluation loss."""
    return float(figures["eval_dpo_loss"]) if "eval_dpo_loss" in figures else s.loss


def judge(run: Run, p: Progress, loss: float) -> bool:
    """Whether an evaluation's `loss` (judged_loss) is the best so far, improving on the best by more than
    --early-stopping-delta; after --early-stopping evaluations in a row that are not, the run stops early (said,
    and recorded)."""
    cfg = run.cfg
    if p.best_loss is None or loss < p.best_loss - cfg.early_stopping_delta:
        p.best_step, p.best_loss, p.evals_since_best = p.step, loss, 0
        return True
    p.evals_since_best += 1
    if cfg.early_stopping and p.evals_since_best >= cfg.early_stopping and p.step < run.total_steps:
        p.stopped_early_at = p.step
        record(run, {
            "event": "stopped_early", "step": p.step, "evaluations": p.evals_since_best,
            "delta": cfg.early_stopping_delta, "best_step": p.best_step, "best_eval_loss": p.best_loss,
        })  # fmt: skip
    return False


def on_main(run: Run, write: Callable[[], Any], failed: Callable[[OSError], LmtuneError]) -> Any:
    """`write` on the main process, which writes the run folder; `failed` turns its OSError into the error.

    When it fails, every process stops with that error at once: the others would otherwise wait at their
    next collective until its timeout, or fail there with the transport's own words. The main process
    raises it (and prints it); the others raise it as `everywhere`, so it is printed once.
    """
    result: Any = None
    error: Exception | None = None
    said: list[tuple[str, int] | None] = [None]
    if run.main:
        try:
            result = write()
        except LmtuneError as err:
            error = err
        except OSError as err:
            error = failed(err)
        except Exception as err:  # a bug: the others stop too; this process shows its traceback on request
            error = err
        if error is not None:
            words = str(error) if isinstance(error, LmtuneError) else f"{type(error).__name__}: {first_line(error)}"
            said = [(words, getattr(error, "exit_code", 1))]
    if run.accelerator.num_processes > 1:
        broadcast_object_list(said)  # in place: the main process's outcome on every process
    if error is not None:
        raise error from None
    if said[0] is not None:
        raise LmtuneError(*said[0], everywhere=True)
    return result


def cannot_write(run: Run, name: str, err: OSError) -> LmtuneError:
    """The error for a file of the run folder that could not be written: the cause, and the way on."""
    kept = checkpoint.complete(run.output / runs.CHECKPOINTS)
    way_on = f"Its last checkpoint, {kept[-1]}, is kept. " if kept else "No checkpoint was kept. "
    then = resume_hint(run.output) if kept else "Then start over with --overwrite"
    return LmtuneError(
        f"could not write {run.output / name}: {checkpoint.reason(err)}; the run stopped. {way_on}Make {run.output} "
        f"writable (or free space). {then}"
    )


def check_finite(run: Run, p: Progress) -> None:
    """Stop, saving nothing, if any process saw a non-finite loss or gradient norm (one sync)."""
    bad = run.accelerator.gather(p.bad_step.reshape(1))
    if (bad > 0).any():
        raise non_finite(
            run.output,
            run.cfg.learning_rate,
            f"the loss or the gradient norm became nan or inf at step {int(bad[bad > 0].min())}",
        )


def check_weights(run: Run, p: Progress) -> None:
    """Stop before saving weights that hold nan or inf (an update can make them so with a finite loss)."""
    bad = torch.zeros((), device=run.accelerator.device)
    for w in run.model.parameters():  # under FSDP each process checks its own shards
        bad += (~torch.isfinite(w.to_local() if hasattr(w, "to_local") else w.detach())).any()
    if run.accelerator.reduce(bad, "sum").item():
        raise non_finite(run.output, run.cfg.learning_rate, f"the weights hold nan or inf after step {p.step}")


def save_checkpoint(run: Run, p: Progress, base: Score) -> Path | None:
    """The checkpoint of this step: `p` (every process's part) and the model, optimizer and scheduler."""
    check_finite(run, p)
    check_weights(run, p)
    common, own = p.saved()
    processes = gather_object([own])
    # Every process takes part: under FSDP the main process gets the gathered weights and optimizer state.
    weights = checkpoint.whole_weights(run.accelerator, run.model)
    optimizer_state = checkpoint.optimizer_state(run.model, run.optimizer, run.fsdp)
    run.accelerator.wait_for_everyone()
    state = {
        **common, "scheduler": run.scheduler.state_dict(), "base": asdict(base),
        "processes": run.accelerator.num_processes, "fsdp": run.fsdp, "config": run.cfg.model_dump(exclude={"output"}),
        "held_out": checkpoint.HELD_OUT, "data": data_fingerprint(run),
    }  # fmt: skip
    root = run.output / runs.CHECKPOINTS
    best = root / checkpoint.folder_name(p.best_step) if run.cfg.keep_best and p.best_step else None
    save = partial(
        checkpoint.save, root, p.step, run.cfg.keep_checkpoints, run.plain, weights, run.tokenizer, optimizer_state,
        processes, state, best,
    )  # fmt: skip
    # checkpoint.save turns a failed write into its own error; `failed` is for what it did not foresee
    saved_to: Path | None = on_main(run, save, lambda err: cannot_write(run, runs.CHECKPOINTS, err))
    return saved_to


def data_fingerprint(run: Run) -> dict[str, Any]:
    """What the run trains and validates on, kept in each checkpoint so that resume notices other data:
    each local file's path and size (data.identity, without the mtime, which a copy changes) or a hub
    dataset's fingerprint, and the plan's counts of documents and tokens."""
    files: dict[str, Any] = {}
    for spec in (s for src in run.data_plan.sources for s in (src.data, src.validation_data)):
        if spec and Path(spec).exists():
            files.update({path: size for path, size, _ in data.identity(spec)})
        elif spec and not run.cfg.streaming:  # a stream's identity would download the whole dataset
            files[spec] = data.identity(spec)[1]
    counts = ("documents", "train_tokens_available", "validation_documents", "validation_tokens")
    return {"files": files, **{key: run.plan[key] for key in counts}}


def resumed(run: Run, saved: dict[str, Any], tensors: dict[str, Any]) -> Progress:
    """The Progress of a checkpoint, with the optimizer and scheduler put back as they were."""
    checkpoint.load_optimizer_state(run.model, run.optimizer, tensors["optimizer"], run.fsdp)
    run.scheduler.load_state_dict(saved["scheduler"])
    checkpoint.use_learning_rate(run.scheduler, run.cfg.learning_rate, run.say)
    own = tensors["processes"][run.accelerator.process_index]
    return Progress.restored(saved, own, run.accelerator.device)


def finish(
    run: Run, p: Progress, base: Score, stop: StopSignals, scored: tuple[Score, list[Score], dict[str, Any]] | None
) -> dict[str, Any]:
    """Final evaluation (`scored`, the whole and each source's, when the run stopped early: done), the model (with --keep-best the best
    checkpoint's), curves, card and summary (last: it marks a complete run), teardown, upload.

    A signal from here on finishes the run: saving it takes as long as the checkpoint a signal asks for.
    """
    acc, cfg = run.accelerator, run.cfg
    final, per_source, figures = evaluate_sources(run, p) if scored is None else scored
    if scored is None:
        judge(run, p, judged_loss(final, figures))
    best = run.output / runs.CHECKPOINTS / checkpoint.folder_name(p.best_step or 0)
    from_best = cfg.keep_best and p.best_step != p.step  # the run folder's model is an earlier checkpoint's
    check_weights(run, p)
    weights = {} if from_best else checkpoint.whole_weights(acc, run.model)
    acc.wait_for_everyone()
    summary = {
        **run.plan, "steps": p.step, "train_tokens": p.tokens_seen, "train_seconds": p.train_seconds,
        "tokens_per_second": p.tokens_seen / p.train_seconds, "eval_tokens": final.tokens, "eval_loss": final.loss,
        "eval_perplexity": final.perplexity, "eval_bits_per_byte": final.bits_per_byte, "base_eval_loss": base.loss,
        "base_eval_perplexity": base.perplexity, "base_eval_bits_per_byte": base.bits_per_byte,
        "resumed_from": str(run.resume_from) if run.resume_from else None, **peak_memory(acc.device),
        "sources": finished_sources(run, p, per_source),
        "stopped_early_at": p.stopped_early_at,
        # --keep-best: the step whose model the run folder holds; eval_loss and the rest are the last step's
        **({"best_step": p.best_step, "best_eval_loss": p.best_loss} if cfg.keep_best else {}),
        # preference pairs: the last evaluation's DPO figures, and what the reference was
        **({k: v for k, v in figures.items() if k.startswith("eval_")} | {"reference": run.dpo.reference, "reference_seconds": run.dpo.reference_seconds} if run.dpo else {}),
    }  # fmt: skip
    # The card's "after" is the model the folder holds. Bits per byte scale with the loss: the same stream.
    # (Preference runs judge by the DPO loss, which is not this row's: their card keeps the last step's.)
    kept = {
        "eval_loss": p.best_loss, "eval_perplexity": math.exp(p.best_loss or 0),
        "eval_bits_per_byte": final.bits_per_byte * (p.best_loss or 0) / final.loss,
    } if from_best and not run.dpo else {}  # fmt: skip

    def write() -> None:
        try:
            if from_best:
                checkpoint.copy_model(best, run.output)
            else:
                checkpoint.save_model(run.plain, weights, run.tokenizer, run.output)
        except Exception as err:  # a full disk: say what was lost, what was kept and how to go on
            raise final_save_failed(run.output, p.step, err) from None
        # What a person reads: the training curves and a model card (README.md, the hub's format).
        card.plot_curves(run.output, base.perplexity)
        atomic.write_text(run.output / runs.CARD, card.model_card(run.output, cfg, {**summary, **kept}))
        atomic.write_text(run.output / runs.SUMMARY, json.dumps(summary, indent=2) + "\n")
        runs.remember(run.output)

    on_main(run, write, lambda err: cannot_write(run, runs.SUMMARY, err))
    # Every process tears down its process group together, after the main one has written the run.
    acc.wait_for_everyone()
    # The DDP wrapper goes first. Its reducer holds the process group and, as the last holder, would free
    # it with the GIL held; gloo's destructor then waits for its worker threads, one of which may need the
    # GIL to free the last collective's tensors: a hang seen with torch 2.13 (py-spy --native). Freed here,
    # the group's last holder is destroy_process_group's own reference, which releases the GIL to free it.
    acc.free_memory(run.model)  # accelerate's idiom: its references dropped ...
    run.model = None  # ... and ours
    gc.collect()
    acc.end_training()
    # Last: the run is complete on disk whatever happens to the upload.
    summary["hub_url"] = hub.push(run.output, run.cfg.push_to_hub) if run.main and run.cfg.push_to_hub else None
    # Told to the user, not kept in summary.json: a signal that came after the last step.
    summary["finished_despite"] = signal.Signals(stop.signal).name if stop.signal else None
    return summary


def finished_sources(run: Run, p: Progress, scores: list[Score]) -> list[dict[str, Any]]:
    """Each source's figures for summary.json, in --data order: its share, the real tokens trained on, and
    its validation's size and scores (the last evaluation's)."""
    trained = source_tokens(run, p)
    return [
        {
            "data": src.data, "name": src.name, "weight": src.weight, "share": planned["share"],
            "train_tokens": int(tokens), "validation_tokens": len(split.ids), "eval_tokens": s.tokens,
            "eval_loss": s.loss, "eval_perplexity": s.perplexity, "eval_bits_per_byte": s.bits_per_byte,
        }
        for src, planned, tokens, split, s in zip(
            run.data_plan.sources, run.plan["sources"], trained, run.validation, scores, strict=True
        )
    ]  # fmt: skip


def source_tokens(run: Run, p: Progress) -> list[int]:
    """The real tokens trained on from each source: of one, all of them; of several, counted from the mixture's
    order up to where the run got (each epoch's rows in order, every process's batches)."""
    if len(run.data_plan.sources) == 1:
        return [p.tokens_seen]
    per_process = run.cfg.batch_size * run.accelerator.num_processes
    if run.mixed is None:  # streams: blocks of equal size, taken by the weighted round robin
        blocks = p.step * run.cfg.gradient_accumulation_steps * per_process
        weights = [src.weight or 1.0 for src in run.data_plan.sources]
        counts = [0] * len(weights)
        for _ in range(blocks):
            counts[min(range(len(weights)), key=lambda k: (counts[k] / weights[k], k))] += 1
        return [c * run.block_size for c in counts]
    total = sum(run.mixed.tokens_by_source(e, len(run.mixed)) for e in range(p.epoch))
    return list(total + run.mixed.tokens_by_source(p.epoch, p.batch_in_epoch * per_process))


# --- the pieces they use -----------------------------------------------------------------------------
