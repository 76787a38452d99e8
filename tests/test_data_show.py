"""`lmtune data show`: the first training rows as training sees them, token by token, in a pipe (marks) and in
a terminal (colours), and the warnings about chat templates that leave nothing to train on or drop EOS."""

import json
import re

import pytest
from terminal import run

from lmtune import batches, data
from lmtune.config import Config
from lmtune.model import load_tokenizer
from lmtune.show import CLOSE, LEGEND_PLAIN, NEWLINE, OPEN, SEPARATOR

PAIRS = {"the sky": "blue", "grass": "green", "a cat": "meow", "the dog": "woof"}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def chat_data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", [{"prompt": k, "response": v} for k, v in PAIRS.items()] * 5)


def shown_rows(out: str) -> dict[str, str]:
    """Each row's title and its text as printed (the lines after the title, up to the next blank line)."""
    rows, title = {}, None
    for line in out.splitlines():
        if line.startswith("── ") and line.endswith(" ──"):
            title = line[3:-3]
            rows[title] = ""
        elif title is not None and line:
            rows[title] += line + "\n"
        elif not line:
            title = None
    return {t: text[:-1] for t, text in rows.items()}


def unmarked(text: str) -> str:
    """The text with lmtune's marks taken out: what the tokens spell."""
    for mark in (SEPARATOR, OPEN, CLOSE, NEWLINE):
        text = text.replace(mark, "")
    return text


def in_loss(text: str) -> list[str]:
    """The runs of tokens the marks say the loss counts, each as its tokens."""
    return [run.split(SEPARATOR) for run in re.findall(f"{OPEN}(.*?){CLOSE}", text, flags=re.S)]


def test_plain_output_marks_each_token_the_loss_and_eos(cli, tiny_model, chat_data):
    r = cli("data", "show", chat_data, "--model", tiny_model, "--no-packing", "-n", "2", "--block-size", "64")
    assert r.code == 0, r.err
    assert LEGEND_PLAIN in r.out
    tok = load_tokenizer(str(tiny_model))
    corpus = data.load_corpus(Config(data=str(chat_data)), tok, lambda e: None)
    rows = batches.training_rows(corpus, 64).dataset  # as training makes them, without packing
    n = len(rows)
    said = " ".join(r.out.split())
    assert f"{n} conversations one per row in {n} rows of up to 64 tokens (0 without a response skipped" in said
    assert "as training skips them); 0 cut short" in said
    assert "chat template: lmtune's simple one" in r.out and f"below: the first 2 of the {n} rows" in r.out
    shown = shown_rows(r.out)
    assert len(shown) == 2
    for i, (title, text) in enumerate(shown.items()):
        ids, labels, _ = rows[i]
        # Exactly the row training gets: every token, in order, separated; the text they spell.
        assert unmarked(text) == tok.decode(ids)
        pieces = re.split(f"[{SEPARATOR}{OPEN}{CLOSE}]", text.replace(NEWLINE, ""))
        assert [p for p in pieces if p] == [tok.decode([t]) for t in ids.tolist()]
        # The loss counts the response and the EOS after it, and nothing else.
        prompt = tok.decode(ids).split("### Instruction:\n")[1].split("\n")[0]
        answer = PAIRS[prompt]
        assert in_loss(text) == [[tok.decode([t]) for t in tok(answer)["input_ids"]] + [tok.eos_token]]
        assert text.endswith(f"{tok.eos_token}{CLOSE}")
        scored = (labels[1:] != -100).sum().item()
        assert title == f"row {i + 1} of {n}: conversation {i + 1} ({len(ids)} tokens, {scored} in the loss)"
        assert scored == len(tok(answer)["input_ids"]) + 1
    assert "no token of the answer" not in r.err and "without EOS" not in r.err


