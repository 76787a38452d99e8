"""The CLI in a real pseudo-terminal: the live display, Ctrl-C from the keyboard, streaming, tables.

The other end-to-end tests run the CLI through pipes, where the display prints plain lines; a person
runs it in a terminal, where it draws live bars. Both paths are tested.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest
from terminal import ROOT, finish, record, run, spawn, wait_for

pytestmark = pytest.mark.slow

WIDTH = 100


def assert_clean(screen, *pieces: str) -> None:
    """Exit 0, every piece shown, no Rich markup printed as text, no traceback."""
    assert screen.code == 0, screen.text[-3000:]
    for piece in pieces:
        assert piece in screen.text, f"{piece!r} not shown:\n{screen.text[-3000:]}"
    assert not screen.markup_leaks(), screen.markup_leaks()
    assert "Traceback" not in screen.text and "error:" not in screen.text, screen.text[-3000:]


@pytest.fixture(scope="module")
def terminal_run(tmp_path_factory, tiny_model, corpus):
    """A fine-tuning run made in a terminal: evaluations every 2 steps, a checkpoint at step 4."""
    folder = tmp_path_factory.mktemp("terminal")
    home, out = folder / "home", folder / "run"
    screen = run(
        [
            "finetune", str(tiny_model), "--data", str(corpus / "train.txt"),
            "--validation-data", str(corpus / "valid.txt"), "--output", str(out), "--block-size", "32",
            "--batch-size", "4", "--max-steps", "8", "--eval-every", "2", "--save-every", "4", "--log-every", "2",
            "--mixed-precision", "no",
        ],
        home,
        WIDTH,
    )  # fmt: skip
    return screen, out, home


def test_finetune_in_a_terminal_evaluates_and_checkpoints(terminal_run):
    screen, out, _ = terminal_run
    assert_clean(
        screen, "eval step 2:", "eval step 4:", "eval step 6:", "eval step 8:", "before ->", "after", "saved to"
    )
    assert re.search(r"perplexity [\d.]+ before -> [\d.]+ after", screen.text), screen.text[-2000:]
    assert (out / "checkpoints" / "step-0000004" / "COMPLETE").is_file()
    assert (out / "summary.json").is_file()
    # The live bars were drawn: the terminal got cursor movements, not only lines.
    assert "\x1b[" in screen.raw


def test_generate_streams_and_compares_in_a_terminal(terminal_run, tiny_model):
    _, out, home = terminal_run
    screen = run(["generate", "The cat", "--model", str(out), "--max-new-tokens", "12", "--seed", "0"], home, WIDTH)
    assert_clean(screen, "The cat")
    compare = run(
        ["generate", "The dog", "--model", str(out), "--compare", str(tiny_model), "--greedy", "--max-new-tokens", "8"],
        home,
        WIDTH,
    )
    assert_clean(compare, out.name, Path(tiny_model).name, "The dog")


def test_eval_of_several_models_with_a_chart_in_a_terminal(terminal_run, tiny_model, corpus, tmp_path):
    _, out, home = terminal_run
    chart = tmp_path / "ppl.png"
    screen = run(
        ["eval", str(out), str(tiny_model), "--data", str(corpus / "valid.txt"), "--chart", str(chart)], home, WIDTH
    )
    assert_clean(screen, "perplexity", "bits/byte", "chart written to")
    assert chart.read_bytes()[:4] == b"\x89PNG"
    assert screen.text.count("token-level perplexity") == 2


def test_lora_run_and_merge_in_a_terminal(tiny_model, corpus, tmp_path):
    home, out = tmp_path / "home", tmp_path / "lora"
    trained = run(
        [
            "finetune", str(tiny_model), "--data", str(corpus / "train.txt"), "--output", str(out), "--lora",
            "--block-size", "32", "--max-steps", "4", "--eval-every", "2",
        ],
        home,
        WIDTH,
    )  # fmt: skip
    assert_clean(trained, "eval step 2:", "before ->")
    merged = run(["merge", str(out), "--output", str(tmp_path / "merged")], home, WIDTH)
    assert_clean(merged, "merged")
    assert (tmp_path / "merged" / "config.json").is_file()


def test_recipes_list_in_a_terminal(tmp_path):
    screen = run(["recipes", "list"], tmp_path / "home", WIDTH)
    assert_clean(screen, "tiny-cpu", "gpt2-wikitext2")


def test_ctrl_c_in_a_terminal_then_resume(tiny_model, corpus, tmp_path):
    """Ctrl-C typed at the keyboard saves a checkpoint and prints the resume command, which then finishes the run."""
    home, out = tmp_path / "home", tmp_path / "run"
    args = [
        "finetune", str(tiny_model), "--data", str(corpus / "train.txt"), "--output", str(out), "--block-size", "32",
        "--batch-size", "4", "--max-steps", "4000", "--eval-every", "0", "--mixed-precision", "no",
    ]  # fmt: skip
    child = record(spawn(args, home, WIDTH))
    wait_for(child, "training")
    time.sleep(1.0)
    child.sendintr()  # the terminal's Ctrl-C: SIGINT to the foreground process group
    stopped = finish(child)
    assert stopped.code == 128 + signal.SIGINT, stopped.text[-3000:]
    assert "stopped by SIGINT" in stopped.text and "--resume" in stopped.text, stopped.text[-3000:]
    assert not stopped.markup_leaks()
    assert not (out / "summary.json").exists()
    resumed = run([*args, "--resume"], home, WIDTH)
    assert_clean(resumed, "resuming from", "before ->")
    assert (out / "summary.json").is_file()


def test_make_demo_in_a_terminal(tmp_path):
    """The README's offline main job, `make demo`, as a person runs it: in a terminal."""
    out = tmp_path / "demo"
    screen = run(
        ["/usr/bin/env", "DEMO_OUT=" + str(out), "bash", str(ROOT / "demo" / "run.sh")], tmp_path / "home", WIDTH
    )
    assert_clean(screen, "Evaluate both on held-out weather reports", "before ->", "bits/byte")
    assert (out / "finetuned" / "summary.json").is_file()
