"""The docs' pictures from a real run: `make docs-display`.

Fine-tunes the test suite's tiny GPT-2 (offline, a minute on a CPU) on a pseudo-terminal of 100 columns, as a
person would, plays what the terminal received through a terminal emulator (pyte) and saves the final screen
as docs/img/display.svg with Rich. The run's curves.png becomes docs/img/curves.png, and `lmtune eval --chart`
of the base model, the run and a second, longer run gives docs/img/eval-chart.png.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyte
from rich.console import Console
from rich.style import Style
from rich.text import Text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import make_tiny_model, write_paragraphs  # noqa: E402
from terminal import environment, finish, record, spawn  # noqa: E402

IMG = ROOT / "docs" / "img"
WIDTH, HEIGHT = 100, 40  # the terminal: what tests/test_terminal.py uses


def rich_color(name: str) -> str | None:
    """pyte's colour (a name, `brightred`, `brown` for yellow, or six hex digits) as Rich spells it."""
    if name == "default":
        return None
    if len(name) == 6 and all(ch in "0123456789abcdef" for ch in name):
        return f"#{name}"
    name = name.replace("brown", "yellow")
    return "bright_" + name.removeprefix("bright") if name.startswith("bright") else name


def screen_text(raw: str) -> Text:
    """The terminal's last screen, as Rich text with the colours it showed."""
    screen = pyte.Screen(WIDTH, HEIGHT)
    pyte.Stream(screen).feed(raw.replace("\n", "\r\n"))
    text = Text()
    rows = [screen.buffer[y] for y in range(screen.lines)]
    while rows and not "".join(rows[-1][x].data for x in range(WIDTH)).strip():
        rows.pop()  # the empty lines below the last one
    for row in rows:
        line = Text()
        for x in range(WIDTH):
            c = row[x]
            line.append(c.data, Style(color=rich_color(c.fg), bgcolor=rich_color(c.bg), bold=c.bold, reverse=c.reverse))
        line.rstrip()
        text.append_text(line)
        text.append("\n")
    return text


def main() -> None:
    IMG.mkdir(parents=True, exist_ok=True)
    # A short, fixed folder: lmtune shows the data's absolute path, and a long one squeezes the bars.
    work = Path(tempfile.gettempdir()) / "lmtune-docs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        model = make_tiny_model(work / "tiny", n_positions=64)
        write_paragraphs(work / "train.txt", 400, seed=1)
        write_paragraphs(work / "valid.txt", 40, seed=2)
        home = work / "home"
        # Relative paths, run from the temporary folder: the picture shows what a user would type.
        args = ["finetune", "tiny", "--data", "train.txt", "--validation-data", "valid.txt",
                "--block-size", "32", "--batch-size", "8", "--lr", "3e-3", "--eval-every", "10"]  # fmt: skip
        run = work / "runs" / "tiny-40"
        shown = finish(record(spawn([*args, "--output", "runs/tiny-40", "--max-steps", "40"], home, WIDTH, cwd=work)))
        if shown.code != 0:
            raise SystemExit(f"the run failed ({shown.code}):\n{shown.text}")
        console = Console(record=True, width=WIDTH, force_terminal=True, color_system="truecolor", file=io.StringIO())
        text = screen_text(shown.raw)
        print(text.plain)
        console.print(text, end="")
        console.save_svg(str(IMG / "display.svg"), title="lmtune finetune")
        shutil.copy(run / "curves.png", IMG / "curves.png")

        longer = work / "runs" / "tiny-120"
        env = environment(home)
        subprocess.run([sys.executable, "-m", "lmtune", *args, "--output", longer, "--max-steps", "120"],
                       cwd=work, env=env, check=True, capture_output=True)  # fmt: skip
        subprocess.run([sys.executable, "-m", "lmtune", "eval", model, run, longer, "--data", "valid.txt",
                        "--chart", IMG / "eval-chart.png"], cwd=work, env=env, check=True, capture_output=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {IMG / 'display.svg'}, {IMG / 'curves.png'} and {IMG / 'eval-chart.png'}")


if __name__ == "__main__":
    main()
