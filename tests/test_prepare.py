"""Preparing data of any size: bounded memory, the hash split, `lmtune prepare` and --data DIR, interruptions."""

import errno
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import WORDS, kill_self_on_call, sentences

from lmtune import data
from lmtune.config import Config
from lmtune.data import sources, streams, tokens, types
from lmtune.errors import LmtuneError
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
                monkeypatch.setattr(sources, "READ_CHARS", piece)
                read = [d for docs, _ in data.txt_documents(path, mode) for d in docs]
                assert read == whole, (mode, piece, ending)


def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_CHARS", 10)
    path = tmp_path / "d.txt"
    path.write_bytes("é".encode() * 100 + b"\xff" + b"more")
    with pytest.raises(LmtuneError, match=r"d\.txt is not UTF-8 text \(invalid start byte at byte 200\)"):
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
    monkeypatch.setattr(types, "GROUP_CHARS", group_chars)
    monkeypatch.setattr(sources, "READ_CHARS", max(7, group_chars // 3))
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
    monkeypatch.setattr(tokens, "MAX_PIECE_CHARS", 500)
    monkeypatch.setattr(tokens, "BATCH_CHARS", 2000)
    streams = []
    for group_chars, workers in [(10**9, 1), (300, 2), (3000, 3)]:
        monkeypatch.setattr(types, "GROUP_CHARS", group_chars)
        monkeypatch.setattr(sources, "READ_CHARS", group_chars // 2)
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

    from lmtune.data import sources, types

    types.GROUP_CHARS = sources.READ_CHARS = 200_000  # small groups: the bound shows on a small corpus
    tokenizer = load_tokenizer(sys.argv[1])
    corpus = data.load_corpus(Config(data=sys.argv[2]), tokenizer, lambda e: None)
    print(len(corpus.train.ids), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """
)


def peak_rss_preparing(tiny_model, path, home):
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(tiny_model), str(path)],
        capture_output=True, text=True, check=True, env={**os.environ, "LMTUNE_HOME": str(home)},
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


def prepared_counts(out):
    return json.loads((out / "meta.json").read_text())


def test_prepare_then_finetune_from_the_folder_without_the_text(cli, tiny_model, corpus, tmp_path, lmtune_home):
    text = tmp_path / "text.txt"
    shutil.copy(corpus / "train.txt", text)
    out = tmp_path / "prepared"
    r = cli("prepare", text, "--model", tiny_model, "--output", out, "--validation-percent", "10")
    assert r.code == 0, r.err
    meta = prepared_counts(out)
    said = " ".join(r.out.split())
    assert (
        f"prepared {out}: {meta['train']['documents']:,} training documents, {meta['train']['tokens']:,} tokens" in said
    )
    assert f"train on it: lmtune finetune {tiny_model} --data {out}" in said
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    # The same tokens as the cache of a run on the text holds.
    tok = load_tokenizer(str(tiny_model))
    from_text = data.load_corpus(Config(data=str(text), validation_percent=10), tok, lambda e: None)
    from_folder = data.load_corpus(Config(data=str(out)), tok, lambda e: None)
    assert np.array_equal(from_text.train.ids, from_folder.train.ids)
    assert np.array_equal(from_text.validation.ids, from_folder.validation.ids)

    # Prepared once: asked again, it is kept, not tokenized again.
    again = cli("prepare", text, "--model", tiny_model, "--output", out, "--validation-percent", "10")
    assert again.code == 0 and "already prepared (same data, settings and tokenizer)" in again.out, again.err

    # Training reads the folder, never the text, and tokenizes nothing.
    text.unlink()
    shutil.rmtree(lmtune_home / "tokens")
    run = tmp_path / "run"
    r = cli("finetune", tiny_model, "--data", out, "--output", run, "--block-size", "32", "--max-steps", "2")
    assert r.code == 0, r.err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["documents"] == meta["train"]["documents"]
    assert summary["validation_tokens"] == meta["validation"]["tokens"]
    assert not (lmtune_home / "tokens").exists()
    # A new model takes the tokenizer the folder was prepared with.
    r = cli("finetune", "--from-scratch", "--tokenizer", out / "tokenizer", "--data", out, "--n-layer", "1",
            "--n-head", "2", "--n-embd", "16", "--n-positions", "32", "--dry-run")  # fmt: skip
    assert r.code == 0, r.err


def test_prepared_data_of_another_tokenizer_is_one_clear_error(cli, tiny_model, corpus, tmp_path):
    from conftest import make_tiny_model

    out = tmp_path / "prepared"
    assert cli("prepare", corpus / "train.txt", "--model", tiny_model, "--output", out).code == 0
    other = tmp_path / "other"
    make_tiny_model(other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    tokenizer["model"]["merges"] = tokenizer["model"]["merges"][:-5]  # another tokenizer: fewer merges
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    r = cli("finetune", other, "--data", out, "--dry-run")
    assert r.code == 1 and "Traceback" not in r.err
    [line] = r.err.strip().splitlines()
    assert line == (
        f"error: {out} holds tokens of another tokenizer than this run's ({other}); train with the one it was "
        f"made with (--tokenizer {out / 'tokenizer'}), or prepare the data for this one: lmtune prepare "
        f"{corpus / 'train.txt'} --tokenizer {other}"
    )
    # And the other mistakes around a prepared folder, each one line.
    for args, message in [
        (("finetune", tiny_model, "--data", out, "--validation-data", corpus / "valid.txt", "--dry-run"),
         "holds tokens prepared with their validation split; pass --validation-data to lmtune prepare"),
        (("prepare", corpus / "train.txt"), "pass --model M or --tokenizer T"),
        (("prepare", corpus / "valid.txt", "--model", tiny_model, "--output", out), "pass --overwrite to replace it"),
        (("prepare", corpus / "train.txt", "--model", tiny_model, "--output", corpus), "holds the data"),
        (("prepare", corpus / "train.txt", "--model", tiny_model, "--output", tiny_model), "is not prepared data"),
    ]:  # fmt: skip
        r = cli(*args)
        assert r.code == 1 and message in " ".join(r.err.split()) and "Traceback" not in r.err, r.err


def leftovers(folder):
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


def test_ctrl_c_while_preparing_leaves_nothing_and_the_next_run_starts_over(
    cli, tiny_model, corpus, tmp_path, monkeypatch
):
    monkeypatch.setattr(types, "GROUP_CHARS", 2000)  # several groups: stopped between two of them
    real = streams.encode
    kill_self_on_call(monkeypatch, streams, "encode", 3)  # Ctrl-C on the third group
    out = tmp_path / "prepared"
    r = cli("prepare", corpus / "train.txt", "--model", tiny_model, "--output", out)
    assert r.code == 130 and "interrupted" in r.err, r.err
    assert not out.exists() and not leftovers(tmp_path)
    monkeypatch.setattr(streams, "encode", real)
    r = cli("prepare", corpus / "train.txt", "--model", tiny_model, "--output", out)
    assert r.code == 0 and "prepared" in r.out and not leftovers(tmp_path), r.err


def test_a_full_disk_while_preparing_is_one_line_and_leaves_nothing(
    cli, tiny_model, corpus, tmp_path, lmtune_home, monkeypatch
):
    monkeypatch.setattr(types, "GROUP_CHARS", 2000)
    real, calls = streams.Stream.add, []

    def full_disk(self, split):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, split)

    monkeypatch.setattr(streams.Stream, "add", full_disk)
    out = tmp_path / "prepared"
    r = cli("prepare", corpus / "train.txt", "--model", tiny_model, "--output", out)
    assert r.code == 1 and "Traceback" not in r.err
    assert f"could not write the tokens of {corpus / 'train.txt'} in {out}: No space left on device; nothing " \
        "partial was left" in " ".join(r.err.split())  # fmt: skip
    assert not out.exists() and not leftovers(tmp_path)
    # The token cache of a run likewise: no entry, nothing half-written, and the next run prepares it whole.
    calls.clear()
    r = cli("finetune", tiny_model, "--data", corpus / "train.txt", "--block-size", "32", "--dry-run")
    assert r.code == 1 and "No space left on device" in r.err
    assert not list((lmtune_home / "tokens").iterdir())
    monkeypatch.setattr(streams.Stream, "add", real)
    r = cli("finetune", tiny_model, "--data", corpus / "train.txt", "--block-size", "32", "--dry-run")
    assert r.code == 0, r.err


@pytest.mark.slow
def test_a_preparation_killed_outright_is_started_over(tiny_model, tmp_path):
    """kill -9 leaves its .tmp folder (nothing can clean up after it); the next run removes it and starts over."""
    big = tmp_path / "big.txt"
    r = random.Random(0)
    paragraphs = [" ".join(sentences(r.randint(1, 4), i)) for i in range(2000)]
    big.write_text("\n\n".join(r.choice(paragraphs) for _ in range(60_000)))
    out = tmp_path / "prepared"
    cmd = [sys.executable, "-m", "lmtune", "prepare", str(big), "--model", str(tiny_model), "--output", str(out)]
    env = {**os.environ, "LMTUNE_HOME": str(tmp_path / "home")}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = tmp_path / ".prepared.tmp" / "train.npy"
    deadline = time.monotonic() + 120
    while not (partial.is_file() and partial.stat().st_size > streams.HEADER) and time.monotonic() < deadline:
        time.sleep(0.02)
    first.kill()
    first.wait()
    assert partial.is_file() and not out.exists()  # killed halfway: only the .tmp folder, never `out`
    second = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert second.returncode == 0, second.stderr
    assert out.is_dir() and not leftovers(tmp_path)
    tok = load_tokenizer(str(tiny_model))
    corpus = data.load_corpus(Config(data=str(out)), tok, lambda e: None)
    assert corpus.train.documents + corpus.validation.documents == 60_000


@pytest.mark.slow
def test_the_data_benchmark_parts_run(tiny_model, corpus, tmp_path):
    """bench/data.py's two measurements, on the tiny model, so they cannot rot between `make bench-data` runs."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "data.py"
    env = {**os.environ, "LMTUNE_HOME": str(tmp_path / "home")}

    def run_json(*args):
        done = subprocess.run([sys.executable, bench, *map(str, args)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    lmtune = run_json("prepare-one", corpus / "train.txt", tiny_model, tmp_path / "prepared", "--workers", 2)
    assert lmtune["tokens"] > 0 and lmtune["peak_rss_mb"] > 0 and lmtune["worker_peak_rss_mb"] > 0
    hf = run_json("datasets-map", corpus / "train.txt", tiny_model, "--workers", 2)
    assert hf["tokens"] > 0 and hf["tokens"] % 128 == 0


STUCK_WORKER = """
import os, sys, threading
from lmtune import data
from lmtune.model import load_tokenizer
from lmtune.stop import StopSignals

held = threading.Lock()
held.acquire()
# A lock another thread of the parent held at the fork: the worker waits for it before its initializer runs.
os.register_at_fork(after_in_child=held.acquire)
with StopSignals():  # as during a run: SIGTERM has a Python handler
    with data.tokenizer_pool(load_tokenizer(sys.argv[1]), 2):
        pass  # leaving the pool terminates its workers
print("pool closed")
"""


@pytest.mark.slow
def test_a_worker_stuck_before_its_initializer_still_ends_with_the_pool(tiny_model):
    """The pool ends its workers with SIGTERM. A worker stuck at the fork, before its initializer gave SIGTERM
    back its default action, would otherwise keep the parent's Python handler, which never runs there: the
    pool's end, and lmtune with it, would wait forever (seen once in the suite, a worker forked while other
    threads of the process held a lock)."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", STUCK_WORKER, str(tiny_model)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "pool closed" in r.stdout, r.stderr[-2000:]
