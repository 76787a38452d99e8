"""The docs cannot rot: every command example in README.md and docs/*.md runs here, offline, or is marked with
why it cannot; docs/reference.md is what Typer generates from the CLI today.

An example is a line of a fenced code block that starts with one of COMMANDS (after an optional `$ `; a
trailing `\\` continues it on the next line). Its marker, if any, ends its comment: see MARKER. Unmarked
`lmtune` examples run in a fresh folder where the names the docs use (`gpt2`, `./base`, `corpus.txt`,
`runs/chat`, ...) are the test suite's tiny models, data and runs (SANDBOX), with `max_steps=2` added to
each `finetune`. Each must exit 0 and print the line EXPECTED of its command; an example whose shown output
starts with `error:` must fail and print that line.
"""

from __future__ import annotations

import html
import itertools
import random
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import WORDS, make_tiny_model, write_jsonl, write_paragraphs

ROOT = Path(__file__).resolve().parent.parent
# The reference is `--help` rendered by Typer; its usage lines are checked against the CLI by its own test.
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "reference.md")]
COMMANDS = ("lmtune", "make", "accelerate", "lm_eval", "python", "python3")
MARKER = re.compile(
    r"\[(?:needs network|needs a GPU|needs \.\./shared/data|run by (?P<test>tests/[\w/]+\.py|\.ci/run)|not run: [^\]]+)\]\s*$"
)
FENCE = re.compile(r"^\s*```(\w*)")
PROSE_BLOCKS = {"yaml", "json", "jsonl", "jinja", "text"}  # data and templates, never commands

# What each command prints when it worked: one line (a regex) of its output, stdout and stderr together.
EXPECTED = {
    "finetune": r"^saved to \S+; try: lmtune generate",
    "finetune --dry-run": r"^Dry run: nothing was trained and no run folder was made",
    "generate": r"\S",
    "eval": r"perplexity|exact_match|\"loss\"",
    "data show": r"^below: the first \d+ of the \d+ rows",
    "prepare": r"^prepared \S+: [\d,]+ training documents",
    "merge": r"^merged \S+ into \S+; load it with",
    "recipes list": r"^ gpt2-chat-lora ",
    "recipes show": r"^# Run: ",
    "recipes copy": r"\S",
}


@dataclass
class Example:
    where: str  # FILE:LINE
    command: str
    marker: re.Match | None
    shown: list[str]  # the output the docs show after a `$ ` command

    def __str__(self) -> str:
        return f"{self.where}: {self.command}"


def examples() -> list[Example]:
    found = []
    for path in DOCS:
        lines, block, i, column = path.read_text().splitlines(), None, 0, None
        while i < len(lines):
            line = lines[i]
            if m := FENCE.match(line):
                block = None if block is not None else m.group(1)
                i += 1
                continue
            if block is None and line.startswith("|"):  # a table with a `command` or `example` column
                cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
                if not lines[i - 1].startswith("|"):
                    column = next((cells.index(h) for h in ("example", "command") if h in cells), None)
                elif column is not None and not cells[0].startswith("---") and column < len(cells):
                    cell = cells[column]
                    if (m := re.match(r"`([^`]+)`", cell)) and m.group(1).split(" ", 1)[0] in COMMANDS:
                        where = f"{path.relative_to(ROOT)}:{i + 1}"
                        found.append(Example(where, m.group(1), MARKER.search(cell[m.end() :]), []))
                i += 1
                continue
            text = line.strip()
            dollar = text.startswith("$ ")
            text = text.removeprefix("$ ")
            if block is None or block in PROSE_BLOCKS or text.split(" ", 1)[0] not in COMMANDS:
                i += 1
                continue
            start = i
            while text.split("#", 1)[0].rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text.split("#", 1)[0].rstrip()[:-1] + " " + lines[i].strip()
            shown = []
            while dollar and i + 1 < len(lines) and not lines[i + 1].startswith(("$ ", "```")):
                i += 1
                shown.append(lines[i])
            where = f"{path.relative_to(ROOT)}:{start + 1}"
            found.append(Example(where, text, MARKER.search(text), shown))
            i += 1
    return found


EXAMPLES = examples()
TO_RUN = [e for e in EXAMPLES if e.marker is None]


def test_examples_are_found_and_every_one_is_run_or_marked():
    assert len(EXAMPLES) > 30, "the example parser found too few: did the convention change?"
    for e in EXAMPLES:
        if e.marker is None:
            assert e.command.startswith("lmtune "), f"{e}\nonly lmtune examples run here; mark it (see MARKER)"
        elif e.marker.group("test"):
            assert (ROOT / e.marker.group("test")).is_file(), f"{e}\nmarked as run by a test file that does not exist"


# --- the sandbox: the docs' names for the tiny models, data and runs -------------------------------------


def conversations(n: int, seed: int) -> list[dict[str, str]]:
    r = random.Random(seed)
    return [{"prompt": " ".join(r.sample(WORDS, 3)), "response": " ".join(r.sample(WORDS, 5)) + "."} for _ in range(n)]


