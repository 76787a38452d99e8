"""Training pieces that have a rule worth pinning down."""

import json

import pytest
import torch
from conftest import read_json

from lmtune import setup
from lmtune.errors import LmtuneError


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(setup, "cpu_has_bf16", lambda: True)
    assert setup.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(setup, "cpu_has_bf16", lambda: False)
    assert setup.resolve_precision("auto") == "no"  # emulated bf16 is slower than fp32
    assert setup.resolve_precision("bf16") == "bf16"  # asked for explicitly: honoured
    with pytest.raises(LmtuneError, match="fp16 needs a CUDA GPU"):
        setup.resolve_precision("fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert setup.resolve_precision("auto") == "fp16"


def test_weight_decay_skips_biases_and_norms(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    decay, no_decay = setup.weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_bf16_autocast_on_cpu_trains(quick):
    summary = read_json(quick("--mixed-precision", "bf16", "--max-steps", "3", "--lr", "1e-3") / "summary.json")
    assert summary["mixed_precision"] == "bf16"
    assert summary["eval_loss"] < summary["base_eval_loss"]


def test_gradient_accumulation_counts_tokens_per_optimizer_step(quick):
    run = quick("--gradient-accumulation-steps", "3", "--batch-size", "2", "--max-steps", "2")
    summary = read_json(run / "summary.json")
    assert summary["tokens_per_step"] == 3 * 2 * 32
    assert summary["train_tokens"] == 2 * 3 * 2 * 32


def test_second_run_reads_tokens_from_cache(quick):
    first, second = quick("--max-steps", "1", name="a"), quick("--max-steps", "1", name="b")
    assert not read_json(first / "summary.json")["data_from_cache"]
    assert read_json(second / "summary.json")["data_from_cache"]


def test_default_evaluations_are_spread_over_the_run(quick):
    events = map(json.loads, (quick("--max-steps", "11") / "metrics.jsonl").read_text().splitlines())
    steps = [e["step"] for e in events if e["event"] == "eval"]
    assert steps == [0, 3, 6, 9, 11]  # base, every ceil(11 / 5) = 3 steps, final


def test_a_checkpoint_holds_exactly_the_progress_record():
    """Saving and resuming go through the same record, so they cannot drift apart."""
    from dataclasses import fields

    from lmtune.train import Progress

    p = Progress(step=7, epoch=1, batch_in_epoch=3, tokens_seen=896, train_seconds=1.5)
    p.loss_sum += 12.25
    p.loss_tokens += 5
    common, own = p.saved()
    assert set(common) == {
        "step", "epoch", "batch_in_epoch", "tokens_seen", "train_seconds",
        "best_step", "best_loss", "evals_since_best", "stopped_early_at",  # --keep-best and --early-stopping
    }  # fmt: skip
    back = Progress.restored(json.loads(json.dumps(common)), own, "cpu")  # state.json is JSON
    for f in fields(Progress):
        if f.name not in ("rng", "bad_step"):
            mine, theirs = getattr(back, f.name), getattr(p, f.name)
            same = torch.equal(mine, theirs) if isinstance(mine, torch.Tensor) else mine == theirs
            assert same, f.name
    assert back.rng is own["rng"] and back.rng["torch"].dtype == torch.uint8
