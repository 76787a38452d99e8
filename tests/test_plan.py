"""The data plan (decided once, read by everything after) and several sources mixed by weight."""

import ast
import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import WORDS, read_json, sentences, write_jsonl, write_paragraphs

from lmtune import data
from lmtune.config import Config
from lmtune.data import plan as data_plan

LMTUNE = Path(__file__).resolve().parent.parent / "lmtune"


def chat_rows(n: int, seed: int):
    r = random.Random(seed)
    return [
        {"prompt": r.choice(WORDS) + " " + r.choice(WORDS), "response": sentences(1, seed * 1000 + i)[0]}
        for i in range(n)
    ]


@pytest.fixture
def folder(tmp_path):
    """A data folder with a training file and a validation file, as users lay them out."""
    d = tmp_path / "d"
    d.mkdir()
    write_paragraphs(d / "train.txt", 120, seed=1)
    write_paragraphs(d / "valid.txt", 20, seed=2)
    return d


def args(model, out, *extra):
    return (
        "finetune", model, "--output", out, "--block-size", "32", "--batch-size", "4", "--mixed-precision", "no",
        "--log-every", "1", *extra,
    )  # fmt: skip


# --- the plan ---------------------------------------------------------------------------------------


def test_the_plan_says_where_each_sources_validation_comes_from(folder, tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(30, 1))
    plan = data_plan.decide(Config(data=[str(folder), str(chat)], data_weights=[1, 3]))
    assert [(s.name, s.form, s.data_format, s.validation, s.weight) for s in plan.sources] == [
        ("d", "folder", "text", "split", 1.0),
        ("chat.jsonl", "file", "chat", "held_out", 3.0),
    ]
    given = data_plan.decide(Config(data=str(chat), validation_data=str(folder / "valid.txt")))
    assert given.sources[0].validation == "data" and given.sources[0].validation_data == str(folder / "valid.txt")


def test_a_streamed_folder_keeps_its_validation_file(cli, tiny_model, folder, tmp_path):
    """The folder's valid.txt is its validation with --streaming too (it used to be streamed as training data),
    and `lmtune eval RUN` scores what the run validated on (it used to score valid.txt, mostly trained on)."""
    whole = tmp_path / "whole"
    streamed = tmp_path / "streamed"
    assert cli(*args(tiny_model, whole, "--data", folder, "--max-steps", "3")).code == 0
    r = cli(*args(tiny_model, streamed, "--data", folder, "--max-steps", "3", "--streaming"))
    assert r.code == 0, r.err
    a, b = read_json(whole / "summary.json"), read_json(streamed / "summary.json")
    assert a["validation_tokens"] == b["validation_tokens"] > 0
    assert b["sources"][0]["validation_tokens"] == a["sources"][0]["validation_tokens"]
    assert read_json(streamed / "data_plan.json")["sources"][0]["validation"] == "split"
    r = cli("eval", streamed, "--json")
    assert r.code == 0, r.err
    scored = json.loads(r.out)
    assert scored["loss"] == pytest.approx(b["eval_loss"], rel=1e-5) and scored["tokens"] == b["eval_tokens"]


def test_eval_of_a_run_names_the_validation_data_it_scored(cli, finetuned, corpus):
    """A run trained with --validation-data: `eval RUN --json` names that file (it used to name the training file)."""
    r = cli("eval", finetuned, "--json")
    assert r.code == 0, r.err
    where = json.loads(r.out)["data"]
    assert str(corpus / "valid.txt") in where and "train.txt" not in where


def test_a_run_folder_inside_the_data_folder_is_not_read_as_data(cli, tiny_model, folder):
    """--output inside --data: the run's own files (metrics, summary, tokenizer) used to count as data, and every
    later run on the folder, and `eval` of that run, failed ("mixes file types")."""
    inside = folder / "runs" / "first"
    assert cli(*args(tiny_model, inside, "--data", folder, "--max-steps", "2")).code == 0
    r = cli(*args(tiny_model, folder.parent / "second", "--data", folder, "--max-steps", "2"))
    assert r.code == 0, r.err
    assert (
        read_json(folder.parent / "second" / "summary.json")["documents"]
        == read_json(inside / "summary.json")["documents"]
    )
    r = cli("eval", inside, "--json")
    assert r.code == 0, r.err