def pairs(n: int, seed: int) -> list[dict[str, str]]:
    r = random.Random(seed)
    return [
        {"prompt": " ".join(r.sample(WORDS, 3)), "chosen": "the sun is warm.", "rejected": " ".join(r.sample(WORDS, 4))}
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> dict[str, Path]:
    """Name in the docs -> the file or folder it stands for (models and data are linked, runs copied)."""
    made = tmp_path_factory.mktemp("docs-fixtures")
    # Context 512: the chat recipes' block size.
    model = make_tiny_model(made / "model", n_positions=512)
    text = write_paragraphs(made / "text.txt", 600, seed=3)
    held_out = write_paragraphs(made / "held-out.txt", 40, seed=4)
    chat = write_jsonl(made / "chat.jsonl", conversations(300, seed=5))
    prefs = write_jsonl(made / "prefs.jsonl", pairs(120, seed=6))
    names = {
        "gpt2": model, "base": model, "base-model": model, "tiny": model, "demo/out/base": model,
        "bench/out/data/tokenizer": model,
        "corpus.txt": text, "books.txt": text, "wiki.txt": text, "stories.txt": text, "held-out.txt": held_out,
        "test.txt": held_out, "demo/out/weather-test.txt": held_out,
        "instructions.jsonl": chat, "chat.jsonl": chat, "train.jsonl": chat,
        "prefs.jsonl": prefs, "prefs-test.jsonl": prefs,
    }  # fmt: skip
    runs = made / "runs"
    text_run, lora_run, chat_run = runs / "text", runs / "lora-chat", runs / "chat"
    # fmt: off
    for out, args in [
        (text_run, [model, "--data", text, "--block-size", "128"]),
        (lora_run, [model, "--recipe", "gpt2-chat-lora", "--data", chat, "--block-size", "128"]),
        (chat_run, [model, "--recipe", "gpt2-instruct", "--data", chat, "--block-size", "128"]),
    ]:
        r = lmtune(made, "finetune", *args, "--output", out, "max_steps=2")
        assert r.returncode == 0, r.stderr
    # fmt: on
    for name in ("runs/x", "runs/wt", "runs/shakespeare-base", "runs/wikitext-ft", "demo/out/finetuned"):
        names[name] = text_run
    names["runs/chat"] = lora_run
    names["runs/sft"] = names["chat-run"] = chat_run
    return names


def lmtune(cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmtune", *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def lay_out(names: dict[str, Path], folder: Path, outputs: set[str]) -> None:
    """The docs' names in `folder`: models and data as links, runs as copies an example may change. A name an
    example writes to (its --output) is left free."""
    for name, source in names.items():
        if name in outputs:
            continue
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if "runs" in source.parts:
            shutil.copytree(source, target, symlinks=True)
        else:
            target.symlink_to(source)


def expected(args: list[str]) -> str:
    words = [a for a in args if not a.startswith("-")]
    key = " ".join(words[:2]) if words[0] in ("data", "recipes") else words[0]
    if key == "finetune" and "--dry-run" in args:
        key = "finetune --dry-run"
    return EXPECTED[key]


@pytest.mark.slow
@pytest.mark.parametrize("example", TO_RUN, ids=[e.where for e in TO_RUN])
def test_example_runs_offline(example, sandbox, tmp_path, lmtune_home, cli, monkeypatch):
    folder = tmp_path / "work"
    folder.mkdir()
    commands = [shlex.split(c, comments=True) for c in example.command.split(" && ")]
    outputs = {b.removeprefix("./") for args in commands for a, b in itertools.pairwise(args) if a == "--output"}
    lay_out(sandbox, folder, outputs)
    lmtune_home.mkdir(parents=True, exist_ok=True)
    (lmtune_home / "latest-run").write_text(str(folder / "runs/x"))
    monkeypatch.chdir(folder)
    error = next((line for line in example.shown if line.startswith("error:")), None)
    for args in commands:
        assert args[0] == "lmtune", f"{example}\nonly lmtune commands run here"
        args = args[1:] + (["max_steps=2"] if args[1] == "finetune" else [])
        r = cli(*args)
        said = r.out + r.err
        if error:
            assert r.code != 0, f"{example}\nthe docs show an error, but it exited 0:\n{said}"
            assert error in said.splitlines(), f"{example}\nthe docs show\n  {error}\nbut it printed\n{said}"
            continue
        assert r.code == 0, f"{example}\nexited {r.code}:\n{said}"
        pattern = expected(args)
        assert re.search(pattern, said, re.M), f"{example}\nexpected a line matching {pattern!r} in\n{said}"


def test_the_command_reference_is_generated_from_the_cli(tmp_path):
    fresh = tmp_path / "reference.md"
    typer = Path(sys.executable).with_name("typer")
    subprocess.run(
        [typer, "lmtune.cli", "utils", "docs", "--name", "lmtune", "--output", fresh],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    assert fresh.read_text() == (ROOT / "docs/reference.md").read_text(), (
        "docs/reference.md is out of date with the CLI's --help: run `make docs-reference` and commit it"
    )


def test_the_reference_shows_each_command_s_help():
    """The generated page against `--help` itself: each command's first help line is on the page."""
    from typer.main import get_command

    from lmtune.cli import app

    page = html.unescape((ROOT / "docs/reference.md").read_text())
    group = get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        assert f"## `lmtune {name}`" in page
        first = (command.help or "").strip().splitlines()[0]
        assert first in page, f"`lmtune {name} --help` says {first!r}; run `make docs-reference`"


def test_the_benchmark_plots_draw_the_figures_on_the_page():
    """docs/plot_benchmarks.py's figures are the page's: each one is in a table row of its page."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plot_benchmarks", ROOT / "docs/plot_benchmarks.py")
    plots = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(plots)  # type: ignore[union-attr]
    pages = (ROOT / "docs/benchmarks.md").read_text() + (ROOT / "docs/bigger-and-faster.md").read_text()
    cells = {c.strip().strip("*") for line in pages.splitlines() if line.startswith("|") for c in line.split("|")}
    words = set(re.findall(r"[\d,.]+", " ".join(cells)))
    for name, (_, _, bars) in plots.PLOTS.items():
        for bar, figure in bars.items():
            assert figure in words, f"{name}: {bar} {figure} is not in the benchmark tables; run `make docs-plots`"
        assert f"img/{name}.png" in pages, f"docs/img/{name}.png is shown on no page"
