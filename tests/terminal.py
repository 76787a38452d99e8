"""Run the real `lmtune` command in a pseudo-terminal, as a person does, and read back what they saw.

On a terminal the CLI takes other code paths than in a pipe (the live Rich display, the terminal's width,
Ctrl-C from the keyboard), so these tests start a new process on a pty rather than calling `main()`.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pexpect

ROOT = Path(__file__).resolve().parent.parent
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Za-z0-9]|\r")
# Rich markup that was printed instead of interpreted, e.g. `[bold]`, `[/]` or `[cyan]eval[/]`.
MARKUP = re.compile(r"\[/?(?:bold|dim|cyan|red|green|italic|blue|magenta|yellow)?(?: [a-z]+)*\]")


@dataclass
class Screen:
    code: int
    raw: str  # what the terminal received, control codes included
    text: str  # the same without them

    def markup_leaks(self) -> list[str]:
        return MARKUP.findall(self.text)


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "LMTUNE_DEBUG")}
    env.update(
        LMTUNE_HOME=str(home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TERM="xterm-256color",
        TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
    )  # fmt: skip
    return env


def spawn(args: list[str], home: Path, width: int = 100, cwd: Path = ROOT) -> pexpect.spawn:
    """`lmtune ARGS` (or another command when args[0] is not an lmtune command) on a fresh pty of `width` columns."""
    command, rest = (sys.executable, ["-m", "lmtune", *args]) if not args[0].startswith("/") else (args[0], args[1:])
    return pexpect.spawn(
        command, [str(a) for a in rest], cwd=str(cwd), env=environment(home), dimensions=(40, width),
        encoding="utf-8", codec_errors="replace", timeout=600,
    )  # fmt: skip


def finish(child: pexpect.spawn, timeout: float = 600) -> Screen:
    child.expect(pexpect.EOF, timeout=timeout)
    child.close()
    raw = child.before if isinstance(child.before, str) else ""
    raw = getattr(child, "seen", "") + raw
    code = child.exitstatus if child.exitstatus is not None else 128 + (child.signalstatus or 0)
    return Screen(code, raw, ANSI.sub("", raw))


def run(args: list[str], home: Path, width: int = 100, timeout: float = 600) -> Screen:
    return finish(record(spawn(args, home, width)), timeout)


def record(child: pexpect.spawn) -> pexpect.spawn:
    """Keep everything the terminal shows, also what `expect` consumed on the way."""
    child.seen = ""  # type: ignore[attr-defined]
    return child


def wait_for(child: pexpect.spawn, pattern: str, timeout: float = 300) -> None:
    """Wait until `pattern` (a regex) appears, keeping what was shown up to it."""
    child.expect(pattern, timeout=timeout)
    child.seen += (child.before or "") + (child.after if isinstance(child.after, str) else "")
