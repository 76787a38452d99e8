"""LoRA through peft: the run folder holds an adapter, generate/eval load it, merge makes a plain model."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import read_json
from safetensors.torch import load_file
from test_resume import _fail_after

from lmtune import checkpoint, loss


@pytest.fixture
def lora_run(cli, tiny_model, corpus, tmp_path):
    out = tmp_path / "lora-run"
    r = cli(
        "finetune", tiny_model, "--data", corpus / "train.txt", "--validation-data", corpus / "valid.txt",
        "--output", out, "--block-size", "32", "--batch-size", "4", "--max-steps", "8", "--lr", "1e-2",
        "--mixed-precision", "no", "--lora", "--lora-rank", "4", "--log-every", "1",
    )  # fmt: skip
    assert r.code == 0, r.err
    return out


def test_lora_run_folder_holds_an_adapter_and_reports_what_trains(lora_run, tiny_model):
    assert (lora_run / "adapter_config.json").is_file() and (lora_run / "adapter_model.safetensors").is_file()
    assert not (lora_run / "model.safetensors").exists()  # the base is not copied
    adapter = json.loads((lora_run / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_model.resolve())
    assert adapter["r"] == 4 and adapter["fan_in_fan_out"] is True  # GPT-2's Conv1D layers
    # all-linear: every attention and MLP layer of both blocks, not the output head
    assert {m.rsplit(".", 1)[-1] for m in adapter["target_modules"]} == {"c_attn", "c_proj", "c_fc"}
    assert len(adapter["target_modules"]) == 2 * 4 and not any("lm_head" in m for m in adapter["target_modules"])

    s = read_json(lora_run / "summary.json")
    weights = load_file(lora_run / "adapter_model.safetensors")
    assert s["trainable_parameters"] == sum(w.numel() for w in weights.values())
    assert 0 < s["trainable_parameters"] < s["parameters"]
    assert s["training_state_bytes"] == s["trainable_parameters"] * 12
    assert s["full_training_state_bytes"] == s["parameters"] * 12
    assert s["eval_loss"] < s["base_eval_loss"]  # the adapter learned something


def test_generate_and_eval_load_the_adapter_with_its_base(cli, lora_run, tiny_model):
    r = cli("eval", lora_run, tiny_model, "--json")
    assert r.code == 0, r.err
    adapted, base = json.loads(r.out)
    s = read_json(lora_run / "summary.json")
    assert base["model"] == str(tiny_model)  # the base alone loads too, beside its adapter
    # eval on the run's own validation data reproduces the run's final figures
    assert adapted["loss"] == pytest.approx(s["eval_loss"], rel=1e-5)
    assert adapted["tokens"] == s["eval_tokens"]
    assert cli("generate", "the cat", "--model", lora_run, "--seed", "0", "--max-new-tokens", "5").code == 0


def test_merge_writes_a_model_plain_transformers_loads_without_peft(cli, lora_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    r = cli("merge", lora_run, "--output", out)
    assert r.code == 0, r.err
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()

    ids = torch.tensor([[5, 17, 3, 42, 8, 99, 12]])
    base_path = json.loads((lora_run / "adapter_config.json").read_text())["base_model_name_or_path"]
    with torch.no_grad():
        unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), lora_run).eval()
        expected = unmerged(ids).logits
    # A fresh Python where importing peft fails: the merged folder is a plain transformers model.
    code = (
        "import sys, json, torch; sys.modules['peft'] = None\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(out)!r}).eval()\n"
        f"print(json.dumps(m(torch.tensor({ids.tolist()})).logits.tolist()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    merged = torch.tensor(json.loads(proc.stdout))
    assert torch.allclose(merged, expected, atol=1e-5)
    assert not torch.allclose(expected, AutoModelForCausalLM.from_pretrained(base_path)(ids).logits, atol=1e-3)

    again = cli("merge", lora_run, "--output", out)
    assert again.code == 1 and "already exists" in again.err
    assert cli("merge", lora_run, "--output", out, "--overwrite").code == 0


def test_merge_refuses_a_run_without_adapter_and_bad_lora_settings_are_clear(cli, finetuned, tiny_model, corpus):
    r = cli("merge", finetuned)
    assert r.code == 1 and "holds no LoRA adapter" in r.err
    bad = cli("finetune", tiny_model, "--data", corpus / "train.txt", "--lora", "--lora-targets", "q_proj", "--dry-run")
    assert bad.code == 1 and "--lora-targets q_proj" in bad.err and "c_attn" in bad.err
    assert "Traceback" not in bad.err
    scratch = cli("finetune", "--from-scratch", "--data", corpus / "train.txt", "--lora", "--dry-run")
    assert scratch.code == 1 and "cannot train a model --from-scratch" in scratch.err


def test_a_lora_run_resumes_exactly(cli, tiny_model, corpus, tmp_path, monkeypatch):
    args = [
        "finetune", tiny_model, "--data", corpus / "train.txt", "--block-size", "32", "--max-steps", "6",
        "--save-every", "1", "--log-every", "1", "--mixed-precision", "no", "--lora",
    ]  # fmt: skip
    straight = tmp_path / "straight"
    assert cli(*args, "--output", straight).code == 0
    stopped = tmp_path / "stopped"
    monkeypatch.setattr(checkpoint.torch, "save", _fail_after(3))  # the 4th checkpoint fails: the run stops
    assert cli(*args, "--output", stopped).code == 1
    monkeypatch.undo()
    assert (stopped / "checkpoints" / "step-0000003" / "adapter_model.safetensors").is_file()
    r = cli(*args, "--output", stopped, "--resume")
    assert r.code == 0, r.err

    def losses(run):
        return [e["loss"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in e]

    assert losses(stopped) == losses(straight)
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(stopped / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_head_gets_no_weight_gradient_and_the_same_hidden_gradient():
    torch.manual_seed(0)
    hidden = torch.randn(20, 8, requires_grad=True)
    weight = torch.randn(30, 8)  # frozen, as under LoRA
    targets = torch.randint(0, 30, (20,))
    loss.linear_cross_entropy(hidden, weight, targets).backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum").backward()
    assert torch.allclose(ours, hidden.grad, atol=1e-5)
    assert weight.grad is None


def test_a_lora_run_folder_works_in_a_transformers_pipeline(lora_run):
    from transformers import pipeline

    from lmtune.generate import Sampling, generate, load

    # transformers finds adapter_config.json, loads the base it names and the adapter (peft installed)
    pipe = pipeline("text-generation", model=str(lora_run))
    out = pipe("the cat", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    model, tok = load(str(lora_run))
    ours = generate(model, tok, ["the cat"], Sampling(max_new_tokens=6, temperature=0))[0][0]
    assert out == "the cat" + ours  # the same greedy text as lmtune's merged model


@pytest.mark.parametrize("where", ["the base", "a folder holding the base", "inside the base"])
def test_merge_never_writes_over_or_into_the_adapters_base(where, cli, tiny_model, corpus, tmp_path):
    import shutil

    base = tmp_path / "models" / "base"  # a copy: the session's tiny model must survive a failing test
    shutil.copytree(tiny_model, base)
    run = tmp_path / "lora"
    r = cli(
        "finetune", base, "--data", corpus / "train.txt", "--output", run, "--block-size", "32", "--max-steps", "1",
        "--lora",
    )  # fmt: skip
    assert r.code == 0, r.err
    before = sorted(p.name for p in base.iterdir())
    output = {"the base": base, "a folder holding the base": base.parent, "inside the base": base / "merged"}[where]
    r = cli("merge", run, "--output", output, "--overwrite")
    assert r.code == 1 and f"--output {output}" in r.err and "base model" in r.err, r.err
    assert sorted(p.name for p in base.iterdir()) == before
