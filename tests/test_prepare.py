"""Preparing data of any size: bounded memory, the hash split, `lmtune prepare` and --data DIR, interruptions."""

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import WORDS, sentences

from lmtune import data
from lmtune.config import Config
from lmtune.model import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model):
    return load_tokenizer(str(tiny_model))


def documents(split, tok):
    """The documents of a text stream, decoded, in order."""
    ids = np.asarray(split.ids).tolist()
    out, start = [], 0
    for i, t in enumerate(ids):
        if t == tok.eos_token_id:
            out.append(tok.decode(ids[start:i]))
            start = i + 1
    return out


def test_txt_files_are_read_a_piece_at_a_time_into_the_documents_of_the_whole_text(tmp_path, monkeypatch):
    r = random.Random(0)
    # Every kind of boundary: blank lines with spaces and tabs, runs of them, CRLF, form feeds, a text that ends
    # in a boundary and one that does not.
    gaps = [" ", "\n", "\n\n", "\n \n", "\n\t \n", "\n\n\n", "\r\n\r\n", "\r\n", "\x0c", " \n  \n ", "\u2028"]
    text = "".join(r.choice(WORDS) + r.choice(gaps) for _ in range(3000))
    for ending in ("", "\n\n", "\n"):
        path = tmp_path / "d.txt"
        path.write_bytes((text + ending).encode())
        for mode in ("paragraph", "line", "file"):
            whole = data.split_txt(path.read_text(), mode)
            for piece in (1, 2, 3, 7, 64, 1000):
                monkeypatch.setattr(data, "READ_CHARS", piece)
                read = [d for docs, _ in data.txt_documents(path, mode) for d in docs]
                assert read == whole, (mode, piece, ending)


def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "READ_CHARS", 10)
    path = tmp_path / "d.txt"
    path.write_bytes("é".encode() * 100 + b"\xff" + b"more")
    with pytest.raises(data.LmtuneError, match=r"d\.txt is not UTF-8 text \(invalid start byte at byte 200\)"):
        data.read_documents(str(path), Config())


def write_corpus(folder, files=3, docs=40, seed=0):
    folder.mkdir()
    r = random.Random(seed)
    for f in range(files):
        paragraphs = [" ".join(sentences(r.randint(1, 4), seed * 10_000 + f * 1000 + i)) for i in range(docs)]
        (folder / f"part-{f}.txt").write_text("\n\n".join(paragraphs) + "\n")
    return folder


