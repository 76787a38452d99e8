"""Guards that keep the GPU speed from rotting, checked on CPU.

A host-device synchronisation (`.item()`, `bool(tensor)`, ...) makes the CPU wait for the GPU to finish
everything queued; in the training step that stalls the GPU's work queue. lmtune syncs only at the
--log-every points. And `torch.compile` should see each transformer block as one graph. On a CPU the
chunked loss is bound by memory: its passes over each chunk's logits are counted.
"""

import json
import sys
from collections import Counter

import pytest
import torch

from lmtune import train
from lmtune.model import load_pretrained

SYNCS = ("item", "__bool__", "tolist", "__int__", "__float__", "__index__")


def test_a_training_step_syncs_with_the_device_only_at_log_points(cli, tiny_model, corpus, tmp_path, monkeypatch):
    """Count the tensor-to-Python conversions made while `train` runs, by step; only logging steps have any.

    The model's config names a pad token, as lmtune's from-scratch models and many GPT-2 fine-tunes do:
    given input ids and no mask, GPT-2's forward then checks each batch's first and last columns for it."""
    import shutil

    model = shutil.copytree(tiny_model, tmp_path / "model-with-pad-id")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "pad_token_id": 0}))
    counts: Counter[int] = Counter()
    progress = {"step": 0}
    real_train = train.train

    def counting_train(run, p, base, stop):
        def wrap(name):
            real = getattr(torch.Tensor, name)

            def conversion(self, *args, **kwargs):
                # Not the data loader's: it shuffles and collates host tensors before they go to the device.
                caller = sys._getframe(1).f_code.co_filename
                loading = any(part in caller for part in ("torch/utils/data", "accelerate/data_loader"))
                if not loading and any(f.f_code is real_train.__code__ for f in frames()):
                    counts[p.step] += 1
                return real(self, *args, **kwargs)

            return conversion

        with monkeypatch.context() as m:
            for name in SYNCS:
                m.setattr(torch.Tensor, name, wrap(name))
            real_train(run, p, base, stop)
        progress["step"] = p.step

    monkeypatch.setattr(train, "train", counting_train)
    r = cli(
        "finetune", model, "--data", corpus / "train.txt", "--output", tmp_path / "run", "--block-size", "32",
        "--batch-size", "4", "--gradient-accumulation-steps", "2", "--max-steps", "12", "--log-every", "4",
        "--eval-every", "0", "--save-every", "0", "--mixed-precision", "no",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert progress["step"] == 12
    # Conversions are counted against the step about to finish: p.step is 4, 8, 12 at the log points.
    assert set(counts) <= {4, 8, 12}, counts
    assert counts[4] and counts[8] and counts[12], counts


def test_the_chunked_loss_makes_six_passes_over_a_chunks_logits_under_bf16_autocast(monkeypatch):
    """Eager, each op that writes a chunk's (C, V) logits is a pass through memory, most of the loss's time on a
    CPU. Six per chunk, forward and backward: the logits' matmul, the upcast, log_softmax, exp, the one-hot
    subtraction and one cast for both gradient matmuls. The version before made eight, plus log-sum-exp's own,
    with autocast casting the logits' gradient twice (once transposed) and a mask multiplied over all of it."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from lmtune import loss

    rows, vocab, width = 6, 40, 8
    monkeypatch.setattr(loss, "CHUNK", rows)
    passes = []

    class Passes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            views = torch.Tag.view_copy in func.tags or func.is_view
            if isinstance(out, torch.Tensor) and out.numel() == rows * vocab and not views:
                passes.append(func.__name__)
            return out

    hidden = torch.randn(2 * rows, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    targets = torch.randint(0, vocab, (2 * rows,))
    with Passes(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss.linear_cross_entropy(hidden, weight, targets).backward()
    assert len(passes) == 2 * 6, passes


def frames():
    f = sys._getframe(1)
    while f is not None:
        yield f
        f = f.f_back


@pytest.mark.slow
def test_torch_compile_sees_a_transformer_block_as_one_graph(tiny_model):
    model = load_pretrained(str(tiny_model), torch.float32, False)
    model.train()
    block = model.transformer.h[0]
    explained = torch._dynamo.explain(block)(torch.randn(2, 16, model.config.n_embd))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
