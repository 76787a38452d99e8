"""Bigger models on the same hardware: activation checkpointing, QLoRA, 8-bit AdamW, and the plan that says
what fits. bitsandbytes runs its 4-bit layers and 8-bit optimizers on CPU too, slowly: the runs are tiny."""

import json
import sys

import pytest
import torch
from conftest import read_json
from safetensors.torch import load_file

from lmtune import checkpoint, loss

pytest.importorskip("bitsandbytes")  # in the dev extra; `pip install 'lmtune[quantize]'`


def run_args(tiny_model, corpus, out, *extra):
    """Six steps of the tiny model with dropout on (so random state matters), a checkpoint every step."""
    return [
        "finetune", tiny_model, "--data", corpus / "train.txt", "--validation-data", corpus / "valid.txt",
        "--output", out, "--block-size", "32", "--batch-size", "4", "--max-steps", "6", "--lr", "1e-3",
        "--mixed-precision", "no", "--save-every", "1", "--log-every", "1", "--eval-every", "3", "--dropout", "0.1",
        *extra,
    ]  # fmt: skip


def records(out):
    return [
        (e["event"], e["step"], e.get("loss"), e.get("eval_loss"))
        for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]


def largest_difference(a, b, name="model.safetensors"):
    wa, wb = load_file(a / name), load_file(b / name)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def fail_after(n):
    real, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > n:
            raise OSError(28, "No space left on device")
        return real(obj, path, *args, **kwargs)

    return save


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--quantize", "4bit"], "--quantize 4bit freezes the base weights, so it trains a LoRA adapter: add --lora"),
        (["--quantize", "8bit", "--from-scratch"], "--quantize freezes pretrained weights; it cannot train a model --from-scratch"),
        (["--optimizer", "paged-adamw-8bit"], "--optimizer paged-adamw-8bit pages its state between GPU and CPU memory, which needs a CUDA GPU; use adamw-8bit"),
        (["--optimizer", "adam"], "optimizer: Input should be 'adamw', 'adamw-8bit', 'paged-adamw' or 'paged-adamw-8bit'"),
    ],
)  # fmt: skip
def test_settings_that_cannot_work_are_one_line(extra, message, cli, tiny_model, corpus, tmp_path):
    r = cli("finetune", tiny_model, "--data", corpus / "train.txt", "--output", tmp_path / "run", *extra)
    assert r.code == 1 and message in r.err and "Traceback" not in r.err, r.err
    assert len(r.err.strip().splitlines()) == 1, r.err


