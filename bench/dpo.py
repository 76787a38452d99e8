"""`make bench-dpo`: lmtune's DPO against TRL's DPOTrainer at equal settings, measured in one run.

The job: a 4-layer 256-wide GPT-2 shaped model (random weights, dropout 0, lmtune's chat template saved with
its tokenizer) learns which of two answers to prefer: synthetic pairs whose chosen answers are drawn from one
set of words and rejected ones from another, prompt and answers rendered by the same template on both sides.
Both tools: the same model folder, pairs, order-independent settings (batch 8, STEPS steps, beta 0.1, lr,
constant schedule, no warmup, fp32 on CPU), the reference = the starting model. TRL runs in its own
environment (bench/out/trl-venv, made here on first use); it is never a dependency of lmtune.

Measured, each in its own process one after another: wall seconds of the whole command, the training loop's
seconds (lmtune: summary.json train_seconds plus reference_seconds, the one reference pass before step 1;
TRL: train_runtime, which holds its reference forwards, or with precompute_ref_log_probs its pass), and
the reward accuracy on the same held-out pairs (TRL's eval_rewards/accuracies; lmtune's eval_reward_accuracy,
where a tie would count half: after training there are none). Tokens/s = pairs trained x mean tokens a pair
(both sides, prompt included) / seconds. Prints a table, writes bench/out/dpo.json.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "dpo"
TRL_VENV = ROOT / "bench" / "out" / "trl-venv"
# TRL and the libraries it runs on, pinned to the versions lmtune runs on (torch's CPU wheel: see Makefile).
TRL_PACKAGES = ["torch==2.13.0", "trl==1.16.0", "transformers==5.25.0", "datasets==5.2.0", "accelerate==1.16.0"]
PY = sys.executable

SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 256, "n_positions": 256}  # about 5M parameters with its vocabulary
TRAIN_PAIRS, TEST_PAIRS = 800, 100
BATCH = 8  # pairs per step
STEPS = 100  # one epoch of the 800 pairs: each pair's reference scored once by either tool
LR = 5e-4
BETA = 0.1
MAX_LENGTH = 128  # tokens a side; every pair here is shorter
ROUNDS = 2  # runs of each tool, interleaved

GOOD = ["bright", "clear", "kind", "careful", "honest", "useful", "exact", "calm", "gentle", "warm"]
BAD = ["dull", "vague", "rude", "sloppy", "false", "useless", "rough", "loud", "harsh", "cold"]
TOPICS = [
    "river",
    "stone",
    "cloud",
    "garden",
    "engine",
    "letter",
    "window",
    "forest",
    "market",
    "bridge",
    "lamp",
    "harbor",
]

console = Console(width=150)


def pairs(n: int, seed: int) -> list[dict[str, str]]:
    r = random.Random(seed)
    return [
        {
            "prompt": f"Describe the {r.choice(TOPICS)} near the {r.choice(TOPICS)}.",
            "chosen": " ".join(r.choices(GOOD, k=r.randint(3, 8))) + ".",
            "rejected": " ".join(r.choices(BAD, k=r.randint(3, 8))) + ".",
        }
        for _ in range(n)
    ]


def make_job() -> Path:
    """The base model folder (with the chat template) and the pairs, as JSONL for lmtune and for TRL."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from lmtune.data import SIMPLE_TEMPLATE

    OUT.mkdir(parents=True, exist_ok=True)
    train, test = pairs(TRAIN_PAIRS, 1), pairs(TEST_PAIRS, 2)
    for name, rows in (("train", train), ("test", test)):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        # TRL's conversational preference format: the same text once its chat template renders it.
        conv = [
            {
                "prompt": [{"role": "user", "content": r["prompt"]}],
                "chosen": [{"role": "assistant", "content": r["chosen"]}],
                "rejected": [{"role": "assistant", "content": r["rejected"]}],
            }
            for r in rows
        ]
        (OUT / f"{name}-trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in conv))
    base = OUT / "base"
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [f"### Instruction:\n{r['prompt']}\n\n### Response:\n{r['chosen']} {r['rejected']}" for r in train]
    bpe.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.chat_template = SIMPLE_TEMPLATE
    tok.save_pretrained(base)
    config = GPT2Config(
        **SHAPE, vocab_size=len(tok), bos_token_id=0, eos_token_id=0, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(base)
    return base


TRL_SCRIPT = """
import json, sys, time
from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

out, base, precompute, job = sys.argv[1], sys.argv[2], sys.argv[3] == "1", json.loads(sys.argv[4])
model = AutoModelForCausalLM.from_pretrained(base)
tok = AutoTokenizer.from_pretrained(base)
data = load_dataset("json", data_files={"train": f"{out}/train-trl.jsonl", "test": f"{out}/test-trl.jsonl"})
args = DPOConfig(
    output_dir=f"{out}/trl-run", per_device_train_batch_size=job["batch"], per_device_eval_batch_size=job["batch"],
    max_steps=job["steps"], learning_rate=job["lr"], beta=job["beta"], lr_scheduler_type="constant", warmup_steps=0,
    weight_decay=0.01, max_grad_norm=1.0, max_length=job["max_length"], use_cpu=True, bf16=False, fp16=False,
    logging_steps=10, save_strategy="no", eval_strategy="no", report_to=[], seed=42,
    precompute_ref_log_probs=precompute, dataloader_num_workers=0,
)
trainer = DPOTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["test"], processing_class=tok)
result = trainer.train()
metrics = trainer.evaluate()
print(json.dumps({"train_runtime": result.metrics["train_runtime"], **metrics}))
"""
JOB = {"batch": BATCH, "steps": STEPS, "lr": LR, "beta": BETA, "max_length": MAX_LENGTH}


def trl_python() -> Path:
    """TRL's own environment: a venv under bench/out/, made once, with TRL and the same library versions."""
    python = TRL_VENV / "bin" / "python"
    if not (TRL_VENV / ".installed").is_file():
        console.print(f"[dim]installing {' '.join(TRL_PACKAGES)} into {TRL_VENV} (once)[/]")
        subprocess.run([sys.executable, "-m", "venv", str(TRL_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
        (TRL_VENV / ".installed").touch()
    return python


def timed(name: str, cmd: list[Any], env: dict[str, str] | None = None) -> tuple[str, str, float]:
    console.print(f"[dim]{name}: {' '.join(map(str, cmd))}[/]")
    start = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - start
    if proc.returncode:
        console.print(proc.stderr[-3000:], markup=False)
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    return proc.stdout, proc.stderr, wall


def lmtune_run(base: Path) -> dict[str, Any]:
    run = OUT / "lmtune-run"
    env = {"LMTUNE_HOME": str(OUT / "lmtune-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    subprocess.run(["rm", "-rf", str(OUT / "lmtune-home")], check=True)  # the reference scored in this run
    lmtune = Path(PY).with_name("lmtune")
    cmd = [
        lmtune, "finetune", base, "--data", OUT / "train.jsonl", "--validation-data", OUT / "test.jsonl",
        "--output", run, "--overwrite", "--batch-size", BATCH, "--max-steps", STEPS, "--lr", LR, "--beta", BETA,
        "--schedule", "constant", "--warmup-ratio", 0, "--mixed-precision", "no", "--eval-every", 0,
        "--save-every", 0, "--block-size", MAX_LENGTH, "--log-every", 10,
    ]  # fmt: skip
    _, _, wall = timed("lmtune", cmd, env)
    s = json.loads((run / "summary.json").read_text())
    pairs_trained = STEPS * BATCH
    return {
        # the loop, and the one reference pass before it (TRL's loop holds its reference forwards)
        "wall": wall, "loop": s["train_seconds"] + s["reference_seconds"], "pairs": pairs_trained,
        "tokens": s["train_tokens"], "reference_seconds": s["reference_seconds"],
        "accuracy": s["eval_reward_accuracy"], "margin": s["eval_reward_margin"],
    }  # fmt: skip


def trl_run(base: Path, precompute: bool) -> dict[str, Any]:
    python = trl_python()
    out, _, wall = timed(
        f"TRL DPOTrainer{' (precompute_ref_log_probs)' if precompute else ''}",
        [python, "-c", TRL_SCRIPT, OUT, base, "1" if precompute else "0", json.dumps(JOB)],
        {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    m = json.loads(out.strip().splitlines()[-1])
    return {
        "wall": wall, "loop": m["train_runtime"], "pairs": STEPS * BATCH,
        "accuracy": m["eval_rewards/accuracies"], "margin": m["eval_rewards/margins"] / 1.0,
    }  # fmt: skip


def main() -> None:
    base = make_job()
    # Interleaved rounds, each tool's best kept: on a shared machine other work only ever slows a run down.
    runs: dict[str, list[dict[str, Any]]] = {"lmtune": [], "TRL": [], "TRL, precomputed reference": []}
    for _ in range(ROUNDS):
        runs["lmtune"].append(lmtune_run(base))
        runs["TRL"].append(trl_run(base, False))
        runs["TRL, precomputed reference"].append(trl_run(base, True))
    results = {name: min(rs, key=lambda r: r["wall"]) | {"walls": [r["wall"] for r in rs]} for name, rs in runs.items()}
    tokens_per_pair = results["lmtune"]["tokens"] / results["lmtune"]["pairs"]  # the same pairs, the same tokens
    table = Table(
        title=f"DPO, {STEPS} steps of {BATCH} pairs ({tokens_per_pair:.1f} tokens a pair), fp32 on CPU, best of {ROUNDS}"
    )
    for col in (
        "",
        "wall s (each round)",
        "loop s",
        "tokens/s (wall)",
        "tokens/s (loop)",
        "held-out reward accuracy",
        "margin",
    ):
        table.add_column(col, justify="left" if not col else "right")
    for name, r in results.items():
        r["tokens_per_second_wall"] = r["pairs"] * tokens_per_pair / r["wall"]
        r["tokens_per_second_loop"] = r["pairs"] * tokens_per_pair / r["loop"]
        table.add_row(
            name, " / ".join(f"{w:.1f}" for w in r["walls"]), f"{r['loop']:.1f}", f"{r['tokens_per_second_wall']:,.0f}",
            f"{r['tokens_per_second_loop']:,.0f}", f"{r['accuracy']:.3f}", f"{r['margin']:.3f}",
        )  # fmt: skip
    console.print(table)
    for name in ("TRL", "TRL, precomputed reference"):
        ratio = results["lmtune"]["tokens_per_second_wall"] / results[name]["tokens_per_second_wall"]
        loop = results["lmtune"]["tokens_per_second_loop"] / results[name]["tokens_per_second_loop"]
        console.print(f"lmtune / {name}: {ratio:.2f}x end to end, {loop:.2f}x in the training loop")
    (OUT / "dpo.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
