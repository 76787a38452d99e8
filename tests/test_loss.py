"""The speed-ups change how the numbers are computed, never the numbers: each is checked against the plain path."""

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F

from lmtune import loss
from lmtune.config import Config
from lmtune.loss import next_token_loss
from lmtune.model import load_model, load_pretrained, load_tokenizer


class NoAccelerator:
    autocast = staticmethod(contextlib.nullcontext)


def test_chunked_cross_entropy_matches_full_logits(monkeypatch):
    monkeypatch.setattr(loss, "CHUNK", 7)  # several chunks and a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    targets[[3, 11, 29]] = loss.IGNORE

    ours = loss.linear_cross_entropy(hidden, weight, targets) / 27
    ours.backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    full = F.cross_entropy(hidden @ weight.T, targets, ignore_index=loss.IGNORE)
    full.backward()

    assert torch.allclose(ours, full, atol=1e-6)
    assert torch.allclose(ours_grads[0], hidden.grad, atol=1e-6)
    assert torch.allclose(ours_grads[1], weight.grad, atol=1e-6)
    with torch.no_grad():  # evaluation's path: no gradients made
        assert torch.allclose(loss.linear_cross_entropy(hidden, weight, targets) / 27, full, atol=1e-6)


def test_chunked_cross_entropy_under_bf16_autocast_matches_full_bf16_logits(monkeypatch):
    """lmtune's default where bf16 is fast: the chunks cast hidden states and head once and zero unscored rows
    on the (C, E) side of the gradient matmuls. The loss is still F.cross_entropy over the whole upcast bf16
    logits (what transformers computes under autocast), and the gradients agree to bf16's precision."""
    monkeypatch.setattr(loss, "CHUNK", 7)  # several chunks and a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(30, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    targets = torch.randint(0, 50, (30,))
    ignored = [3, 11, 29]
    targets[ignored] = loss.IGNORE

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = loss.linear_cross_entropy(hidden, weight, targets) / 27
    ours.backward()
    ours_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=loss.IGNORE)
    full.backward()

    assert ours.dtype == torch.float32 and torch.allclose(ours, full, rtol=1e-6)
    for mine, theirs in zip(ours_grads, (hidden.grad, weight.grad), strict=True):
        assert mine.dtype == torch.float32
        assert (mine - theirs).abs().max() <= 2**-7 * theirs.abs().max()  # bf16 keeps 8 significant bits
    assert not ours_grads[0][ignored].any()  # unscored rows get no gradient


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(LlamaConfig(vocab_size=120, num_hidden_layers=2, **shape))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_training_loss_and_gradients_match_transformers(family, tiny_model):
    if family == "gpt2":
        model = load_pretrained(str(tiny_model), torch.float32, False, dropout=0.0)
    else:
        model = tiny_llama()
    assert loss.supported(model)
    batch = torch.randint(0, 100, (3, 20))

    nll, count = next_token_loss(model, model, batch, batch, True, NoAccelerator())
    ours = nll / count  # transformers' loss is the mean over label tokens
    ours.backward()
    ours_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    theirs = model(input_ids=batch, labels=batch).loss
    theirs.backward()

    assert torch.allclose(ours, theirs, atol=1e-6)
    nll, count = next_token_loss(model, model, batch, batch, False, NoAccelerator())
    full_logits = nll / count
    assert torch.allclose(full_logits, theirs.detach(), atol=1e-6)  # the path for other models
    for mine, their in zip(ours_grads, (p.grad for p in model.parameters()), strict=True):
        assert torch.allclose(mine, their, atol=1e-6)


def test_fast_gelu_computes_the_same_and_saves_the_original_name(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    fast = load_pretrained(str(tiny_model), torch.float32, False).eval()
    assert type(plain.transformer.h[0].mlp.act).__name__ == "NewGELUActivation"
    assert type(fast.transformer.h[0].mlp.act).__name__ == "GELUTanh"
    batch = torch.randint(0, 100, (2, 16))
    assert torch.allclose(plain(input_ids=batch).logits, fast(input_ids=batch).logits, atol=1e-5)
    fast.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["activation_function"] == "gelu_new"


def test_dropout_key_sets_every_dropout_of_the_model(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    default = load_model(Config(model=str(tiny_model)), tok)
    assert default.config.resid_pdrop == 0.1  # the model's own
    off = load_model(Config(model=str(tiny_model), dropout=0.0), tok)
    assert (off.config.resid_pdrop, off.config.embd_pdrop, off.config.attn_pdrop) == (0.0, 0.0, 0.0)
    scratch = load_model(Config(from_scratch=True, n_layer=1, n_head=2, n_embd=8, dropout=0.2), tok)
    assert scratch.config.attn_pdrop == 0.2


def test_a_run_without_dropout_saves_that_in_its_config(quick):
    run = quick("dropout=0")
    assert json.loads((run / "config.json").read_text())["resid_pdrop"] == 0.0