@pytest.mark.parametrize("group_chars, workers", [(50, 1), (400, 2), (10**9, 3), (1500, 1)])
def test_the_held_out_documents_do_not_depend_on_chunks_workers_or_file_order(
    tok, tmp_path, lmtune_home, monkeypatch, group_chars, workers
):
    folder = write_corpus(tmp_path / "corpus")
    everything = [d for f in sorted(folder.iterdir()) for d in data.split_txt(f.read_text(), "paragraph")]
    kept = [d for d in everything if d.strip()]
    expected = sorted(d.strip() for d, held in zip(kept, data.held_out(kept, 20), strict=True) if held)
    monkeypatch.setattr(data, "GROUP_CHARS", group_chars)
    monkeypatch.setattr(data, "READ_CHARS", max(7, group_chars // 3))
    corpus = data.load_corpus(Config(data=str(folder), validation_percent=20), tok, lambda e: None, workers=workers)
    held_out = sorted(d.strip() for d in documents(corpus.validation, tok))
    assert held_out == expected and 8 <= len(held_out) <= 40
    assert corpus.train.documents + corpus.validation.documents == len(kept)

    # The same files in another order (renamed): the same documents held out.
    for i, f in enumerate(sorted(folder.iterdir(), reverse=True)):
        f.rename(folder / f"other-{i}.txt")
    again = data.load_corpus(Config(data=str(folder), validation_percent=20), tok, lambda e: None, workers=workers)
    assert not again.cached and sorted(d.strip() for d in documents(again.validation, tok)) == expected


def test_streams_are_the_same_whatever_the_chunks_and_workers(tok, tmp_path, lmtune_home, monkeypatch):
    folder = write_corpus(tmp_path / "corpus", files=2, docs=60)
    # A long document goes in pieces, across groups: still one document with one EOS.
    (folder / "part-9.txt").write_text(" ".join(sentences(400, 9)))
    monkeypatch.setattr(data, "MAX_PIECE_CHARS", 500)
    monkeypatch.setattr(data, "BATCH_CHARS", 2000)
    streams = []
    for group_chars, workers in [(10**9, 1), (300, 2), (3000, 3)]:
        monkeypatch.setattr(data, "GROUP_CHARS", group_chars)
        monkeypatch.setattr(data, "READ_CHARS", group_chars // 2)
        home = tmp_path / f"home-{group_chars}"
        monkeypatch.setenv("LMTUNE_HOME", str(home))
        corpus = data.load_corpus(Config(data=str(folder)), tok, lambda e: None, workers=workers)
        streams.append((np.array(corpus.train.ids), np.array(corpus.validation.ids)))
    for train, validation in streams[1:]:
        assert np.array_equal(train, streams[0][0]) and np.array_equal(validation, streams[0][1])
    whole = [d for f in sorted(folder.iterdir()) for d in data.split_txt(f.read_text(), "paragraph") if d.strip()]
    ids = [tok(d, add_special_tokens=False)["input_ids"] for d in whole]
    assert len(streams[0][0]) + len(streams[0][1]) == sum(len(x) + 1 for x in ids)


def test_little_data_still_holds_out_a_document(tok, tmp_path):
    # Three documents at 1%: no hash falls under the threshold, so the one with the lowest is held out.
    docs = ["the cat sat", "the dog ran", "a bird sang"]
    (tmp_path / "d.txt").write_text("\n\n".join(docs))
    corpus = data.load_corpus(Config(data=str(tmp_path / "d.txt"), validation_percent=1), tok, lambda e: None)
    [held] = [d for d, h in zip(docs, data.held_out(docs, 1), strict=True) if h]
    assert documents(corpus.validation, tok) == [held] and corpus.train.documents == 2


PEAK = textwrap.dedent(
    """
    import resource, sys
    from lmtune import data
    from lmtune.config import Config
    from lmtune.model import load_tokenizer

    data.GROUP_CHARS = data.READ_CHARS = 200_000  # small groups: the bound shows on a small corpus
    tokenizer = load_tokenizer(sys.argv[1])
    corpus = data.load_corpus(Config(data=sys.argv[2]), tokenizer, lambda e: None)
    print(len(corpus.train.ids), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """
)


def peak_rss_preparing(tiny_model, path, home):
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(tiny_model), str(path)],
        capture_output=True, text=True, check=True, env={**__import__("os").environ, "LMTUNE_HOME": str(home)},
    )  # fmt: skip
    tokens, peak = map(int, out.stdout.split())
    return tokens, peak


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_data(tiny_model, tmp_path):
    """Preparing 6x the text takes the same memory: the text and its tokens are never held whole."""
    r = random.Random(0)
    paragraphs = [" ".join(sentences(r.randint(1, 4), i)) for i in range(2000)]
    small, large = tmp_path / "small.txt", tmp_path / "large.txt"
    with small.open("w") as f:
        while f.tell() < 4_000_000:
            f.write("\n\n".join(r.sample(paragraphs, 200)) + "\n\n")
    with large.open("w") as f:
        while f.tell() < 24_000_000:
            f.write("\n\n".join(r.sample(paragraphs, 200)) + "\n\n")
    small_tokens, small_peak = peak_rss_preparing(tiny_model, small, tmp_path / "home-small")
    large_tokens, large_peak = peak_rss_preparing(tiny_model, large, tmp_path / "home-large")
    assert large_tokens > 5 * small_tokens
    # Measured: 420 MB for both (before streaming: 420 and 466 MB, the text, its documents and ids held whole).
    assert large_peak - small_peak < 15_000_000, (small_peak, large_peak)