@pytest.mark.parametrize("extra", [["--lora", "--quantize", "4bit"], ["--optimizer", "adamw-8bit"]])
def test_a_missing_bitsandbytes_is_named_with_the_extra_to_install(
    extra, cli, tiny_model, corpus, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now fails as if not installed
    r = cli("finetune", tiny_model, "--data", corpus / "train.txt", "--output", tmp_path / "run", *extra)
    assert r.code == 1 and r.err.strip().splitlines() == [
        f"error: {' '.join(extra[-2:])} needs bitsandbytes: pip install 'lmtune[quantize]'"
    ], r.err


def count_checkpointed_layers(monkeypatch):
    """Calls of torch's checkpoint through transformers' activation checkpointing, counted."""
    from transformers import modeling_utils

    real, calls = modeling_utils.checkpoint, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(modeling_utils, "checkpoint", counted)
    return calls


@pytest.mark.parametrize("lora", [[], ["--lora"]])
def test_gradient_checkpointing_trains_the_same_model(lora, cli, tiny_model, corpus, tmp_path, monkeypatch):
    """The same gradients, recomputed: with dropout on, the recomputation replays the same random masks."""
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    assert cli(*run_args(tiny_model, corpus, plain, "--save-every", "0", *lora)).code == 0
    calls = count_checkpointed_layers(monkeypatch)
    r = cli(*run_args(tiny_model, corpus, checkpointed, "--save-every", "0", "--gradient-checkpointing", *lora))
    assert r.code == 0, r.err
    assert len(calls) == 2 * 6  # 2 layers, 6 training forwards (evaluation does not checkpoint)
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    assert largest_difference(plain, checkpointed, weights) < 1e-6
    assert [r[:2] for r in records(plain)] == [r[:2] for r in records(checkpointed)]


def test_out_of_memory_at_one_row_switches_checkpointing_on(cli, tiny_model, corpus, tmp_path, monkeypatch, caplog):
    """A stand-in for a GPU with room for one row only with checkpointing: the back-off halves the rows down
    to one, then switches activation checkpointing on, and the run trains the model of batch 1 x 2."""
    from lmtune.model import checkpointing

    real = loss.next_token_nll

    def small_gpu(model, plain, inputs, *args, **kwargs):
        if torch.is_grad_enabled() and (len(inputs) > 1 or not checkpointing(plain)):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(model, plain, inputs, *args, **kwargs)

    common = ["--save-every", "0", "--dropout", "0"]
    reference = tmp_path / "batch1x2"
    args = run_args(tiny_model, corpus, reference, *common, "--batch-size", "1", "--gradient-accumulation-steps", "2")
    assert cli(*args).code == 0
    monkeypatch.setattr(loss, "next_token_nll", small_gpu)
    backed_off = tmp_path / "batch2"
    r = cli(*run_args(tiny_model, corpus, backed_off, *common, "--batch-size", "2"))
    assert r.code == 0, r.err
    assert "going on with micro-batches of 1 rows instead of 2" in caplog.text
    assert (
        "out of GPU memory at step 1 with micro-batches of 1 row: going on with activation checkpointing" in caplog.text
    )
    assert largest_difference(reference, backed_off) < 1e-6

    def no_room(*args, **kwargs):
        if torch.is_grad_enabled():
            raise torch.OutOfMemoryError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(loss, "next_token_nll", no_room)
    r = cli(*run_args(tiny_model, corpus, tmp_path / "no-room", *common, "--batch-size", "1"))
    last = r.err.strip().splitlines()[-1]
    assert r.code == 1 and "with micro-batches of 1 row(s)" in last and "--gradient-checkpointing" not in last, last
    assert "--lora --quantize 4bit" in last


def test_eight_bit_adamw_decays_weight_matrices_only_and_keeps_8_bit_states(tmp_path, tiny_model):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from lmtune.config import Config
    from lmtune.setup import make_optimizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    optimizer = make_optimizer(model, Config(optimizer="adamw-8bit", weight_decay=0.1))
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() < 2 for p in plain["params"])
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    optimizer.step()
    embedding = optimizer.state[model.transformer.wte.weight]  # 376 x 32: over bitsandbytes' 4,096 minimum
    assert embedding["state1"].dtype == torch.uint8 and embedding["state2"].dtype == torch.uint8


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--gradient-checkpointing", "--optimizer", "adamw-8bit"],
        ["--lora", "--quantize", "4bit", "--gradient-checkpointing"],
    ],
    ids=["checkpointing-8bit-adam", "qlora"],
)
def test_resume_is_exact(extra, cli, tiny_model, corpus, tmp_path, monkeypatch):
    """Stopped after two checkpoints and resumed, the run ends as the one never stopped: the same per-step
    losses and evaluations and the same weights (8-bit Adam's quantized states and the dropout masks of
    recomputed layers restored exactly)."""
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    assert cli(*run_args(tiny_model, corpus, reference, *extra)).code == 0
    monkeypatch.setattr(checkpoint.torch, "save", fail_after(2))
    assert cli(*run_args(tiny_model, corpus, stopped, *extra)).code == 1
    monkeypatch.undo()
    r = cli(*run_args(tiny_model, corpus, stopped, *extra, "--resume"))
    assert r.code == 0, r.err
    assert read_json(stopped / "summary.json")["resumed_from"].endswith("step-0000002")
    assert records(stopped) == records(reference)
    weights = "adapter_model.safetensors" if "--lora" in extra else "model.safetensors"
    assert largest_difference(reference, stopped, weights) == 0


