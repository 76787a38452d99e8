"""How the library tells whoever runs it what it is doing: events as dicts, handed to a `Report`.

The same dicts go to `metrics.jsonl`; the CLI's display turns them into bars or log lines.
Kinds: "phase" (a named phase, with `done`/`total` when it has a size), "plan", "progress", "train", "eval".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("lmtune")

Report = Callable[[dict[str, Any]], None]


def log_report(event: dict[str, Any]) -> None:
    """The report used when no display is attached: metrics as log lines, progress ignored."""
    if event["event"] in ("train", "eval"):
        log.info(json.dumps(event))


def silent(event: dict[str, Any]) -> None:
    """The report of processes that do not talk to the user (all but the first)."""
