"""`--compile`: the transformer blocks and the loss's chunks run compiled, and compute the same numbers.

Compiling on a CPU takes seconds to a minute (inductor writes and builds C++), so these tests are slow."""

import contextlib

import pytest
import torch
from conftest import read_json, two_cpu_processes
from transformers import AutoModelForCausalLM

from lmtune import loss


@pytest.fixture
def eager_loss(monkeypatch):
    """compile_chunks switches the whole process to compiled chunks: give it a fresh switch per test."""
    monkeypatch.setattr(loss, "_compiled", {})


def loss_and_gradients(hidden, weight, targets, autocast):
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_(weight.requires_grad)
    with autocast:
        total = loss.linear_cross_entropy(hidden, weight, targets)
    total.backward()
    with torch.no_grad(), autocast:  # evaluation's path
        scored = loss.linear_cross_entropy(hidden, weight, targets)
    return total.detach(), scored, hidden.grad, weight.grad


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("frozen_head", [False, True])
def test_compiled_loss_chunks_give_the_eager_loss_and_gradients(precision, frozen_head, eager_loss, monkeypatch):
    monkeypatch.setattr(loss, "CHUNK", 16)  # two full chunks and a ragged last one
    torch.manual_seed(0)
    hidden = torch.randn(40, 32)
    weight = (torch.randn(300, 32) * 0.3).requires_grad_(not frozen_head)  # LoRA freezes the head
    targets = torch.randint(0, 300, (40,))
    targets[[0, 17, 39]] = loss.IGNORE
    if precision == "bf16":
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext()

    eager = loss_and_gradients(hidden, weight, targets, autocast)
    loss.compile_chunks()
    compiled = loss_and_gradients(hidden, weight, targets, autocast)

    assert loss._compiled  # the second pass did run compiled
    # fp32: the same sums in another order. bf16: the probabilities are rounded to bf16 before the
    # gradient matmuls in both, and inductor may keep more digits in between.
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    for ours, theirs in zip(compiled, eager, strict=True):
        if theirs is None:
            assert ours is None
            continue
        assert torch.allclose(ours.float(), theirs.float(), rtol=tolerance, atol=tolerance * theirs.abs().max()), (
            (ours - theirs).abs().max()
        )


@pytest.mark.slow
def test_finetune_with_compile_trains_the_same_model_without_graph_breaks(
    cli, tiny_model, corpus, tmp_path, eager_loss
):
    def finetune(name, *extra):
        out = tmp_path / name
        r = cli(
            "finetune", tiny_model, "--data", corpus / "train.txt", "--validation-data", corpus / "valid.txt",
            "--output", out, "--block-size", "32", "--batch-size", "4", "--max-steps", "4", "--lr", "1e-3",
            "--mixed-precision", "no", "--eval-every", "2", "dropout=0", *extra,
        )  # fmt: skip
        assert r.code == 0, r.err
        shown[name] = r.out + r.err
        return out

    shown: dict[str, str] = {}
    eager = finetune("eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = finetune("compiled", "--compile")
    assert read_json(compiled / "summary.json")["compile"] is True
    assert "compiled: the first steps take longer" in shown["compiled"]  # said in the plan, before they start
    assert "compiled" not in shown["eager"]

    # Every transformer block, and the loss, ran compiled, as whole graphs.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert loss._compiled
    # The same model, to float32 rounding: eval losses within 1e-4 (the issue allows 1%).
    before, after = read_json(eager / "summary.json"), read_json(compiled / "summary.json")
    assert after["eval_loss"] == pytest.approx(before["eval_loss"], rel=1e-4)
    # Saved as plain transformers weights (no compiled wrappers' names in them), which load and agree.
    plain = AutoModelForCausalLM.from_pretrained(compiled)
    reference = AutoModelForCausalLM.from_pretrained(eager)
    for (name, ours), theirs in zip(plain.state_dict().items(), reference.state_dict().values(), strict=True):
        assert "_orig_mod" not in name
        assert torch.allclose(ours, theirs, atol=1e-4), name


@pytest.mark.slow
def test_two_processes_with_compile_train_the_same_model(tiny_model, corpus, tmp_path, lmtune_home):
    """Regional compilation makes a copy of the DDP wrapper around the compiled blocks, and the loop calls
    that copy (no_sync included): the gradients must still be averaged across the processes."""

    def finetune(name, port, *extra):
        out = tmp_path / name
        args = [
            "finetune", tiny_model, "--data", corpus / "train.txt", "--validation-data", corpus / "valid.txt",
            "--output", out, "--block-size", "32", "--batch-size", "2", "--gradient-accumulation-steps", "2",
            "--max-steps", "3", "--lr", "1e-3", "--mixed-precision", "no", "--eval-every", "0", "dropout=0", *extra,
        ]  # fmt: skip
        proc = two_cpu_processes(args, lmtune_home, port=port)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return out

    eager = finetune("eager", 29541)
    compiled = finetune("compiled", 29542, "--compile")

    assert read_json(compiled / "summary.json")["processes"] == 2
    plain = AutoModelForCausalLM.from_pretrained(compiled).state_dict()
    reference = AutoModelForCausalLM.from_pretrained(eager).state_dict()
    assert plain.keys() == reference.keys()
    for name, theirs in reference.items():
        assert torch.allclose(plain[name], theirs, atol=1e-4), name
