"""Preference tuning (DPO): the data format, the loss against a hand computation, pair weighting, the reference
scored once (and equal to scoring it on the fly, and for LoRA to the base model), exact resume, and eval."""

import contextlib
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import WORDS, read_json, two_cpu_processes, write_jsonl
from safetensors.torch import load_file

from lmtune import batches, checkpoint, data, dpo, lora
from lmtune.config import Config


def pair_rows(n: int, seed: int) -> list[dict]:
    """Short prompts answered twice, answers of 1 to 6 words (so pairs weigh the same, not their tokens)."""
    r = random.Random(seed)
    return [
        {
            "prompt": " ".join(r.choices(WORDS, k=3)),
            "chosen": " ".join(r.choices(WORDS[:20], k=r.randint(1, 6))),
            "rejected": " ".join(r.choices(WORDS[20:], k=r.randint(1, 6))),
        }
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("prefs")
    write_jsonl(folder / "train.jsonl", pair_rows(32, seed=1))
    write_jsonl(folder / "valid.jsonl", pair_rows(6, seed=2))
    return folder


def args(model, prefs, out, *extra):
    return [
        "finetune", str(model), "--data", str(prefs / "train.jsonl"), "--validation-data", str(prefs / "valid.jsonl"),
        "--output", str(out), "--max-steps", "3", "--lr", "1e-3", "--dropout", "0", "--mixed-precision", "no",
        "--eval-every", "0", "--save-every", "0", "--seed", "7", "--log-every", "1", *extra,
    ]  # fmt: skip


def largest_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def differences(a: Path, b: Path) -> torch.Tensor:
    """Every weight's absolute difference between two runs' models."""
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- by an independent route: the text rendered by hand, each answer token's log-probability summed ----------


def answer_logp(model, tok, prompt: str, answer: str) -> tuple[float, int]:
    """Sum of log p(answer token | everything before it) and the answer's tokens, in float64, from the text
    lmtune's simple chat template writes (the prompt's tokens are a prefix of the whole's: checked)."""
    head = f"### Instruction:\n{prompt}\n\n### Response:\n"
    ids = tok(head + answer + tok.eos_token, add_special_tokens=False)["input_ids"]
    first = len(tok(head, add_special_tokens=False)["input_ids"])
    assert ids[:first] == tok(head, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(first, len(ids))), len(ids) - first


def test_dpo_figures_match_a_hand_computation(cli, tiny_model, prefs, tmp_path):
    from transformers import AutoTokenizer, GPT2LMHeadModel

    # A reference other than the starting model, so that the step-0 figures are not trivial.
    reference = tmp_path / "reference"
    ref_model = GPT2LMHeadModel.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for w in ref_model.parameters():
            w.add_(0.05 * torch.randn_like(w))
    ref_model.save_pretrained(reference)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(reference)
    out = tmp_path / "run"
    r = cli(*args(tiny_model, prefs, out, "--reference", reference, "--beta", "0.5", "--batch-size", "4"))
    assert r.code == 0, r.err
    assert "dpo loss" in r.out and "reward accuracy" in r.out

    tok = AutoTokenizer.from_pretrained(tiny_model)
    policy = GPT2LMHeadModel.from_pretrained(out).eval()
    ref_model.eval()
    losses, correct, margins, chosen, rejected = [], 0.0, [], [0.0, 0], [0.0, 0]
    for row in (json.loads(line) for line in (prefs / "valid.jsonl").read_text().splitlines()):
        pc, nc = answer_logp(policy, tok, row["prompt"], row["chosen"])
        pr, nr = answer_logp(policy, tok, row["prompt"], row["rejected"])
        rc, _ = answer_logp(ref_model, tok, row["prompt"], row["chosen"])
        rr, _ = answer_logp(ref_model, tok, row["prompt"], row["rejected"])
        margin = 0.5 * (pc - rc) - 0.5 * (pr - rr)
        losses.append(-math.log(1 / (1 + math.exp(-margin))))
        correct += 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0
        margins.append(margin)
        chosen = [chosen[0] + pc, chosen[1] + nc]
        rejected = [rejected[0] + pr, rejected[1] + nr]
    s = read_json(out / "summary.json")
    assert s["eval_dpo_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert s["eval_reward_accuracy"] == pytest.approx(correct / len(losses))
    assert s["eval_reward_margin"] == pytest.approx(sum(margins) / len(margins), rel=1e-4, abs=1e-6)
    assert s["eval_chosen_logp"] == pytest.approx(chosen[0] / chosen[1], rel=1e-5)
    assert s["eval_rejected_logp"] == pytest.approx(rejected[0] / rejected[1], rel=1e-5)
    assert s["eval_loss"] == pytest.approx(-chosen[0] / chosen[1], rel=1e-5)  # the chosen answers' NLL
    assert s["beta"] == 0.5 and str(reference) in s["reference"]
    assert "DPO loss" in (out / "README.md").read_text()


def test_step_0_is_the_reference_against_itself(cli, tiny_model, prefs, tmp_path):
    out = tmp_path / "run"
    assert cli(*args(tiny_model, prefs, out, "--max-steps", "1")).code == 0
    first = next(e for e in metrics(out) if e["event"] == "eval")
    assert first["step"] == 0 and "by construction" in first["baseline"]
    assert first["eval_dpo_loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["eval_reward_accuracy"] == 0.5 and first["eval_reward_margin"] == 0


def test_accumulated_micro_batches_train_the_same_model_as_one_batch(cli, tiny_model, prefs, tmp_path):
    """Each pair of a step weighs the same (the loss is their mean), whichever micro-batch it falls in."""
    one, four = tmp_path / "batch4", tmp_path / "batch1x4"
    assert cli(*args(tiny_model, prefs, one, "--batch-size", "4")).code == 0
    assert cli(*args(tiny_model, prefs, four, "--batch-size", "1", "--gradient-accumulation-steps", "4")).code == 0
    # The same gradients up to float rounding (padding to another length moves the last bit); AdamW's first
    # steps, about lr * sign(gradient), turn that into at most a few weights of 4e4 apart by more than 1e-6
    # (measured: 1, by 1.6e-5; the rest agree to 3e-7). A wrong weighting moves them all.
    diff = differences(one, four)
    assert diff.max() < 1e-4 and int((diff > 1e-6).sum()) <= 2, (diff.max(), int((diff > 1e-6).sum()))
    losses = [[e["loss"] for e in metrics(run) if e["event"] == "train"] for run in (one, four)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert losses[0][0] == pytest.approx(math.log(2))  # step 1: no dropout, the policy is still its reference


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(cli, tiny_model, prefs, tmp_path, lmtune_home):
    single = tmp_path / "single"
    assert cli(*args(tiny_model, prefs, single, "--batch-size", "4")).code == 0
    double = tmp_path / "double"
    proc = two_cpu_processes(args(tiny_model, prefs, double, "--batch-size", "2"), lmtune_home, port=29541)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = differences(single, double)
    assert diff.max() < 1e-4 and int((diff > 1e-6).sum()) <= 2, (diff.max(), int((diff > 1e-6).sum()))


def corpus_and_pairs(tiny_model, prefs, block_size=64):
    cfg = Config(model=str(tiny_model), data=str(prefs / "train.jsonl"), validation_data=str(prefs / "valid.jsonl"))
    plan = data.decide(cfg)
    tok = data.tokenizer_for(cfg, plan, lambda e: None)
    corpus = data.load_corpus(plan.sources[0], tok, lambda e: None)
    return tok, corpus, batches.Pairs(corpus.train, block_size)


def test_the_reference_scored_once_equals_scoring_it_on_the_fly(cli, tiny_model, prefs, tmp_path, lmtune_home):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "run"
    r = cli(*args(tiny_model, prefs, out, "--batch-size", "4"))
    assert r.code == 0, r.err
    [cached] = list((lmtune_home / "tokens" / "references").glob("*.npz"))
    with np.load(cached) as saved:
        train_ref = saved["arr_0"]
    tok, _, pairs = corpus_and_pairs(tiny_model, prefs)
    model = GPT2LMHeadModel.from_pretrained(tiny_model).eval()
    for i in range(len(pairs)):  # one pair at a time, no padding, the full logits: as a step would score it
        inputs, labels, _, _ = batches.pad_pairs([pairs[i]], tok.pad_token_id or 0)
        with torch.no_grad():
            logps, _ = dpo.side_logps(model, model, inputs, labels, False, contextlib.nullcontext)
        np.testing.assert_allclose(train_ref[pairs.pairs[i][0]], logps[0].double().numpy(), rtol=1e-5, atol=1e-5)
    # A second run reads the cache instead of scoring again.
    again = cli(*args(tiny_model, prefs, tmp_path / "again", "--batch-size", "4"))
    assert again.code == 0 and "scoring the reference" not in again.out + again.err


def test_lora_reference_is_the_base_model_with_the_adapter_off(tiny_model, prefs):
    from transformers import GPT2LMHeadModel

    tok, _, pairs = corpus_and_pairs(tiny_model, prefs)
    base = GPT2LMHeadModel.from_pretrained(tiny_model).eval()
    expected, _ = dpo.pair_logps(base, pairs, 4, tok.pad_token_id or 0, chunked=True)
    adapted = lora.add_adapter(GPT2LMHeadModel.from_pretrained(tiny_model), Config(model=str(tiny_model), lora=True))
    with torch.no_grad():  # a trained adapter: its B matrices no longer zero
        for name, w in adapted.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.5)
    on, _ = dpo.pair_logps(adapted, pairs, 4, tok.pad_token_id or 0, chunked=True)
    with adapted.disable_adapter():
        off, _ = dpo.pair_logps(adapted, pairs, 4, tok.pad_token_id or 0, chunked=True)
    np.testing.assert_allclose(off, expected, rtol=1e-6, atol=1e-6)
    assert np.abs(on - expected).max() > 1e-2  # the adapter does change them


def test_a_lora_dpo_run_trains_only_the_adapter(cli, tiny_model, prefs, tmp_path):
    out = tmp_path / "lora"
    r = cli(*args(tiny_model, prefs, out, "--lora", "--batch-size", "4", "--lr", "1e-2"))
    assert r.code == 0, r.err
    s = read_json(out / "summary.json")
    assert "adapter off" in s["reference"] and s["trainable_parameters"] < s["parameters"]
    assert s["eval_dpo_loss"] < math.log(2)


def test_the_chunked_log_probabilities_and_their_gradients_equal_the_full_logits(tiny_model, prefs):
    from transformers import GPT2LMHeadModel

    from lmtune import loss

    tok, _, pairs = corpus_and_pairs(tiny_model, prefs)
    inputs, labels, _, _ = batches.pad_pairs([pairs[i] for i in range(4)], tok.pad_token_id or 0)
    inputs, labels = inputs.flatten(0, 1), labels.flatten(0, 1)
    model = GPT2LMHeadModel.from_pretrained(tiny_model)
    weights = torch.randn(len(inputs))  # a different gradient for each sequence, as DPO gives
    grads = []
    for chunked in (True, False):
        model.zero_grad()
        logps = loss.token_logprobs(model, model, inputs, labels, chunked)
        (logps.sum(-1) * weights).sum().backward()
        grads.append((logps.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_resume_is_exact(cli, tiny_model, prefs, tmp_path, monkeypatch, lmtune_home):
    whole = tmp_path / "whole"
    extra = ("--batch-size", "4", "--max-steps", "6", "--save-every", "1")
    assert cli(*args(tiny_model, prefs, whole, *extra)).code == 0
    stopped = tmp_path / "stopped"
    real, calls = checkpoint.torch.save, []

    def fail_on_the_third(*a, **kw):
        calls.append(1)
        if len(calls) > 2 * 2:  # two files a checkpoint: stop while saving the third
            raise OSError(28, "No space left on device")
        return real(*a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", fail_on_the_third)
    assert cli(*args(tiny_model, prefs, stopped, *extra)).code == 1
    monkeypatch.undo()
    for cached in (lmtune_home / "tokens" / "references").glob("*.npz"):
        cached.unlink()  # resumed, the reference is scored again from the starting weights, not the checkpoint's
    r = cli(*args(tiny_model, prefs, stopped, *extra, "--resume"))
    assert r.code == 0, r.err
    assert largest_difference(whole, stopped) == 0
    losses = [{e["step"]: e["loss"] for e in metrics(run) if e["event"] == "train"} for run in (whole, stopped)]
    assert losses[0] == losses[1]


def test_bad_pairs_are_counted_and_skipped_or_refused(cli, tiny_model, tmp_path):
    good = pair_rows(12, seed=3)
    bad = [
        {"prompt": "a b", "chosen": "same", "rejected": "same"},  # chosen = rejected
        {"prompt": "a b", "chosen": "yes", "rejected": None},  # a side missing
        {"prompt": "a c", "chosen": "", "rejected": "no"},  # a side blank
    ]
    data_file = write_jsonl(tmp_path / "prefs.jsonl", good + bad)
    r = cli("finetune", tiny_model, "--data", data_file, "--output", tmp_path / "run", "--dry-run")
    assert r.code == 0, r.err
    assert "skipped 3: a side missing or blank, or chosen = rejected" in " ".join(r.out.split())
    only_bad = write_jsonl(tmp_path / "bad.jsonl", bad)
    r = cli("finetune", tiny_model, "--data", only_bad, "--output", tmp_path / "run2")
    assert r.code == 1 and r.err.startswith("error:") and "0 good preference pairs of 3" in r.err
    assert "Traceback" not in r.err and len(r.err.strip().splitlines()) == 1


def test_data_show_shows_a_pair_with_the_tokens_each_side_is_scored_on(cli, tiny_model, tmp_path):
    rows = [{"prompt": f"say {i}", "chosen": "good answer", "rejected": "bad"} for i in range(10)]
    data_file = write_jsonl(tmp_path / "prefs.jsonl", rows)
    r = cli("data", "show", data_file, "--model", tiny_model, "-n", "1")
    assert r.code == 0, r.err
    assert "preference data" in r.out and "pair 1 of" in r.out
    chosen, rejected = r.out.split("── pair 1 of")[1:3]

    def scored(side: str) -> str:
        return "".join(part.split("⟧")[0] for part in side.split("⟦")[1:]).replace("·", "")

    assert scored(chosen) == "good answer<|endoftext|>" and "say 0" in chosen.split("⟦")[0].replace("·", "")
    assert scored(rejected) == "bad<|endoftext|>"


def test_chat_messages_with_a_shared_prompt_are_scored_on_the_answers_only(tiny_model):
    """TRL's implicit-prompt format: chosen and rejected as whole conversations; the turns they share are the
    prompt (an assistant turn in it included), and only what follows is scored."""
    from transformers import AutoTokenizer

    from lmtune.data.rows import pair

    turns = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"},
    ]
    p = pair(
        None,
        [*turns, {"role": "assistant", "content": "good answer"}],
        [*turns, {"role": "assistant", "content": "bad"}],
        "t",
        1,
    )
    assert p.prompt == turns and p.bad is None
    tok = AutoTokenizer.from_pretrained(tiny_model)
    encoded = data.encode([p], tok, lambda e: None, "pairs")
    assert encoded.sides == 2 and len(encoded.ids) == 2
    answers = [tok.decode(ids[mask]) for ids, mask in zip(encoded.ids, encoded.masks, strict=True)]
    assert answers == ["good answer<|endoftext|>", "bad<|endoftext|>"]
    assert pair("q", "same", "same", "t", 1).bad == "chosen = rejected"
    assert pair("q", "yes", None, "t", 1).bad == "no rejected answer"
    assert pair(None, "yes", "no", "t", 1).bad == "no prompt"


def test_preference_data_cannot_be_mixed_with_text(cli, tiny_model, prefs, corpus, tmp_path):
    r = cli(
        "finetune", tiny_model, "--data", prefs / "train.jsonl", "--data", corpus / "train.txt",
        "--output", tmp_path / "run", "--dry-run",
    )  # fmt: skip
    assert r.code == 1 and "mix preference sources only with each other" in r.err


def test_eval_compares_models_on_pairs_without_a_reference(cli, tiny_model, prefs, tmp_path):
    out = tmp_path / "run"
    assert cli(*args(tiny_model, prefs, out, "--batch-size", "4", "--max-steps", "8", "--lr", "3e-3")).code == 0
    r = cli("eval", tiny_model, out, "--data", prefs / "valid.jsonl", "--json")
    assert r.code == 0, r.err
    base, tuned = json.loads(r.out)
    assert base["pairs"] == tuned["pairs"] == 6
    assert tuned["pair_margin"] > base["pair_margin"]
    table = cli("eval", tiny_model, out, "--data", prefs / "valid.jsonl")
    assert table.code == 0 and "Preference pairs of" in table.out, table.err


def test_the_dpo_recipe_follows_supervised_fine_tuning(cli, tiny_model, prefs, tmp_path):
    """The shipped recipes, SFT then DPO from that run, with the tiny model's short settings in place of GPT-2's."""
    chat = write_jsonl(
        tmp_path / "chat.jsonl", [{"prompt": r["prompt"], "response": r["chosen"]} for r in pair_rows(32, 4)]
    )
    sft = tmp_path / "sft"
    short = ("--block-size", "64", "--batch-size", "8", "--mixed-precision", "no")
    r = cli(
        "finetune", tiny_model, "--recipe", "gpt2-instruct", "--data", chat, "--output", sft, "--max-steps", "4", *short
    )
    assert r.code == 0, r.err
    out = tmp_path / "dpo"
    r = cli(
        "finetune", sft, "--recipe", "gpt2-dpo", "--data", prefs / "train.jsonl", "--validation-data",
        prefs / "valid.jsonl", "--output", out, "--max-steps", "8", "--lr", "3e-3", *short,
    )  # fmt: skip
    assert r.code == 0, r.err
    evals = [e for e in metrics(out) if e["event"] == "eval"]
    assert evals[0]["eval_dpo_loss"] == pytest.approx(math.log(2)) and "by construction" in evals[0]["baseline"]
    assert evals[-1]["eval_dpo_loss"] < math.log(2) and evals[-1]["eval_reward_margin"] > 0
    assert str(sft) in read_json(out / "summary.json")["reference"]


def test_eval_of_a_dpo_run_scores_its_chosen_answers_as_training_did(cli, tiny_model, prefs, tmp_path):
    out = tmp_path / "run"
    assert cli(*args(tiny_model, prefs, out, "--batch-size", "4")).code == 0
    r = cli("eval", out, "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["loss"] == pytest.approx(read_json(out / "summary.json")["eval_loss"], rel=1e-5)


def test_two_preference_sources_mix_by_weight_with_their_own_figures(cli, tiny_model, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", pair_rows(40, seed=5))
    b = write_jsonl(tmp_path / "b.jsonl", pair_rows(40, seed=6))
    out = tmp_path / "mixed"
    r = cli(
        "finetune", tiny_model, "--data", a, "--data", b, "--data-weights", "3,1", "--output", out, "--max-steps", "6",
        "--batch-size", "4", "--mixed-precision", "no", "--eval-every", "3", "--report-to", "tensorboard",
    )  # fmt: skip
    assert r.code == 0, r.err
    s = read_json(out / "summary.json")
    shares = [src["train_tokens"] / s["train_tokens"] for src in s["sources"]]
    assert shares[0] == pytest.approx(0.75, abs=0.1)
    last = [e for e in metrics(out) if e["event"] == "eval"][-1]
    assert [one["name"] for one in last["sources"]] == ["a.jsonl", "b.jsonl"]
    assert all("eval_reward_accuracy" in one and "eval_dpo_loss" in one for one in last["sources"])
    assert last["eval_pairs"] > 0
    # TensorBoard: the DPO figures, of the whole and of each source
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "lmtune")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"eval_dpo_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_reward_accuracy/b.jsonl"} <= tags
    assert events.Scalars("eval_dpo_loss")[0].value == pytest.approx(math.log(2), abs=1e-6)
