"""Training pieces that have a rule worth pinning down."""

import json

import pytest
import torch
from conftest import read_json

from lmtune import train
from lmtune.errors import LmtuneError


def test_auto_precision_follows_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: True)
    assert train.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: False)
    assert train.resolve_precision("auto") == "no"  # emulated bf16 is slower than fp32
    assert train.resolve_precision("bf16") == "bf16"  # asked for explicitly: honoured
    with pytest.raises(LmtuneError, match="fp16 needs a CUDA GPU"):
        train.resolve_precision("fp16")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert train.resolve_precision("auto") == "fp16"


def test_weight_decay_skips_biases_and_norms(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    decay, no_decay = train.weight_decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_bf16_autocast_on_cpu_trains(cli, tiny_model, corpus, tmp_path):
    out = tmp_path / "bf16"
    r = cli(
        "finetune",
        tiny_model,
        "--data",
        corpus / "train.txt",
        "--output",
        out,
        "--mixed-precision",
        "bf16",
        "--max-steps",
        "3",
        "--block-size",
        "32",
        "--lr",
        "1e-3",
    )
    assert r.code == 0, r.err
    summary = read_json(out / "summary.json")
    assert summary["mixed_precision"] == "bf16"
    assert summary["eval_loss"] < summary["base_eval_loss"]


def test_gradient_accumulation_counts_tokens_per_optimizer_step(cli, tiny_model, corpus, tmp_path):
    out = tmp_path / "accum"
    r = cli(
        "finetune",
        tiny_model,
        "--data",
        corpus / "train.txt",
        "--output",
        out,
        "--gradient-accumulation-steps",
        "3",
        "--batch-size",
        "2",
        "--max-steps",
        "2",
        "--block-size",
        "32",
    )
    assert r.code == 0, r.err
    summary = read_json(out / "summary.json")
    assert summary["tokens_per_step"] == 3 * 2 * 32
    assert summary["train_tokens"] == 2 * 3 * 2 * 32


def test_second_run_reads_tokens_from_cache(cli, tiny_model, corpus, tmp_path):
    args = ["finetune", tiny_model, "--data", corpus / "train.txt", "--max-steps", "1", "--block-size", "32"]
    assert cli(*args, "--output", tmp_path / "a").code == 0
    assert cli(*args, "--output", tmp_path / "b").code == 0
    assert not read_json(tmp_path / "a" / "summary.json")["data_from_cache"]
    assert read_json(tmp_path / "b" / "summary.json")["data_from_cache"]


def test_default_evaluations_are_spread_over_the_run(cli, tiny_model, corpus, tmp_path):
    out = tmp_path / "spread"
    r = cli(
        "finetune",
        tiny_model,
        "--data",
        corpus / "train.txt",
        "--output",
        out,
        "--max-steps",
        "11",
        "--block-size",
        "32",
    )
    assert r.code == 0, r.err
    steps = [
        e["step"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "eval"
    ]
    assert steps == [0, 3, 6, 9, 11]  # base, every ceil(11 / 5) = 3 steps, final