def test_a_text_file_with_a_byte_order_mark_trains_on_the_text_only(tiny_model, tmp_path):
    from lmtune.model import load_tokenizer

    text = "\n\n".join(sentences(40, 1))
    plain, marked = tmp_path / "plain.txt", tmp_path / "marked.txt"
    plain.write_text(text, encoding="utf-8")
    marked.write_text(text, encoding="utf-8-sig")  # EF BB BF first, as Windows editors write
    tok = load_tokenizer(str(tiny_model))
    a = data.load_corpus(Config(data=str(plain)), tok, lambda e: None)
    b = data.load_corpus(Config(data=str(marked)), tok, lambda e: None)
    assert np.array_equal(a.train.ids, b.train.ids) and np.array_equal(a.validation.ids, b.validation.ids)
    assert a.train.bytes + a.validation.bytes == b.train.bytes + b.validation.bytes


# --- streaming -------------------------------------------------------------------------------------


def test_a_stream_shorter_than_the_run_is_read_again(cli, tiny_model, tmp_path, caplog):
    """--max-steps 6 on a stream of one step's blocks: it used to stop after step 1 with exit 0 and no word."""
    short = write_paragraphs(tmp_path / "short.txt", 12, seed=4)
    valid = write_paragraphs(tmp_path / "valid.txt", 5, seed=5)
    out = tmp_path / "run"
    stream = ("--data", short, "--validation-data", valid, "--streaming")
    r = cli(*args(tiny_model, out, *stream, "--max-steps", "6", "--eval-every", "0"))
    assert r.code == 0, r.err
    assert read_json(out / "summary.json")["steps"] == 6
    assert "reading it again from its start (pass 2)" in caplog.text


def test_streaming_refuses_epochs(cli, tiny_model, folder, tmp_path):
    """--epochs 2 with --streaming used to be ignored without a word."""
    r = cli(*args(tiny_model, tmp_path / "run", "--data", folder, "--streaming", "--max-steps", "3", "--epochs", "2"))
    assert r.code == 1 and "--epochs does not apply" in r.err and "Traceback" not in r.err


def test_a_streaming_plan_does_not_claim_zero_documents(cli, tiny_model, folder, tmp_path):
    r = cli(*args(tiny_model, tmp_path / "run", "--data", folder, "--streaming", "--max-steps", "3", "--dry-run"))
    assert r.code == 0, r.err
    assert "streamed: read and tokenized as training takes them" in r.out
    assert "documents          0" not in r.out and "training tokens    0" not in r.out


# --- mixing ----------------------------------------------------------------------------------------


@pytest.fixture
def two_sources(tmp_path):
    chat = write_jsonl(tmp_path / "chat.jsonl", chat_rows(80, 1))
    books = write_paragraphs(tmp_path / "books.txt", 150, seed=3)
    return chat, books


def shares(summary):
    tokens = [s["train_tokens"] for s in summary["sources"]]
    return [t / sum(tokens) for t in tokens]


def test_two_sources_mixed_by_weight_hold_their_shares(cli, tiny_model, two_sources, tmp_path):
    chat, books = two_sources
    out = tmp_path / "mixed"
    mix = ("--data", chat, "--data", books, "--data-weights", "3,1", "--block-size", "64")
    r = cli(*args(tiny_model, out, *mix, "--max-steps", "12"))
    assert r.code == 0, r.err
    summary = read_json(out / "summary.json")
    assert [s["data"] for s in summary["sources"]] == [str(chat), str(books)]
    assert shares(summary) == pytest.approx([0.75, 0.25], abs=0.03)
    assert sum(s["train_tokens"] for s in summary["sources"]) == summary["train_tokens"]
    # Each source's own validation and scores, and the whole as their token-weighted mean.
    by_source = summary["sources"]
    whole = sum(s["eval_loss"] * s["eval_tokens"] for s in by_source) / sum(s["eval_tokens"] for s in by_source)
    assert summary["eval_loss"] == pytest.approx(whole, rel=1e-9)
    assert all(s["validation_tokens"] > 0 for s in by_source)
    evals = [e for e in map(json.loads, (out / "metrics.jsonl").open()) if e["event"] == "eval"]
    assert [s["name"] for s in evals[-1]["sources"]] == ["chat.jsonl", "books.txt"]
    assert "chat.jsonl" in r.out and "75.0% of the training tokens" in r.out  # the plan shows each share
    # eval --generate answers the chat source's held-out conversations (the text source has no questions).
    r = cli("eval", out, "--generate", "--max-new-tokens", "3")
    assert r.code == 0, r.err
    assert f"conversations of the validation data of {out} ({chat})" in " ".join(r.out.split())