def test_packed_rows_show_where_each_conversation_starts(cli, tiny_model, chat_data, tmp_path):
    # A short template, so that several conversations fit in the tiny model's 64 positions.
    tok = template_tokenizer(
        tiny_model, tmp_path / "tok", TURNS + "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    r = cli("data", "show", chat_data, "--model", tiny_model, "--tokenizer", tok, "-n", "1", "--block-size", "64")
    assert r.code == 0, r.err
    assert "conversations packed into" in r.out
    ((title, text),) = shown_rows(r.out).items()
    numbers = re.findall(r"\[conversation (\d+)\] ", text)
    assert len(numbers) >= 2, text  # several conversations share the row
    assert title.startswith("row 1 of ") and f"conversations {', '.join(numbers[:-1])} and {numbers[-1]} (" in title
    # Each conversation starts a line, and each has its own answer and EOS in the loss.
    starts = [line for line in text.splitlines() if "[conversation " in line]
    assert len(starts) == len(numbers) and all(line.startswith("[conversation ") for line in starts)
    assert len(in_loss(text)) == len(numbers) and all(run[-1] == "<|endoftext|>" for run in in_loss(text))
    # Without packing, the same data is one conversation per row.
    r = cli("data", "show", chat_data, "--model", tiny_model, "--tokenizer", tok, "-n", "1", "--no-packing")
    assert "one per row" in r.out and "[conversation" not in shown_rows(r.out).popitem()[1]


def test_text_blocks_count_every_token_but_the_first(cli, tiny_model, corpus):
    r = cli("data", "show", corpus / "train.txt", "--model", tiny_model, "-n", "1", "--block-size", "32")
    assert r.code == 0, r.err
    assert "text data" in r.out and "documents joined by EOS and cut into" in r.out
    ((title, text),) = shown_rows(r.out).items()
    assert re.fullmatch(r"block 1 of [\d,]+ \(32 tokens, 31 in the loss\)", title), title
    assert text.count(OPEN) == 1 and text.endswith(CLOSE) and not text.startswith(OPEN)
    assert len(in_loss(text)[0]) == 31


@pytest.mark.slow
def test_in_a_terminal_the_tokens_are_coloured_instead_of_marked(tmp_path, tiny_model, chat_data):
    screen = run(
        ["data", "show", str(chat_data), "--model", str(tiny_model), "-n", "2", "--block-size", "64"], tmp_path / "home"
    )
    assert screen.code == 0, screen.text[-2000:]
    assert "counted in the loss" in screen.text and "context only" in screen.text and "row 2 of" in screen.text
    assert OPEN not in screen.text and SEPARATOR not in screen.text  # colours, not marks
    assert "\x1b[1;32" in screen.raw and "\x1b[2" in screen.raw  # bold green (loss), dim (context)
    assert "### Instruction:" in screen.text.replace(NEWLINE, "")
    assert not screen.markup_leaks() and "Traceback" not in screen.text


TURNS = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"  # no EOS of its own


def template_tokenizer(tiny_model, folder, template):
    tok = load_tokenizer(str(tiny_model))
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


def test_a_template_that_leaves_no_token_to_train_on_is_warned_about(cli, tiny_model, chat_data, tmp_path, caplog):
    # A template that writes the questions only: the answers vanish, and lmtune's EOS is all there is to learn.
    only_questions = "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% endif %}{% endfor %}"
    tok = template_tokenizer(tiny_model, tmp_path / "tok", only_questions)
    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "the sun", "response": "warm"}])
    r = cli(
        "data", "show", chat_data, "--validation-data", held, "--model", tiny_model, "--tokenizer", tok, "-n", "1",
        "--no-packing",
    )  # fmt: skip
    assert r.code == 0, r.err
    warnings = [rec.getMessage() for rec in caplog.records if "no token of the answer" in rec.getMessage()]
    assert warnings == [
        "the chat template leaves no token of the answer to train on in 20 of 20 conversations (the loss sees at most "
        "the EOS lmtune adds): it writes no text for their assistant turns; check the template's assistant branch, "
        "or pass --tokenizer with another template"
    ]
    ((title, text),) = shown_rows(r.out).items()
    assert in_loss(text) == [["<|endoftext|>"]] and "1 in the loss" in title  # what training would learn


def test_a_template_that_ends_responses_without_eos_is_warned_about(cli, tiny_model, tmp_path, caplog):
    tok = template_tokenizer(
        tiny_model, tmp_path / "tok", TURNS + "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    two_turns = [
        {"messages": [
            {"role": "user", "content": f"the {a}"}, {"role": "assistant", "content": a},
            {"role": "user", "content": f"the {b}"}, {"role": "assistant", "content": b},
        ]}
        for a, b in [("cat", "dog"), ("sun", "rain"), ("red", "blue")] * 4
    ]  # fmt: skip
    chats = write_jsonl(tmp_path / "two.jsonl", two_turns)
    held = write_jsonl(tmp_path / "held.jsonl", two_turns[:1])
    r = cli(
        "data", "show", chats, "--validation-data", held, "--model", tiny_model, "--tokenizer", tok, "-n", "1",
        "--no-packing",
    )  # fmt: skip
    assert r.code == 0, r.err
    (warning,) = [rec.getMessage() for rec in caplog.records if "without EOS" in rec.getMessage()]
    # The first answer of each of the 12 conversations is followed by the next user turn, not by EOS;
    # the last gets the EOS lmtune adds.
    assert warning.startswith("the chat template ends 12 of 24 responses without EOS (<|endoftext|>): after them")
    assert "'<user>" in warning and "end each assistant turn with {{ eos_token }}" in warning
    ((_, text),) = shown_rows(r.out).items()
    first, last = in_loss(text)
    assert first[-1] != "<|endoftext|>" and last[-1] == "<|endoftext|>"


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["{tmp}/missing.jsonl", "--model", "{model}"], "no such file: {tmp}/missing.jsonl", 1),
        (["{data}"], "no run yet: train one with `lmtune finetune MODEL --data DATA`, or pass --model", 1),
        (["{data}", "--model", "{model}", "-n", "0"], "Invalid value for '--examples' / '-n'", 2),
        (
            ["{data}", "--model", "{model}", "--block-size", "65"],
            "--block-size 65 is longer than the model's context",
            1,
        ),
    ],
)
def test_bad_input_gives_one_line(cli, tiny_model, chat_data, tmp_path, args, message, code):
    fill = {"tmp": tmp_path, "model": tiny_model, "data": chat_data}
    r = cli("data", "show", *[a.format(**fill) for a in args])
    assert r.code == code and message.format(**fill) in r.err, r.err
    lines = r.err.strip().splitlines()
    assert lines[-1].startswith("error:") and "Traceback" not in r.err