@pytest.mark.slow
def test_qlora_trains_merges_into_full_precision_and_scores_as_trained(cli, tiny_model, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "qlora"
    args = run_args(tiny_model, corpus, out, "--lora", "--quantize", "4bit", "--max-steps", "12", "--lr", "1e-2")
    r = cli(*args, "--save-every", "0", "--dropout", "0")
    assert r.code == 0, r.err
    summary = read_json(out / "summary.json")
    assert summary["eval_loss"] < summary["base_eval_loss"] - 0.05  # it learnt
    assert summary["parameters"] == 39_552 + summary["trainable_parameters"]  # 4-bit weights counted by shape

    # eval loads the run as it was trained (4-bit base, adapter beside it): the run's own figure
    scored = cli("eval", out, "--json")
    assert scored.code == 0, scored.err
    assert json.loads(scored.out)["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    generated = cli("generate", "the cat", "--model", out, "--max-new-tokens", "4", "--greedy")
    assert generated.code == 0 and generated.out.startswith("the cat"), generated.err

    merged = tmp_path / "merged"
    assert cli("merge", out, "--output", merged).code == 0
    model = AutoModelForCausalLM.from_pretrained(merged)  # plain transformers, no peft, no bitsandbytes
    assert model.dtype == torch.float32 and not hasattr(model.config, "quantization_config")
    assert type(model.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    valid = corpus / "valid.txt"
    both = cli("eval", merged, "--data", valid, "--block-size", "32", "--json")
    assert both.code == 0, both.err
    assert json.loads(both.out)["loss"] == pytest.approx(summary["eval_loss"], rel=0.01)


@pytest.mark.slow
def test_eight_bit_base_weights_train(quick):
    out = quick("--lora", "--quantize", "8bit", "--max-steps", "2", "--mixed-precision", "no")
    assert read_json(out / "summary.json")["steps"] == 2


def test_the_dry_run_splits_its_peak_and_says_what_would_fit(cli, tiny_model, corpus, tmp_path, monkeypatch):
    from lmtune import memory

    args = ["finetune", tiny_model, "--data", corpus / "train.txt", "--block-size", "32", "--dry-run"]
    r = cli(*args)
    assert r.code == 0, r.err
    assert "memory" in r.out and "weights" in r.out and "activations" in r.out and "fits  " in r.out
    assert "yes: peak" in r.out and "each change alone" not in r.out

    monkeypatch.setattr(memory, "capacity", lambda device, in_use: 1)  # a machine with no room at all
    r = cli(*args)
    assert r.code == 0, r.err
    out = " ".join(r.out.split())
    assert "NO: peak" in out and "each change alone" in out, out
    for change in (
        "--batch-size 4 --gradient-accumulation-steps 2:",
        "--optimizer adamw-8bit:",
        "--lora --quantize 4bit:",
    ):
        assert change in out, out


def test_each_lever_takes_its_share_off_the_peak(tiny_model):
    """The alternatives, computed from a peak's parts: checkpointing keeps one float32 (B, T, E) input per
    layer plus one layer's activations, half the rows half the activations, 8-bit states a quarter."""
    from transformers import AutoModelForCausalLM

    from lmtune import memory
    from lmtune.config import Config

    model = AutoModelForCausalLM.from_pretrained(tiny_model)  # 2 layers, 32 wide
    mib = 2**20
    parts = {"peak": 1000 * mib, "activations": 600 * mib, "optimizer_states": 200 * mib, "gradients": 100 * mib,
             "weights": 100 * mib, "capacity": 800 * mib}  # fmt: skip
    options = {o["change"]: o for o in memory.alternatives(Config(batch_size=8), model, parts, block_size=1024)}
    kept = 2 * 8 * 1024 * 32 * 4
    assert options["--gradient-checkpointing"]["peak"] == 1000 * mib - 600 * mib + 300 * mib + kept
    assert options["--batch-size 4 --gradient-accumulation-steps 2"]["peak"] == 700 * mib
    assert options["--optimizer adamw-8bit"]["peak"] == 850 * mib
    assert [o["fits"] for o in options.values()] == [True, True, False, True]


def test_the_dry_run_trains_as_the_run_does_with_dropout_and_checkpointing(cli, tiny_model, corpus, monkeypatch):
    """Its passes run in training mode: a loaded model starts in eval mode, where transformers checkpoints
    nothing and dropout draws no masks, and the dry run's peak was then the peak of another computation
    (bench-memory: 39% over the real run's with --gradient-checkpointing, 14% under with LoRA's dropout)."""
    calls = count_checkpointed_layers(monkeypatch)
    args = ["finetune", tiny_model, "--data", corpus / "train.txt", "--block-size", "32", "--dry-run"]
    r = cli(*args, "--gradient-checkpointing")
    assert r.code == 0, r.err
    assert len(calls) == 2 * 3  # 2 layers, 3 passes


@pytest.mark.parametrize("accumulation, held", [(1, [False, False, False]), (2, [False, True, True])])
def test_the_dry_runs_passes_hold_gradients_as_the_runs_micro_batches_do(
    accumulation, held, cli, tiny_model, corpus, monkeypatch
):
    """A step's only micro-batch makes its gradients anew while its activations are freed; with accumulation
    a later one finds them there, and its peak holds both. The dry run's passes, each a micro-batch, do the
    same (they once kept the gradients of the pass before: 13% over the real run's peak in bench-memory)."""
    from lmtune import setup

    real, seen = loss.next_token_loss, []

    def noting(model, *args, **kwargs):
        seen.append(any(p.grad is not None for p in model.parameters()))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(setup.loss, "next_token_loss", noting)
    args = ["finetune", tiny_model, "--data", corpus / "train.txt", "--block-size", "32", "--dry-run"]
    assert cli(*args, "--gradient-accumulation-steps", str(accumulation)).code == 0
    assert seen == held


def test_the_dry_runs_parts_are_the_tensors_it_holds(tiny_model, corpus, tmp_path):
    """Weights, gradients and AdamW states as their tensors' sizes: 4 + 4 + 8 bytes per float32 parameter."""
    from lmtune.config import Config
    from lmtune.events import silent
    from lmtune.setup import check_inputs, prepare, timed_passes

    cfg, output = check_inputs(Config(model=str(tiny_model), data=str(corpus / "train.txt"), block_size=32), True)
    run = prepare(cfg, output, None, silent)
    m = timed_passes(run)["memory"]
    n = sum(p.numel() for p in run.plain.parameters())
    buffers = sum(b.numel() * b.element_size() for b in run.plain.buffers())
    assert m["weights"] == 4 * n + buffers and m["gradients"] == 4 * n
    assert m["optimizer_states"] == 8 * n + 4 * len(list(run.plain.parameters()))  # two moments, and each step count
    assert m["peak"] >= m["weights"] + m["gradients"] + m["optimizer_states"]


def test_gradient_checkpointing_with_packed_chat_rows_trains_the_same_model(cli, tiny_model, tmp_path):
    """Packed rows carry position ids restarting at each conversation: the recomputed layers get them too."""
    from conftest import WORDS, write_jsonl

    rows = [{"prompt": " ".join(WORDS[i : i + 4]), "response": " ".join(WORDS[i : i + 1 + i % 9])} for i in range(24)]
    train, valid = write_jsonl(tmp_path / "train.jsonl", rows), write_jsonl(tmp_path / "valid.jsonl", rows[:4])

    def finetune(name, *extra):
        out = tmp_path / name
        r = cli(
            "finetune", tiny_model, "--data", train, "--validation-data", valid, "--output", out,
            "--block-size", "64", "--batch-size", "4", "--max-steps", "3", "--lr", "1e-3", "--mixed-precision", "no",
            "--eval-every", "0", "--packing", *extra,
        )  # fmt: skip
        assert r.code == 0, r.err
        assert read_json(out / "summary.json")["packing"] is True
        return out

    assert largest_difference(finetune("plain"), finetune("checkpointed", "--gradient-checkpointing")) < 1e-6


@pytest.mark.slow
def test_gradient_checkpointing_with_compile_trains_the_same_model(cli, tiny_model, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(loss, "_compiled", {})  # compile_chunks switches the whole process: a fresh switch
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    common = ["--save-every", "0", "--dropout", "0", "--max-steps", "3", "--gradient-checkpointing"]
    assert cli(*run_args(tiny_model, corpus, eager, *common)).code == 0
    torch._dynamo.reset()
    r = cli(*run_args(tiny_model, corpus, compiled, *common, "--compile"))
    assert r.code == 0, r.err
    assert read_json(compiled / "summary.json")["eval_loss"] == pytest.approx(
        read_json(eager / "summary.json")["eval_loss"], rel=1e-4
    )


@pytest.mark.slow
def test_gradient_checkpointing_under_fsdp_trains_the_same_model(tiny_model, corpus, tmp_path, lmtune_home):
    """FSDP 2 sharding over gloo on CPU (tests/fsdp_on_cpu.py), with and without checkpointing: the recomputed
    blocks gather their shards again in backward, and the run ends with the same figures."""
    from test_distributed import CONFIGS, FSDP_ON_CPU, finetune_args, free_port, launch

    config = tmp_path / "fsdp.yaml"
    config.write_text(CONFIGS["fsdp"])
    summaries = []
    for name, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        args = finetune_args(tiny_model, corpus, tmp_path / name, "--max-steps", "3", "--dropout", "0", *extra)
        proc = launch("--config_file", config, "--main_process_port", free_port(), FSDP_ON_CPU, *args, home=lmtune_home)
        assert proc.returncode == 0, proc.stderr[-3000:]
        summaries.append(read_json(tmp_path / name / "summary.json"))
    plain, checkpointed = summaries
    assert checkpointed["processes"] == 2 and checkpointed["gradient_checkpointing"] is True
    assert checkpointed["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)
