"""Reading, splitting, tokenizing, caching and packing data."""

import dataclasses
import json
import logging
import random
import shutil

import numpy as np
import pytest
from conftest import WORDS

from lmtune import batches, data
from lmtune.config import Config
from lmtune.data import sources, tokens
from lmtune.errors import LmtuneError
from lmtune.model import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def cfg(**kw):
    return Config(**kw)


def test_packing_keeps_every_token_and_counts_the_rest():
    ids = np.arange(103)
    blocks, dropped = batches.pack(ids, 10)
    assert blocks.shape == (10, 10) and dropped == 3
    assert np.array_equal(np.concatenate([blocks.ravel(), ids[len(ids) - dropped :]]), ids)


def test_documents_joined_with_eos(tok):
    docs = ["a cat", "the dog"]
    tokens = data.tokenize(docs, tok, lambda e: None, "x")
    stream = data.join(tokens, tok.eos_token_id, np.int32)
    expected = tok("a cat")["input_ids"] + [tok.eos_token_id] + tok("the dog")["input_ids"] + [tok.eos_token_id]
    assert stream.tolist() == expected
    assert tok.decode(stream.tolist()) == "a cat<|endoftext|>the dog<|endoftext|>"


def test_txt_paragraphs_split_at_blank_lines_even_with_spaces():
    text = " = Title = \n \n First para line one\nline two\n\n\nSecond para \n"
    assert data.split_txt(text, "paragraph") == [" = Title = ", " First para line one\nline two", "\nSecond para \n"]
    assert len(data.split_txt(text, "line")) == 7
    assert data.split_txt(text, "file") == [text]