def test_the_mixture_holds_the_weights_at_every_step(tiny_model, two_sources):
    """A weighted round robin by tokens: any stretch of a few dozen rows is near the weights."""
    from lmtune import batches, mixture
    from lmtune.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    corpora = [data.load_corpus(Config(data=str(p)), tok, lambda e: None) for p in two_sources]
    parts = [batches.training_rows(c, 64, packing=False) for c in corpora]
    mixed = mixture.Mixed(parts, [3, 1], seed=0)
    order = mixed.order(0)
    tokens = np.concatenate([t for t in mixed.tokens])
    source = np.searchsorted(mixed.offsets, order, side="right") - 1
    for start in range(0, len(order) - 32, 32):  # every step of 32 rows
        window = slice(start, start + 32)
        chat = tokens[order[window]][source[window] == 0].sum() / tokens[order[window]].sum()
        assert chat == pytest.approx(0.75, abs=0.08)
    assert np.array_equal(order, mixture.Mixed(parts, [3, 1], seed=0).order(0))  # deterministic for a seed
    assert not np.array_equal(order, mixed.order(1))  # a new shuffle each epoch


def test_by_size_each_source_is_seen_once_an_epoch(tiny_model, two_sources):
    from lmtune import batches, mixture
    from lmtune.model import load_tokenizer

    tok = load_tokenizer(str(tiny_model))
    corpora = [data.load_corpus(Config(data=str(p)), tok, lambda e: None) for p in two_sources]
    mixed = mixture.Mixed([batches.training_rows(c, 64) for c in corpora], None, seed=0)
    assert mixed.times_seen() == [1.0, 1.0]
    assert sorted(mixed.order(0).tolist()) == list(range(len(mixed)))


@pytest.mark.slow
def test_a_mixed_run_stopped_midway_resumes_exactly(cli, tiny_model, two_sources, tmp_path, monkeypatch):
    from conftest import kill_self_on_call

    from lmtune import train

    chat, books = two_sources
    mix = ("--data", chat, "--data", books, "--data-weights", "1,2", "--block-size", "64", "--max-steps", "10")
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert cli(*args(tiny_model, whole, *mix)).code == 0
    real = train.forward_backward
    kill_self_on_call(monkeypatch, train, "forward_backward", 5)
    assert cli(*args(tiny_model, stopped, *mix)).code == 130
    monkeypatch.setattr(train, "forward_backward", real)
    r = cli(*args(tiny_model, stopped, *mix), "--resume")
    assert r.code == 0, r.err

    def losses(out):
        return [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").open()) if e["event"] == "train"]

    assert losses(stopped) == losses(whole) and len(losses(whole)) == 10
    a, b = read_json(whole / "summary.json"), read_json(stopped / "summary.json")
    assert [s["train_tokens"] for s in a["sources"]] == [s["train_tokens"] for s in b["sources"]]


def test_streams_mixed_by_weight(cli, tiny_model, two_sources, tmp_path):
    _, books = two_sources
    other = write_paragraphs(tmp_path / "other.txt", 150, seed=9)
    out = tmp_path / "run"
    mix = ("--data", books, "--data", other, "--data-weights", "1,3", "--streaming", "--max-steps", "8")
    r = cli(*args(tiny_model, out, *mix))
    assert r.code == 0, r.err
    assert shares(read_json(out / "summary.json")) == pytest.approx([0.25, 0.75], abs=0.03)
    r = cli(
        *args(tiny_model, tmp_path / "no-weights", "--data", books, "--data", other, "--streaming", "--max-steps", "2")
    )
    assert r.code == 1 and "--data-weights" in r.err


def test_prepared_folders_mix(cli, tiny_model, two_sources, tmp_path):
    chat, books = two_sources
    for src, name in ((chat, "chat-tokens"), (books, "books-tokens")):
        assert cli("prepare", src, "--model", tiny_model, "--output", tmp_path / name).code == 0
    out = tmp_path / "run"
    prepared = ("--data", tmp_path / "chat-tokens", "--data", tmp_path / "books-tokens", "--data-weights", "1,1")
    r = cli(*args(tiny_model, out, *prepared, "--max-steps", "6", "--block-size", "64"))
    assert r.code == 0, r.err
    assert shares(read_json(out / "summary.json")) == pytest.approx([0.5, 0.5], abs=0.03)


def test_a_recipe_lists_its_sources(cli, tiny_model, two_sources, tmp_path):
    chat, books = two_sources
    valid = write_jsonl(tmp_path / "chat-valid.jsonl", chat_rows(5, 7))
    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        f"data:\n  - {{path: {chat}, weight: 2, validation: {valid}}}\n  - {{path: {books}, weight: 1}}\n"
    )
    out = tmp_path / "run"
    r = cli(*args(tiny_model, out, "--recipe", recipe, "--max-steps", "3", "--block-size", "64"))
    assert r.code == 0, r.err
    plan = read_json(out / "data_plan.json")
    assert [s["validation"] for s in plan["sources"]] == ["data", "held_out"]
    assert plan["sources"][0]["validation_data"] == str(valid)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--data-weights", "3,1"), "give --data more than once"),
        (("--data", "X", "--data-weights", "1"), "1 weights for 2 --data"),
        (("--data", "X", "--data-weights", "1,-2"), "above 0"),
        (("--data", "X", "--validation-data", "X"), "ambiguous"),
    ],
)
def test_bad_mixing_is_refused_in_one_line(cli, tiny_model, corpus, tmp_path, extra, message):
    extra = tuple(str(corpus / "valid.txt") if e == "X" else e for e in extra)
    r = cli(*args(tiny_model, tmp_path / "run", "--data", corpus / "train.txt", *extra, "--dry-run"))
    assert r.code == 1 and message in r.err and "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1


