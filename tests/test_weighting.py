"""Every label token of an optimizer step weighs the same, whichever micro-batch or process it is in.

Chat conversations with answers of 1 and of 25 words: if each micro-batch's mean counted equally, a
one-word answer would pull as hard as a long one, and splitting the same step into micro-batches or
processes would train a different model.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from conftest import WORDS, two_cpu_processes
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def uneven_chat(tmp_path_factory) -> Path:
    """Conversations whose answers are 1 word or 25 words long, in an order that mixes them."""
    folder = tmp_path_factory.mktemp("uneven")
    r = random.Random(3)
    rows = []
    for i in range(32):
        words = 1 if i % 4 else 25
        rows.append({"prompt": " ".join(r.choices(WORDS, k=4)), "response": " ".join(r.choices(WORDS, k=words))})
    (folder / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "valid.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows[:4]))
    return folder


def args(model, data, out, batch, accumulation, *extra):
    return [
        "finetune", str(model), "--data", str(data / "train.jsonl"), "--validation-data", str(data / "valid.jsonl"),
        "--output", str(out), "--batch-size", str(batch), "--gradient-accumulation-steps", str(accumulation),
        "--max-steps", "3", "--lr", "1e-3", "--dropout", "0", "--mixed-precision", "no", "--eval-every", "0",
        "--save-every", "0", "--seed", "7", *extra,
    ]  # fmt: skip


def largest_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.mark.parametrize("packing", ["--packing", "--no-packing"])
def test_accumulated_micro_batches_train_the_same_model_as_one_batch(packing, cli, tiny_model, uneven_chat, tmp_path):
    one = tmp_path / "batch4"
    four = tmp_path / "batch1x4"
    assert cli(*args(tiny_model, uneven_chat, one, 4, 1, packing)).code == 0
    assert cli(*args(tiny_model, uneven_chat, four, 1, 4, packing)).code == 0
    # Same tokens, same gradients up to float rounding: the weights after 3 AdamW steps agree to 1e-5 (measured:
    # up to 1.7e-6; AdamW divides by the gradient's size, so rounding moves small weights' steps most). Per-micro-
    # batch means, as before, left them 3.9e-3 apart; two processes 4.0e-3.
    assert largest_difference(one, four) < 1e-5


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(cli, tiny_model, uneven_chat, tmp_path, lmtune_home):
    single = tmp_path / "single"
    assert cli(*args(tiny_model, uneven_chat, single, 4, 1)).code == 0
    double = tmp_path / "double"
    proc = two_cpu_processes(args(tiny_model, uneven_chat, double, 2, 1), lmtune_home, port=29531)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert largest_difference(single, double) < 1e-6


def test_out_of_gpu_memory_halves_the_micro_batches_and_trains_the_same_model(
    cli, tiny_model, uneven_chat, tmp_path, monkeypatch, caplog
):
    """A CUDA out-of-memory error (raised here by a stand-in for a GPU with room for 2 rows) redoes the step
    in micro-batches of half the rows, twice as many: the same tokens, the same gradients."""
    from lmtune import loss

    real = loss.next_token_nll

    def small_gpu(model, plain, inputs, *args, **kwargs):
        if len(inputs) > 2 and torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, plain, inputs, *args, **kwargs)

    reference = tmp_path / "batch2x4"
    assert cli(*args(tiny_model, uneven_chat, reference, 2, 4)).code == 0
    monkeypatch.setattr(loss, "next_token_nll", small_gpu)
    halved = tmp_path / "batch8"
    r = cli(*args(tiny_model, uneven_chat, halved, 8, 1))
    assert r.code == 0, r.err
    assert "out of GPU memory at step 1: going on with micro-batches of 4 rows instead of 8" in caplog.text
    assert "of 2 rows instead of 4" in caplog.text
    assert largest_difference(reference, halved) < 1e-6

    one_row = tmp_path / "one-row"

    def no_room(*args, **kwargs):
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(loss, "next_token_nll", no_room)
    r = cli(*args(tiny_model, uneven_chat, one_row, 1, 1))
    assert r.code == 1 and "out of GPU memory at step 1 with micro-batches of 1 row(s)" in r.err, r.err
    assert "--gradient-accumulation-steps" in r.err