def test_tabular_files_and_text_column(tmp_path):
    rows = [{"body": "first doc", "n": 1}, {"body": "second doc", "n": 2}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert data.read_documents(str(tmp_path / "d.jsonl"), cfg(text_column="body")) == {
        "train": ["first doc", "second doc"]
    }
    with pytest.raises(LmtuneError, match="no column `text`; it has body, n"):
        data.read_documents(str(tmp_path / "d.jsonl"), cfg())
    with pytest.raises(LmtuneError, match="not text"):
        data.read_documents(str(tmp_path / "d.jsonl"), cfg(text_column="n"))
    (tmp_path / "d.csv").write_text("text,label\nhello there,1\ngeneral kenobi,0\n")
    assert data.read_documents(str(tmp_path / "d.csv"), cfg())["train"] == ["hello there", "general kenobi"]


def test_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "shards"
    folder.mkdir()
    pq.write_table(pa.table({"text": ["one", "two"]}), folder / "a.parquet")
    pq.write_table(pa.table({"text": ["three"]}), folder / "b.parquet")
    assert sorted(data.read_documents(str(folder), cfg())["train"]) == ["one", "three", "two"]
    (folder / "c.txt").write_text("mixed")
    with pytest.raises(LmtuneError, match="mixes file types"):
        data.read_documents(str(folder), cfg())


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(LmtuneError, match=r"no such file: nope\.txt"):
        data.read_documents("nope.txt", cfg())
    (tmp_path / "empty").mkdir()
    with pytest.raises(LmtuneError, match=r"holds no \.txt"):
        data.read_documents(str(tmp_path / "empty"), cfg())


def test_held_out_split_is_deterministic_disjoint_and_complete(tok, tmp_path, lmtune_home):
    docs = [f"document number {i} about the cat" for i in range(40)]
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    c = cfg(data=str(tmp_path / "d.txt"), validation_percent=10)
    a = data.load_corpus(c, tok, lambda e: None)
    shutil.rmtree(lmtune_home / "tokens")
    b = data.load_corpus(c, tok, lambda e: None)
    assert not b.cached
    assert np.array_equal(a.validation.ids, b.validation.ids) and np.array_equal(a.train.ids, b.train.ids)
    # Held out by a hash of each document: about 10% of them.
    held = data.held_out(docs, 10)
    assert (a.train.documents, a.validation.documents) == (40 - sum(held), sum(held)) and 1 <= sum(held) <= 8
    # Every document lands in exactly one split: the streams together hold every token once.
    total = sum(len(tok(d)["input_ids"]) + 1 for d in docs)
    assert len(a.train.ids) + len(a.validation.ids) == total
    assert a.train.bytes + a.validation.bytes == sum(len(d.encode()) for d in docs)


def test_single_document_holds_out_its_tail(tok, tmp_path):
    (tmp_path / "one.txt").write_text("the cat sat on the mat " * 50)
    c = cfg(data=str(tmp_path / "one.txt"), txt_documents="file", validation_percent=10)
    corpus = data.load_corpus(c, tok, lambda e: None)
    assert 0 < len(corpus.validation.ids) < len(corpus.train.ids)
    assert "last 10% of the tokens" in corpus.validation_source


def test_cache_hit_and_invalidation(tok, tmp_path):
    path = tmp_path / "d.txt"
    path.write_text("\n\n".join(f"doc {i} the dog ran" for i in range(30)))
    c = cfg(data=str(path))
    first = data.load_corpus(c, tok, lambda e: None)
    events = []
    second = data.load_corpus(c, tok, events.append)
    assert not first.cached and second.cached and not events  # nothing tokenized the second time
    assert np.array_equal(first.train.ids, second.train.ids)
    path.write_text("\n\n".join(f"doc {i} the cat sat" for i in range(30)))
    third = data.load_corpus(c, tok, lambda e: None)
    assert not third.cached and not np.array_equal(third.train.ids, first.train.ids)
    # A setting that changes the split is part of the key too.
    assert not data.load_corpus(cfg(data=str(path), validation_percent=20), tok, lambda e: None).cached


def test_empty_documents_are_counted_not_hidden(tok, tmp_path):
    (tmp_path / "d.jsonl").write_text(
        '{"text": "a dog"}\n{"text": ""}\n{"text": "  "}\n{"text": "a cat"}\n{"text": "the mat"}\n'
    )
    corpus = data.load_corpus(cfg(data=str(tmp_path / "d.jsonl"), validation_percent=30), tok, lambda e: None)
    assert corpus.empty_documents == 2
    assert corpus.train.documents + corpus.validation.documents == 3


def test_a_folder_with_split_named_files_keeps_its_splits(tok, tmp_path):
    folder = tmp_path / "wiki"
    folder.mkdir()
    (folder / "train.txt").write_text("the cat sat\n\nthe dog ran\n\na bird sang")
    (folder / "valid.txt").write_text("a red tree\n\nthe blue mat")
    (folder / "test.txt").write_text("the small hill")
    splits = data.read_documents(str(folder), cfg())
    assert splits == {
        "test": ["the small hill"],
        "train": ["the cat sat", "the dog ran", "a bird sang"],
        "validation": ["a red tree", "the blue mat"],
    }
    corpus = data.load_corpus(cfg(data=str(folder)), tok, lambda e: None)
    assert corpus.train.documents == 3 and corpus.validation.documents == 2  # validation never trained on
    assert "`validation` split" in corpus.validation_source
    (folder / "train.txt").unlink()
    with pytest.raises(LmtuneError, match="training needs a `train` split"):
        data.load_corpus(cfg(data=str(folder)), tok, lambda e: None)
    # Evaluating such a folder scores its validation split.
    assert data.eval_documents(str(folder), cfg()) == ["a red tree", "the blue mat"]


def test_hub_datasets_use_their_splits_and_columns(tok, monkeypatch):
    """The hub path, with the download replaced by an in-memory DatasetDict (no network here)."""
    import datasets

    fake = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": ["the cat sat", "", "the dog ran"]}),
            "validation": datasets.Dataset.from_dict({"text": ["a red tree"]}),
            "test": datasets.Dataset.from_dict({"text": ["the small hill"]}),
        }
    )
    asked = []
    monkeypatch.setattr(sources, "_hub_dataset", lambda name, config: asked.append((name, config)) or fake)
    corpus = data.load_corpus(cfg(data="wikitext"), tok, lambda e: None)
    assert asked[0] == ("Salesforce/wikitext", "wikitext-2-raw-v1")  # the alias
    assert corpus.train.documents == 2 and corpus.empty_documents == 1
    assert corpus.validation.documents == 1 and "`validation` split of wikitext" in corpus.validation_source
    data.read_documents("someone/corpus:small", cfg())
    assert asked[-1] == ("someone/corpus", "small")
    with pytest.raises(LmtuneError, match="no column `body`"):
        data.read_documents("someone/corpus", cfg(text_column="body"))


def test_offline_hub_dataset_is_one_clear_error():
    sources._hub_dataset.cache_clear()
    with pytest.raises(LmtuneError, match="cannot load hub dataset `nobody/nothing`"):
        data.read_documents("nobody/nothing", cfg())


def test_malformed_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": broken}\n')
    with pytest.raises(
        LmtuneError, match=r"d\.jsonl line 4, column 10: Expecting value; expected one JSON object per line"
    ):
        data.read_documents(str(path), cfg())


def in_memory(split):
    return dataclasses.replace(split, **{k: np.array(v) for k, v in vars(split).items() if isinstance(v, np.ndarray)})


def damage(path, how):
    """Damage a cache file the ways a disk or a killed copy does."""
    good = path.read_bytes()
    if how == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif how == "shuffled":  # same size, every byte still a plausible token: only a checksum can tell
        head, body = good[:128], np.frombuffer(good[128:], dtype=np.uint8)
        path.write_bytes(head + np.random.default_rng(0).permutation(body).tobytes())
    elif how == "garbage":
        path.write_bytes(b"\x00 not what was written " * 3)
    elif how == "missing":
        path.unlink()