# --- the package's shape ---------------------------------------------------------------------------


def imports_of(path: Path) -> set[str]:
    """The lmtune modules a file imports (absolute imports; `from lmtune.data import x` names x's module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("lmtune")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lmtune"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if (LMTUNE.parent / (sub.replace(".", "/") + ".py")).is_file() else node.module)
    return out


def test_the_import_graph_has_no_circle():
    modules = {
        ".".join(p.relative_to(LMTUNE.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in LMTUNE.rglob("*.py")
    }
    graph = {m: {i for i in imports_of(p) if i in modules and i != m} for m, p in modules.items()}
    # A package's __init__ re-exporting its files is not an edge back up: its files never import it.
    graph["lmtune.data"] = set()
    seen: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        if seen.get(m) == 1:
            raise AssertionError("import circle: " + " -> ".join([*path, m]))
        if seen.get(m) == 2:
            return
        seen[m] = 1
        for n in sorted(graph[m]):
            visit(n, [*path, m])
        seen[m] = 2

    for m in sorted(graph):
        visit(m, [])
    assert "lmtune.data.prepared" in graph and not any(i.startswith("lmtune.data") for i in graph["lmtune.model"])
    assert all(len(p.read_text().splitlines()) <= 400 for p in (LMTUNE / "data").glob("*.py"))


# --- data a tired person gives ----------------------------------------------------------------------


def test_identical_documents_are_named_not_the_block_size(cli, tiny_model, tmp_path):
    same = tmp_path / "same.txt"
    same.write_text("The same words each time.\n\n" * 40)
    r = cli(*args(tiny_model, tmp_path / "run", "--data", same, "--dry-run"))
    assert r.code == 1 and "the same text (40 copies)" in r.err and "--block-size" not in r.err


def test_a_malformed_jsonl_line_is_named_in_full(cli, tiny_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "a\x01b"}\n')
    r = cli(*args(tiny_model, tmp_path / "run", "--data", bad, "--dry-run"))
    assert r.code == 1 and "Traceback" not in r.err
    assert f"{bad} line 2, column 12: Invalid control character; expected one JSON object per line" in r.err


def test_a_foreign_jsonl_in_a_data_folder_is_named(cli, tiny_model, tmp_path):
    folder = tmp_path / "d"
    folder.mkdir()
    write_jsonl(folder / "chat.jsonl", chat_rows(20, 1))
    write_jsonl(folder / "notes.jsonl", [{"text": "a note"}])
    r = cli(*args(tiny_model, tmp_path / "run", "--data", folder, "--dry-run"))
    assert r.code == 1 and "Couldn't cast" not in r.err
    assert "chat.jsonl has columns prompt, response but" in r.err and "notes.jsonl has text" in r.err


def test_data_show_says_how_many_conversations_had_no_response(cli, tiny_model, tmp_path):
    rows = chat_rows(20, 1)
    rows[3]["response"] = rows[9]["response"] = ""
    path = write_jsonl(tmp_path / "chat.jsonl", rows)
    r = cli("data", "show", path, "--model", tiny_model, "--block-size", "64", "-n", "1")
    assert r.code == 0, r.err
    assert "2 without a response skipped" in " ".join(r.out.split())
    assert "data plan: a file; validation: 5% of the documents" in " ".join(r.out.split())


@pytest.mark.slow
def test_resume_refuses_a_changed_data_plan(cli, tiny_model, folder, tmp_path, monkeypatch):
    """A folder that gained a validation file since the stop: resuming would train on other data."""
    from conftest import kill_self_on_call

    from lmtune import train

    (folder / "valid.txt").rename(tmp_path / "valid.txt")
    out = tmp_path / "run"
    run = args(tiny_model, out, "--data", folder, "--max-steps", "6", "--eval-every", "0", "--save-every", "2")
    kill_self_on_call(monkeypatch, train, "forward_backward", 4)
    assert cli(*run).code == 130
    monkeypatch.undo()
    (tmp_path / "valid.txt").rename(folder / "valid.txt")
    r = cli(*run, "--resume")
    assert r.code == 1 and "data plan" in r.err and "validation 'held_out' -> 'split'" in r.err, r.err
