"""Perplexity checked against hand computations."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lmtune.data import Split
from lmtune.evaluate import score, windows
from lmtune.generate import load


@pytest.mark.parametrize("n, context, stride", [(100, 16, 16), (100, 16, 8), (100, 16, 5), (7, 16, 16), (33, 16, 1)])
def test_windows_score_each_token_at_most_once(n, context, stride):
    targets = [t for _, end, first in windows(n, context, stride) for t in range(first, end)]
    assert len(targets) == len(set(targets))
    if stride < context:
        assert sorted(targets) == list(range(1, n))  # every token but the first
    else:
        starts = {start for start, _, _ in windows(n, context, stride)}
        assert sorted(targets) == [t for t in range(n) if t not in starts]  # window openers have no context
    for start, end, first in windows(n, context, stride):
        assert end - start <= context and first > start


def test_uniform_model_has_perplexity_equal_to_vocabulary(tiny_model):
    """With zero embeddings every logit is 0: each token has probability 1/V, so perplexity is exactly V."""
    model, tok = load(str(tiny_model))
    with torch.no_grad():
        model.get_input_embeddings().weight.zero_()  # GPT-2 ties the output layer to these
    ids = np.array(tok("the cat sat on the mat in the morning rain " * 5)["input_ids"], dtype=np.int64)
    split = Split(ids, documents=1, bytes=240)
    s = score(model, split, block_size=16, stride=16, batch_size=3)
    vocab = model.config.vocab_size
    assert s.perplexity == pytest.approx(vocab, rel=1e-5)
    assert s.loss == pytest.approx(math.log(vocab), rel=1e-6)
    assert s.tokens == len(ids) - len(windows(len(ids), 16, 16))
    assert s.bits_per_byte == pytest.approx(math.log2(vocab) * len(ids) / 240, rel=1e-6)


def test_loss_is_token_weighted_mean_of_hand_computed_nll(tiny_model):
    """Score a stream whose last window is short; compare with log-softmax computed token by token."""
    model, tok = load(str(tiny_model))
    ids = np.array(tok("a big blue river ran under the small house " * 4)["input_ids"], dtype=np.int64)
    context, stride = 16, 12
    s = score(model, Split(ids, 1, 1), context, stride, batch_size=2)
    nll, count = 0.0, 0
    with torch.no_grad():
        for start, end, first in windows(len(ids), context, stride):
            logits = model(input_ids=torch.tensor(ids[start:end])[None]).logits[0].double()
            logp = torch.log_softmax(logits, dim=-1)
            for t in range(first, end):
                nll -= logp[t - start - 1, ids[t]].item()
                count += 1
    assert s.tokens == count == len(ids) - 1
    assert s.nll == pytest.approx(nll, rel=1e-5)
    assert s.perplexity == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.parametrize("where", ["a folder named like an image", "a folder no one may write in"])
def test_eval_chart_that_cannot_be_written_fails_before_evaluating(
    where, cli, tiny_model, corpus, tmp_path, monkeypatch
):
    from lmtune import evaluate

    if where == "a folder named like an image":
        chart, message = tmp_path / "ppl.png", "is a folder"
        chart.mkdir()
    else:
        chart, message = Path("/sys/ppl.png"), "cannot write in /sys"  # read-only even for root
        if not Path("/sys").is_dir():
            pytest.skip("no /sys")
    monkeypatch.setattr(evaluate, "evaluate_models", lambda *a, **k: pytest.fail("evaluated before checking --chart"))
    r = cli("eval", tiny_model, "--data", corpus / "valid.txt", "--chart", chart)
    assert r.code == 1 and f"--chart {chart}" in r.err and message in r.err, r.err
    assert r.err.count("\n") == 1


def test_eval_prints_its_table_before_drawing_the_chart(cli, tiny_model, corpus, tmp_path, monkeypatch):
    from lmtune import card
    from lmtune.errors import LmtuneError

    def fail(*args):
        raise LmtuneError("the chart failed")

    monkeypatch.setattr(card, "plot_perplexities", fail)
    r = cli("eval", tiny_model, "--data", corpus / "valid.txt", "--chart", tmp_path / "ppl.png")
    assert r.code == 1 and "the chart failed" in r.err
    assert "perplexity" in r.out and "bits/byte" in r.out  # the figures are not lost


@pytest.mark.parametrize(
    "summary, message",
    [
        ('{"steps": 2', "cannot read {summary} (Expecting ',' delimiter"),
        ('{"steps": 2}', "{summary} has no block_size"),
        ('{"block_size": "big"}', "{summary} has block_size 'big', not a number of tokens"),
    ],
)
def test_a_broken_run_summary_is_named_and_not_needed_with_block_size(summary, message, quick, cli, corpus):
    run = quick("--max-steps", "1")
    (run / "summary.json").write_text(summary)
    r = cli("eval", run, "--data", corpus / "valid.txt")
    assert r.code == 1 and message.format(summary=run / "summary.json") in r.err and "pass --block-size" in r.err, r.err
    assert r.err.strip().splitlines()[-1].startswith("error:")
    r = cli("eval", run, "--data", corpus / "valid.txt", "--block-size", "16", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["context"] == 16
