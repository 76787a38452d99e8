"""The display turns events into a live view on a terminal and into plain lines elsewhere."""

import io

from rich.console import Console
from terminal import ANSI

from lmtune.display import Display

PLAN = {
    "model": "m", "parameters": 1000, "trainable_parameters": 1000, "documents": 10, "empty_documents": 0,
    "train_tokens_available": 500, "data_format": "text",
    "data_from_cache": False, "blocks": 3, "block_size": 128, "tokens_dropped": 116, "validation_tokens": 50,
    "validation_documents": 1, "validation": "held out", "steps_per_epoch": 3, "epochs": 1, "total_steps": 3,
    "tokens_per_step": 128, "processes": 1, "mixed_precision": "no", "compile": False, "output": "runs/x",
}  # fmt: skip
EVENTS = [
    {"event": "phase", "phase": "tokenizing training data", "done": 5, "total": 10},
    {"event": "phase", "phase": "tokenizing training data", "done": 10, "total": 10},
    {"event": "phase", "phase": "loading model"},
    {"event": "plan", **PLAN},
    {"event": "phase", "phase": "evaluating", "done": 1, "total": 1},
    {"event": "eval", "step": 0, "tokens": 0, "eval_loss": 2.0, "eval_perplexity": 7.389},
    {"event": "progress", "step": 1, "total_steps": 3},
    {"event": "train", "step": 1, "epoch": 0, "tokens": 128, "loss": 1.5, "perplexity": 4.48, "lr": 1e-4, "tokens_per_second": 2500.0, "elapsed": 0.05},
    {"event": "progress", "step": 3, "total_steps": 3},
]  # fmt: skip


def run(terminal: bool, width: int = 120, events: list | None = None) -> str:
    out = io.StringIO()
    with Display(Console(file=out, force_terminal=terminal, width=width)) as display:
        for event in EVENTS if events is None else events:
            display(event)
    return out.getvalue()


def test_live_display_shows_phases_and_training_figures():
    text = run(terminal=True)
    for piece in (
        "tokenizing training data",
        "loading model",
        "training",
        "3/3",
        "loss 1.5000",
        "ppl 4.48",
        "2.5k tok/s",
        "eval",
    ):
        assert piece in text, piece


def test_plain_output_is_log_lines():
    lines = run(terminal=False).splitlines()
    assert "tokenizing training data (10) ..." in lines
    assert "step 1  loss 1.5000  ppl 4.48  2.5k tok/s  lr 1.00e-04" in lines
    assert "eval step 0: loss 2.0000  perplexity 7.39" in lines
    assert not any("\x1b[" in line for line in lines)  # no terminal control codes in a log file


def test_evaluations_between_training_steps_keep_the_live_display_going():
    """Once the first evaluation's bar is removed, task ids are no longer list positions (a crash seen at
    the first mid-run evaluation of every terminal run)."""
    evaluate = [
        {"event": "phase", "phase": "evaluating", "done": 1, "total": 2},
        {"event": "phase", "phase": "evaluating", "done": 2, "total": 2},
    ]
    events = [*EVENTS[:6], {"event": "progress", "step": 1, "total_steps": 3}]
    for step in (1, 2):
        events += [*evaluate, {"event": "eval", "step": step, "tokens": 1, "eval_loss": 1.0, "eval_perplexity": 2.7}]
        events.append({"event": "progress", "step": step + 1, "total_steps": 3})
    out = io.StringIO()
    with Display(Console(file=out, force_terminal=True, width=120)) as display:
        for event in events:
            display(event)
    assert "eval step 2: loss 1.0000" in ANSI.sub("", out.getvalue())


def test_a_narrow_terminal_keeps_the_bars_counts_and_loss_and_a_long_path_keeps_its_file_name():
    # Rich left to itself squeezed the bars, counts and times away at 100 columns when a phase named a long path.
    reading = {"event": "phase", "phase": "reading /home/someone/data/corpora/wikitext-2/train.txt"}
    for width in (80, 100, 200):
        text = ANSI.sub("", run(terminal=True, width=width, events=[reading, *EVENTS]))
        training = [line for line in text.splitlines() if "training " in line and "/3" in line][-1]
        assert "━" in training and "3/3" in training and "loss 1.5000" in training, (width, training)
        assert "2/train.txt" in text, width
    resuming = {"event": "phase", "phase": "resuming from /home/someone/runs/my-run/checkpoints/step-0000147"}
    text = ANSI.sub("", run(terminal=True, width=100, events=[resuming, *EVENTS]))
    assert "resuming from …" in text and "step-0000147" in text  # the words stay; the path keeps its end
