"""Guards that keep the GPU speed from rotting, checked on CPU.

A host-device synchronisation (`.item()`, `bool(tensor)`, ...) makes the CPU wait for the GPU to finish
everything queued; in the training step that stalls the GPU's work queue. lmtune syncs only at the
--log-every points. And `torch.compile` should see each transformer block as one graph.
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
