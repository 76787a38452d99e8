"""Stopping a run cleanly: SIGINT (Ctrl-C) and SIGTERM ask for a checkpoint at the next step boundary."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import torch

from lmtune import checkpoint, runs
from lmtune.errors import LmtuneError

log = logging.getLogger("lmtune")


class StopSignals:
    """Catches SIGINT and SIGTERM for the length of a run.

    Before training is `armed` (tokenizing, loading) there is nothing to save: a signal stops at once. Once
    armed, the first signal asks the loop to checkpoint and stop at the next step boundary; after the last
    step it lets the run finish (saving it takes as long as a checkpoint). A second Ctrl-C stops at once
    (KeyboardInterrupt). Outside the main thread signals cannot be caught, and the default behaviour stays.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.armed = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise LmtuneError(f"stopped by {name} before training started; nothing was saved", 128 + signum)
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None:  # said at once: a checkpoint or the end of an evaluation may take a while
            log.warning("%s: stopping at the next step with a checkpoint (Ctrl-C again stops at once, unsaved)", name)
        self.signal = signum

    def requested(self, accelerator: Any) -> bool:
        """Whether any process got a signal (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        flag = torch.tensor(int(self.signal is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item())

    def error(self, step: int, saved_to: Path | None, output: Path) -> LmtuneError:
        name = signal.Signals(self.signal or signal.SIGTERM).name
        code = 128 + (self.signal or signal.SIGTERM)
        if saved_to is None:  # before the first step of a new run
            return LmtuneError(f"stopped by {name} before the first step; start over with --overwrite", code, True)
        return LmtuneError(
            f"stopped by {name} after step {step}; checkpoint saved in {saved_to}. {resume_hint(output)}", code, True
        )


def resume_hint(output: Path, *extra: str) -> str:
    """The command that continues the stopped run in `output`."""
    return f"Resume with: lmtune finetune --recipe {output / runs.CONFIG} --output {output} --resume" + "".join(
        f" {e}" for e in extra
    )


def non_finite(output: Path, lr: float, what: str) -> LmtuneError:
    """The error that stops a run whose numbers went non-finite, naming the last checkpoint (each was
    checked finite before it was written) and how to go on from it."""
    kept = checkpoint.complete(output / runs.CHECKPOINTS)
    if not kept:
        return LmtuneError(
            f"{what}; stopped, and no checkpoint had been saved. Start over with --overwrite and a lower --lr "
            f"(this run's was {lr:g}), keep --max-grad-norm on, or use --mixed-precision no",
            everywhere=True,  # every process finds it together (a gather or a reduce)
        )
    return LmtuneError(
        f"{what}; stopped before saving. The last checkpoint, {kept[-1]}, is good: go on from it with a lower "
        f"learning rate. {resume_hint(output, f'--lr {lr / 10:g}')}",
        everywhere=True,
    )


def final_save_failed(output: Path, step: int, err: Exception) -> LmtuneError:
    """The error for a run whose last save failed: nothing partial is left (save_model), checkpoints are kept."""
    kept = checkpoint.complete(output / runs.CHECKPOINTS)
    where = (
        f"the last checkpoint, {kept[-1]}, is kept: free space, then {resume_hint(output)}"
        if kept
        else "no checkpoint had been saved (--save-every): free space and start over with --overwrite"
    )
    return LmtuneError(
        f"could not save the trained model (step {step}) in {output}: {checkpoint.reason(err)}; nothing partial "
        f"was left; {where}"
    )
