"""--streaming: a dataset read as a stream and tokenized as training takes it; resumed where it stopped."""

import itertools
import json
import random

import numpy as np
import pytest
from conftest import kill_self_on_call, read_json, sentences

from lmtune import batches, data
from lmtune.config import Config
from lmtune.data import plan as data_plan
from lmtune.data import streaming
from lmtune.model import load_tokenizer


@pytest.fixture
def stream_file(tmp_path):
    """A JSON Lines dataset, read by the datasets library in streaming mode as a hub dataset would be."""
    r = random.Random(3)
    rows = [{"text": " ".join(sentences(r.randint(1, 4), i)), "id": i} for i in range(600)]
    rows[7]["text"] = ""  # empty documents are skipped, as in prepared data
    path = tmp_path / "stream.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_streamed_blocks_are_the_blocks_of_the_prepared_data(tiny_model, stream_file):
    tok = load_tokenizer(str(tiny_model))
    cfg = Config(data=str(stream_file), streaming=True, max_steps=10)
    plan = data_plan.decide(cfg)
    prepared, _ = batches.pack(
        data.load_corpus(cfg.model_copy(update={"streaming": False}), tok, lambda e: None).train.ids, 32
    )
    # The stream is read again when it ends: its first pass is the prepared blocks, then they start over.
    streamed = streaming.StreamedBlocks(plan, tok, 32, rows=10**6)
    blocks = [ids.numpy() for ids, _, _ in itertools.islice(streamed, 2 * len(prepared))]
    assert len(prepared) > 100 and np.array_equal(np.stack(blocks), np.concatenate([prepared, prepared]))
    # Validation: the held-out documents of the same hash split, the first of the stream.
    validation = streaming.validation_corpora(plan, tok, lambda e: None)[0].validation
    whole = data.load_corpus(cfg.model_copy(update={"streaming": False}), tok, lambda e: None)
    assert np.array_equal(validation.ids, whole.validation.ids)


def test_streaming_needs_max_steps(cli, tiny_model, stream_file):
    r = cli("finetune", tiny_model, "--data", stream_file, "--streaming", "--dry-run")
    assert r.code == 1 and "--streaming needs --max-steps" in r.err and "Traceback" not in r.err


def run_args(tiny_model, stream_file, out):
    return (
        "finetune", tiny_model, "--data", stream_file, "--streaming", "--output", out, "--block-size", "32",
        "--batch-size", "2", "--max-steps", "8", "--log-every", "1", "--eval-every", "0", "--mixed-precision", "no",
    )  # fmt: skip


def losses(out):
    return [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").open()) if e["event"] == "train"]


@pytest.mark.slow
def test_a_streamed_run_stopped_midway_resumes_where_it_stopped(cli, tiny_model, stream_file, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert cli(*run_args(tiny_model, stream_file, whole)).code == 0

    from lmtune import train

    real = train.forward_backward
    kill_self_on_call(monkeypatch, train, "forward_backward", 4)  # Ctrl-C at step 4
    stopped = tmp_path / "stopped"
    r = cli(*run_args(tiny_model, stream_file, stopped))
    assert r.code == 130 and "stopped by SIGINT after step 4" in r.err, r.err
    monkeypatch.setattr(train, "forward_backward", real)
    r = cli(*run_args(tiny_model, stream_file, stopped), "--resume")
    assert r.code == 0, r.err
    # The same blocks in the same order after the stop: the same losses, step by step, and the same model.
    assert losses(stopped) == pytest.approx(losses(whole), rel=1e-6) and len(losses(whole)) == 8
    assert read_json(stopped / "summary.json")["eval_loss"] == pytest.approx(
        read_json(whole / "summary.json")["eval_loss"]
    )
