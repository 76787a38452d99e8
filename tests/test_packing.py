"""Packed conversations: several per row, position ids restarting at each, attention kept apart.

A packed row must give each conversation exactly the loss and gradients it has alone (GPT-2's learned
positions and Llama's rotary ones alike), and evaluation must agree packed or not.
"""

import pytest
import torch

from lmtune import batches, loss
from lmtune.data import Split
from lmtune.evaluate import score
from lmtune.model import load_pretrained


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(LlamaConfig(vocab_size=120, num_hidden_layers=2, max_position_embeddings=64, **shape))


def model_of(family, tiny_model):
    if family == "gpt2":
        return load_pretrained(str(tiny_model), torch.float32, False, dropout=0.0)
    return tiny_llama()


def conversations(lengths, seed=0):
    """A chat split: conversations of these lengths, response tokens on their second half."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (sum(lengths),), generator=g)
    mask = torch.zeros(sum(lengths), dtype=torch.bool)
    starts = [0]
    for n in lengths:
        mask[starts[-1] + n // 2 : starts[-1] + n] = True
        starts.append(starts[-1] + n)
    return Split(ids.numpy(), len(lengths), 100, mask.numpy(), torch.tensor(starts).numpy())


def nll_and_grads(model, rows):
    """Summed NLL of a batch built from `rows` (Examples items) and the gradients it gives."""
    model.zero_grad()
    inputs, labels, positions, _ = batches.pad_batch(rows, pad_id=0)
    total = loss.next_token_nll(model, model, inputs, labels[:, 1:].flatten(), True, positions)
    total.backward()
    return total.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_packed_row_gives_each_conversation_its_own_loss_and_gradients(family, tiny_model):
    model = model_of(family, tiny_model)
    assert batches.packing_works(model)
    split = conversations([9, 23, 5, 14])
    packed = batches.Examples(split, block_size=64, packing=True)
    alone = batches.Examples(split, block_size=64, packing=False)
    assert len(packed) == 1 and len(alone) == 4  # 51 tokens fit one row of 64

    together, together_grads = nll_and_grads(model, [packed[0]])
    one_by_one = [nll_and_grads(model, [alone[i]]) for i in range(4)]
    assert torch.allclose(together, sum(n for n, _ in one_by_one), rtol=1e-5)
    for i, grad in enumerate(together_grads):
        assert torch.allclose(grad, sum(g[i] for _, g in one_by_one), atol=1e-6), i


def test_without_restarting_positions_a_packed_row_would_mix_conversations(tiny_model):
    """The check that the test above can fail: the same packed row with plain positions 0..T differs by far
    more than its tolerance (1e-3 relative on this random tiny model, whose attention is nearly uniform)."""
    model = model_of("gpt2", tiny_model)
    split = conversations([9, 23, 5, 14])
    ids, labels, _ = batches.Examples(split, block_size=64, packing=True)[0]
    mixed, _ = nll_and_grads(model, [(ids, labels, None)])
    alone = batches.Examples(split, block_size=64, packing=False)
    separate = sum(nll_and_grads(model, [alone[i]])[0] for i in range(4))
    assert not torch.allclose(mixed, separate, rtol=1e-4)


def test_a_model_that_ignores_position_ids_is_not_packed(tiny_model):
    class NoPositions(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def get_input_embeddings(self):
            return self.inner.get_input_embeddings()

        def forward(self, input_ids, position_ids=None, **kwargs):
            return self.inner(input_ids=input_ids, **kwargs)  # plain 0..T positions, one causal mask

    assert not batches.packing_works(NoPositions(model_of("gpt2", tiny_model)))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_packed_and_unpacked_evaluation_agree(family, tiny_model):
    model = model_of(family, tiny_model)
    split = conversations([9, 23, 5, 14, 40, 3, 31, 12, 7], seed=1)
    unpacked = score(model, split, 64, 64, batch_size=3, packing=False)
    packed = score(model, split, 64, 64, batch_size=3, packing=True)
    assert packed.tokens == unpacked.tokens == int(split.mask.sum())  # each first token is a prompt token
    assert packed.loss == pytest.approx(unpacked.loss, rel=1e-5)


def test_packing_fills_rows_without_splitting_or_losing_a_conversation():
    spans = [(0, 30), (30, 40), (40, 100), (100, 101), (101, 150), (150, 170), (170, 200)]
    rows = batches.pack_spans(spans, block_size=64)
    assert sorted(span for row in rows for span in row) == spans
    assert all(sum(e - s for s, e in row) <= 64 for row in rows)
    assert len(rows) == 4  # 200 tokens: at least 4 rows of 64
