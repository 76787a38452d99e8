"""Run folders: where they go, and which one was the latest (what `generate` and `eval` use by default)."""

from __future__ import annotations

import os
import re
from datetime import datetime
from pathlib import Path

from lmtune.config import Config
from lmtune.errors import LmtuneError

# A run folder is complete once this file is written, last.
SUMMARY = "summary.json"


def home() -> Path:
    """lmtune's own state and caches: $LMTUNE_HOME, else ~/.cache/lmtune."""
    return Path(os.environ.get("LMTUNE_HOME") or Path.home() / ".cache" / "lmtune")


def default_output(cfg: Config) -> Path:
    def short(name: str | None) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "-", Path(name or "scratch").stem).strip("-") or "run"

    start = "scratch" if cfg.from_scratch and not cfg.model else short(cfg.model)
    return Path("runs") / f"{start}-{short(cfg.data)}-{datetime.now():%Y%m%d-%H%M%S}"


def check_output(output: Path, model: str | None, overwrite: bool, resume: bool = False) -> None:
    """Refuse to write over an existing run or into the model being trained; say when --resume applies.

    The rule, with no prompt: a new run needs an empty or missing folder (or --overwrite); --resume needs
    an unfinished run (no summary.json) there.
    """
    if model and Path(model).exists() and output.resolve().is_relative_to(Path(model).resolve()):
        raise LmtuneError(f"--output {output} is inside the model folder {model}; choose a folder outside it")
    if output.exists() and not output.is_dir():
        raise LmtuneError(f"--output {output} is a file; choose a folder")
    if resume and overwrite:
        raise LmtuneError("--resume continues a run and --overwrite replaces it; pass one of them")
    finished = (output / SUMMARY).is_file()
    if resume:
        if not output.is_dir():
            raise LmtuneError(f"nothing to resume: {output} does not exist; pass the --output of the stopped run")
        if finished:
            raise LmtuneError(f"run {output} already finished (it has {SUMMARY}); nothing to resume")
        return
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        if not finished and (output / "checkpoints").is_dir():
            raise LmtuneError(
                f"run folder {output} holds an unfinished run; pass --resume to continue it or --overwrite to start over"
            )
        raise LmtuneError(f"run folder {output} already exists; choose another --output or pass --overwrite")


def remember(run: Path) -> None:
    path = home() / "latest-run"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(run.resolve()))
    tmp.replace(path)


def latest() -> Path:
    """The run folder `finetune` wrote last, or a clear error when there is none."""
    path = home() / "latest-run"
    if not path.is_file():
        raise LmtuneError("no run yet: train one with `lmtune finetune MODEL --data DATA`, or pass --model")
    run = Path(path.read_text().strip())
    if not (run / SUMMARY).is_file():
        raise LmtuneError(f"the latest run {run} is gone or unfinished; pass --model")
    return run