@pytest.mark.parametrize(
    "kind, file, how",
    [
        ("text", "train.npy", "truncated"),
        ("text", "train.npy", "shuffled"),
        ("text", "validation.npy", "missing"),
        ("text", "meta.json", "garbage"),
        ("chat", "train.mask.npy", "shuffled"),
        ("chat", "validation.starts.npy", "truncated"),
    ],
)
def test_a_damaged_cache_entry_is_rebuilt_with_one_warning(tiny_model, tmp_path, lmtune_home, caplog, kind, file, how):
    def load():  # a fresh tokenizer each time, as each run has: chat data gives it a template
        return data.load_corpus(c, load_tokenizer(str(tiny_model)), lambda e: None)

    if kind == "text":
        path = tmp_path / "d.txt"
        path.write_text("\n\n".join(f"doc {i} the dog ran over the big red hill" for i in range(60)))
    else:
        path = tmp_path / "d.jsonl"
        rows = [{"prompt": f"the dog {i}", "response": f"ran over the hill {i} times"} for i in range(60)]
        path.write_text("\n".join(json.dumps(r) for r in rows))
    c = cfg(data=str(path))
    first = load()
    first.train, first.validation = (
        in_memory(first.train),
        in_memory(first.validation),
    )  # they map the files damaged below
    [entry] = (lmtune_home / "tokens").iterdir()
    damage(entry / file, how)
    with caplog.at_level(logging.INFO, logger="lmtune"):
        again = load()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith(f"token cache entry {entry} is damaged ({file}: ")
    assert warnings[0].endswith("); rebuilding it")
    assert not again.cached and np.array_equal(again.train.ids, first.train.ids)
    assert np.array_equal(again.validation.ids, first.validation.ids)
    # The rebuilt entry is whole again: the next run reads it without a word.
    caplog.clear()
    third = load()
    assert third.cached and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert np.array_equal(third.train.ids, first.train.ids)
    if kind == "chat":
        assert np.array_equal(third.train.mask, first.train.mask)
        assert np.array_equal(third.validation.starts, first.validation.starts)


def test_hidden_files_and_folders_are_not_data(tmp_path):
    folder = tmp_path / ".cache" / "data"  # the folder given may itself lie in a hidden one
    (folder / ".ipynb_checkpoints").mkdir(parents=True)
    (folder / "train.txt").write_text("the cat sat\n\nthe dog ran")
    (folder / ".ipynb_checkpoints" / "train-checkpoint.txt").write_text("the cat sat\n\nthe dog ran")
    (folder / ".notes.txt").write_text("a note to self")
    (folder / "__MACOSX").mkdir()  # what unzipping a macOS archive leaves
    (folder / "__MACOSX" / "train.txt").write_text("resource fork")
    assert [p.name for p in data.local_files(str(folder))] == ["train.txt"]
    assert data.read_documents(str(folder), cfg()) == {"train": ["the cat sat", "the dog ran"]}
    assert data.local_files(str(folder / ".notes.txt")) == [folder / ".notes.txt"]  # asked for by name: read


def test_linked_folders_are_read_once_and_link_loops_end(tmp_path):
    folder, other = tmp_path / "data", tmp_path / "elsewhere"
    folder.mkdir()
    other.mkdir()
    (folder / "a.txt").write_text("the cat sat")
    (other / "b.txt").write_text("the dog ran")
    (folder / "more").symlink_to(other)
    (folder / "same").symlink_to(other)  # a second link to the same folder: read once
    (folder / "loop").symlink_to(folder)  # a link to a folder above: no endless walk
    files = data.local_files(str(folder))
    assert sorted(p.name for p in files) == ["a.txt", "b.txt"]
    assert sorted(data.read_documents(str(folder), cfg())["train"]) == ["the cat sat", "the dog ran"]


def overlap_warnings(caplog):
    return [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "validation doc" in r.getMessage()
    ]


