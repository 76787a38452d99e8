"""Run folders: where they go, and which one was the latest (what `generate` and `eval` use by default)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from datetime import datetime
from pathlib import Path
from typing import IO, Literal

from lmtune import atomic
from lmtune.config import Config
from lmtune.errors import LmtuneError

log = logging.getLogger("lmtune")

# What a run folder holds, besides the model (or adapter) and tokenizer files:
CONFIG = "config.yaml"  # the resolved config: a recipe that repeats the run
METRICS = "metrics.jsonl"  # one event per line: train, eval
CHECKPOINTS = "checkpoints"  # resumable checkpoints, step-NNNNNNN/
CARD = "README.md"  # the model card, in the hub's format
CURVES = "curves.png"  # training and evaluation curves
SUMMARY = "summary.json"  # the run's figures; written last, so it marks a complete run
COMPLETE = "COMPLETE"  # in a checkpoint folder: written last, so it marks a checkpoint complete
LOCK = ".lmtune.lock"  # held (flock) by the run writing the folder: a second run on it is refused


def home() -> Path:
    """lmtune's own state and caches: $LMTUNE_HOME, else ~/.cache/lmtune."""
    return Path(os.environ.get("LMTUNE_HOME") or Path.home() / ".cache" / "lmtune")


def check_home() -> Path:
    """lmtune's home as a writable folder, checked before any work: caches and `latest-run` are written there."""
    path = home()
    where = f"lmtune's cache folder {path} (LMTUNE_HOME, default ~/.cache/lmtune)"
    if path.exists() and not path.is_dir():
        raise LmtuneError(f"{where} is a file; point LMTUNE_HOME at a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LmtuneError(
            f"{where} is not writable ({err.strerror or err}); point LMTUNE_HOME at a writable folder"
        ) from None
    if reason := atomic.cannot_write_in(path):
        raise LmtuneError(f"{where} is not writable ({reason}); point LMTUNE_HOME at a writable folder")
    return path


def default_output(cfg: Config) -> Path:
    def short(name: str | None) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", Path(name or "scratch").stem).strip("-") or "run"

    start = "scratch" if cfg.from_scratch and not cfg.model else short(cfg.model)
    return Path("runs") / f"{start}-{short(cfg.data_label)}-{datetime.now():%Y%m%d-%H%M%S}"


# How a run starts (check_output), said in its plan.
NEW, RESUME, START_OVER, FINISHED = "new", "resume", "start over", "finished"


def check_output(
    output: Path,
    model: str | None,
    overwrite: bool,
    resume: bool | Literal["auto"] = False,
    inputs: dict[str, str | None] | None = None,
    check: bool = True,
) -> str:
    """How the run in `output` starts (NEW, RESUME, START_OVER or FINISHED); refuse to write over an existing
    run or into the model being trained, and say when --resume applies.

    The rule, with no prompt: a new run needs an empty or missing folder (or --overwrite); --resume needs
    an unfinished run (no summary.json) there. --resume auto: resume when there is a complete checkpoint,
    else start (over, in a folder holding an unfinished run of lmtune's); a finished run is FINISHED.
    `inputs` (model, tokenizer, data, ... by name): local paths that --overwrite must not delete.
    check=False (a dry run): only which it would be.
    """
    resumable = bool(complete(output / CHECKPOINTS))
    if not check:
        return RESUME if resume is True or (resume == "auto" and resumable) else NEW
    if model and Path(model).exists() and output.resolve().is_relative_to(Path(model).resolve()):
        raise LmtuneError(f"--output {output} is inside the model folder {model}; choose a folder outside it")
    if overwrite:
        keep_inputs(output, inputs, "--overwrite")
    if output.exists() and not output.is_dir():
        raise LmtuneError(f"--output {output} is a file; choose a folder")
    if resume and overwrite:
        raise LmtuneError("--resume continues a run and --overwrite replaces it; pass one of them")
    finished = (output / SUMMARY).is_file()
    empty = not output.is_dir() or not any(p.name != LOCK for p in output.iterdir())
    unfinished = not finished and any((output / name).exists() for name in (CONFIG, METRICS, CHECKPOINTS))
    if resume == "auto":
        if finished:
            return FINISHED
        if resumable:
            return RESUME
        if unfinished:  # stopped before its first checkpoint was complete: only starting over is left
            keep_inputs(output, inputs, "--resume auto (starting over)")
            return START_OVER
    elif resume:
        if empty:
            raise LmtuneError(f"nothing to resume: {output} does not exist; pass the --output of the stopped run")
        if finished:
            raise LmtuneError(f"run {output} already finished (it has {SUMMARY}); nothing to resume")
        return RESUME
    if not empty and not overwrite:
        if unfinished and (output / CHECKPOINTS).is_dir():
            raise LmtuneError(
                f"run folder {output} holds an unfinished run; pass --resume to continue it or --overwrite to start over"
            )
        raise LmtuneError(f"run folder {output} already exists; choose another --output or pass --overwrite")
    return NEW


