"""Perplexity checked against hand computations."""

import math

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
    s = score(model, split, context=16, stride=16, batch_size=3)
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