def test_validation_documents_that_are_also_training_documents_are_flagged(tok, tmp_path, caplog):
    train = [f"document {i} where the dog ran over the big hill" for i in range(20)]
    (tmp_path / "train.txt").write_text("\n\n".join(train))
    # Three repeat training documents (one with other spaces at its ends), two are new.
    (tmp_path / "valid.txt").write_text(f"{train[3]}\n\n  {train[7]} \n\n{train[12]}\n\nthe cat sat\n\nthe red mat")
    c = cfg(data=str(tmp_path / "train.txt"), validation_data=str(tmp_path / "valid.txt"))
    with caplog.at_level(logging.INFO, logger="lmtune"):
        data.load_corpus(c, tok, lambda e: None)
    assert overlap_warnings(caplog) == [
        f"3 of the 5 validation documents also appear in the training data (--data {tmp_path / 'train.txt'}, "
        f"--validation-data {tmp_path / 'valid.txt'}); the evaluation overstates how well the model generalises"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmtune"):  # said again when the tokens come from the cache
        assert data.load_corpus(c, tok, lambda e: None).cached
    assert len(overlap_warnings(caplog)) == 1

    # The same file for both: every validation document.
    caplog.clear()
    same = cfg(data=str(tmp_path / "train.txt"), validation_data=str(tmp_path / "train.txt"))
    with caplog.at_level(logging.INFO, logger="lmtune"):
        data.load_corpus(same, tok, lambda e: None)
    assert [w.split(" (")[0] for w in overlap_warnings(caplog)] == [
        "20 of the 20 validation documents also appear in the training data"
    ]

    # Validation held out of data that holds documents twice, and a folder's validation split.
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.txt").write_text("\n\n".join(train))
    (folder / "train-copy.txt").write_text("\n\n".join(train))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lmtune"):
        copies = data.load_corpus(cfg(data=str(folder), validation_percent=25), tok, lambda e: None)
    # Every copy of a document falls on the same side of the hash split: held out together, never trained on.
    assert not overlap_warnings(caplog)
    assert copies.validation.documents % 2 == 0 and copies.validation.documents >= 2

    # Disjoint data: not a word.
    caplog.clear()
    (tmp_path / "other.txt").write_text("the cat sat\n\nthe red mat")
    with caplog.at_level(logging.INFO, logger="lmtune"):
        data.load_corpus(cfg(data=str(tmp_path / "train.txt"), validation_data=str(tmp_path / "other.txt")), tok, print)
    assert not [r for r in caplog.records if "validation doc" in r.getMessage()]


def test_short_repeated_lines_are_noted_not_warned(tok, tmp_path, caplog):
    """Headings such as WikiText's ' = = History = = ' repeat across articles: a note, not a warning."""
    body = [f"article {i} says a great deal about the river and the hill and the road " * 30 for i in range(30)]
    (tmp_path / "train.txt").write_text("\n\n".join(f" = = History = = \n\n{b}" for b in body[:20]))
    (tmp_path / "valid.txt").write_text("\n\n".join(f" = = History = = \n\n{b}" for b in body[20:]))
    c = cfg(data=str(tmp_path / "train.txt"), validation_data=str(tmp_path / "valid.txt"))
    with caplog.at_level(logging.INFO, logger="lmtune"):
        data.load_corpus(c, tok, lambda e: None)
    [note] = [r for r in caplog.records if "validation doc" in r.getMessage()]
    assert note.levelno == logging.INFO
    assert note.getMessage().startswith("10 of the 20 validation documents also appear in the training data")


def test_the_same_file_for_training_and_validation_is_flagged_in_a_real_run(cli, tiny_model, corpus, caplog):
    r = cli("finetune", tiny_model, "--data", corpus / "train.txt", "--validation-data", corpus / "train.txt",
            "--block-size", "32", "--dry-run")  # fmt: skip
    assert r.code == 0, r.err
    assert [w.split(" (")[0] for w in overlap_warnings(caplog)] == [
        "120 of the 120 validation documents also appear in the training data"
    ]


def test_a_long_document_is_tokenized_in_pieces_to_the_same_ids_with_progress(tok, monkeypatch):
    monkeypatch.setattr(tokens, "MAX_PIECE_CHARS", 300)
    monkeypatch.setattr(tokens, "BATCH_CHARS", 1000)
    r = random.Random(0)
    # Words with every kind of space between them: runs of spaces, newlines, tabs, a space before a newline.
    gaps = [" ", " ", " ", "  ", "\n", "\n\n", " \n", "\t", "   "]
    long = "".join(r.choice(WORDS) + r.choice(gaps) for _ in range(4000)) + "the end."  # ~20k characters
    docs = ["a short one", long, "", "another short one"]
    events = []
    ids = data.tokenize(docs, tok, events.append, "x")
    assert [x.tolist() for x in ids] == [tok(d, add_special_tokens=False)["input_ids"] for d in docs]
    done = [e["done"] for e in events]
    assert len(done) > 10 and done == sorted(done) and done[-1] == events[-1]["total"] > len(docs)
    # Text with no whitespace to cut at is cut mid-word: the tokens at each cut may differ, the text not.
    blob = "".join(r.choice(WORDS) for _ in range(500))
    [blob_ids] = data.tokenize([blob], tok, lambda e: None, "x")
    assert tok.decode(blob_ids.tolist()) == blob
    # Still one document followed by one EOS in the stream.
    stream = data.encode([long], tok, lambda e: None, "x").split([0], tok.eos_token_id, np.int32)
    assert stream.documents == 1 and stream.ids.tolist() == [*ids[1].tolist(), tok.eos_token_id]