def keep_inputs(output: Path, inputs: dict[str, str | None] | None, flag: str) -> None:
    """Refuse to empty `output` when it holds one of the run's own inputs (model, data, ... by name)."""
    if not output.exists():
        return
    for what, value in (inputs or {}).items():
        if value and Path(value).exists() and Path(value).resolve().is_relative_to(output.resolve()):
            raise LmtuneError(
                f"{flag} would delete {output}, which holds this run's {what} ({value}); "
                "move it out first or choose another --output"
            )


def describe_start(start: str, resume_from: Path | None) -> str:
    """The plan's line on how the run starts."""
    if resume_from:
        return f"resumed from {resume_from.parent.name}/{resume_from.name}"
    if start == START_OVER:
        return "started over (--resume auto): no complete checkpoint to resume from"
    return "new run"


def remember(run: Path) -> None:
    """Note `run` as the latest (what generate and eval use by default). The run is complete before this:
    a failure here is a warning, never a failed run."""
    path = home() / "latest-run"
    try:
        with atomic.written_beside(path) as tmp:
            tmp.write_text(str(run.resolve()))
    except OSError as err:
        log.warning("could not note %s as the latest run in %s (%s); pass --model %s", run, path, err.strerror, run)


class Lock:
    """The run folder held by this process (an flock on `.lmtune.lock` inside it), released when the
    process ends however it ends, kill -9 included. The lock file is removed when the run ends; one left
    by a killed run is taken over, saying so. A folder this made and left empty is removed again on exit
    (a run that failed before writing anything)."""

    def __init__(self, output: Path):
        self.output = output
        self.made = not output.exists()
        self.file: IO[str] | None = None

    def __enter__(self) -> Lock:
        if self.output.exists() and not self.output.is_dir():
            raise LmtuneError(f"--output {self.output} is a file; choose a folder")
        self.output.mkdir(parents=True, exist_ok=True)
        path = self.output / LOCK
        while True:
            self.file = path.open("a+")
            try:
                fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.file.seek(0)
                holder = self.file.read().strip() or "?"
                self.file.close()
                raise LmtuneError(
                    f"another lmtune run (process {holder}) is writing to {self.output}; wait for it to finish "
                    "or choose another --output"
                ) from None
            # The run that held it may have removed the file between our open and our lock: then ours is
            # a lock on a file nobody else will open, and the one at `path` is taken again.
            if path.exists() and os.stat(path).st_ino == os.fstat(self.file.fileno()).st_ino:
                break
            self.file.close()
        self.file.seek(0)
        if stale := self.file.read().strip():  # no process holds it: the run that wrote it was killed
            log.info("taking over %s of process %s, which has ended without removing it", path, stale)
        self.file.truncate(0)
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.file
        with contextlib.suppress(OSError):  # a folder made read-only keeps it; it is stale then, not held
            (self.output / LOCK).unlink()  # while still held, so nobody takes a lock on a removed file
        self.file.close()
        if self.made and self.output.is_dir() and not any(self.output.iterdir()):
            self.output.rmdir()


def clear(output: Path) -> None:
    """Empty a run folder for --overwrite, keeping the lock this run holds in it."""
    for path in output.iterdir():
        if path.name != LOCK:
            atomic.remove(path)


def latest() -> Path:
    """The run folder `finetune` wrote last, or a clear error when there is none."""
    path = home() / "latest-run"
    if not path.is_file():
        raise LmtuneError("no run yet: train one with `lmtune finetune MODEL --data DATA`, or pass --model")
    run = Path(path.read_text().strip())
    if not (run / SUMMARY).is_file():
        raise LmtuneError(f"the latest run {run} is gone or unfinished; pass --model")
    return run


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())


def incomplete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not (p / COMPLETE).is_file())
