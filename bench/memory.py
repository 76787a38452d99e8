"""`make bench-memory`: the peak memory of one fine-tuning job five ways, each beside its dry run's figure.

The job: a GPT-2-small-shaped model (12 layers, 12 heads, 768 wide, GPT-2's 50,304-row embedding: 124M
parameters) with random weights (nothing is downloaded), fine-tuned for --steps steps of --batch x --block
tokens on generated text, in float32 (--mixed-precision no: the same on every machine). Each configuration
runs in its own process, first `--dry-run`, then the real run:

    full fine-tune | + --gradient-checkpointing | --optimizer adamw-8bit | --lora | --lora --quantize 4bit

and then, where activations dominate (--big-batch rows of --block tokens), full fine-tuning with and
without --gradient-checkpointing.

On a CPU the figure is the process's peak resident memory (getrusage), with glibc's
MALLOC_MMAP_THRESHOLD_=65536 so that large freed buffers go back to the system instead of staying in
malloc's pools, where they would hide what was freed; on a CUDA GPU it is torch.cuda.max_memory_allocated.
Both are what lmtune reports (summary.json's peak_rss_bytes / peak_gpu_memory_bytes; the dry run's plan).

    python3 bench/memory.py                     # about 30 minutes on 2 busy CPU cores
    python3 bench/memory.py --tiny              # 2 layers, 64 wide: the same code path in a minute
Writes bench/out/memory/results.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
WORDS = "the cat dog bird sat ran on under over a mat log tree red blue green big small happy sad rain sun".split()  # noqa: SIM905
CONFIGS = {
    "full fine-tune": [],
    "+ checkpointing": ["--gradient-checkpointing"],
    "8-bit AdamW": ["--optimizer", "adamw-8bit"],
    "LoRA": ["--lora"],
    "QLoRA (4-bit base)": ["--lora", "--quantize", "4bit"],
}


def write_text(path: Path, documents: int, seed: int) -> Path:
    r = random.Random(seed)
    docs = (" ".join(r.choice(WORDS) for _ in range(r.randint(40, 120))) + "." for _ in range(documents))
    path.write_text("\n\n".join(docs) + "\n")
    return path


def build_base(folder: Path, tiny: bool) -> int:
    """A GPT-2-small-shaped model with random weights and a small BPE, saved as a model folder."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmtune.model import train_tokenizer

    tok = train_tokenizer([" ".join(WORDS)] * 10, 300)
    shape = dict(n_layer=2, n_head=2, n_embd=64) if tiny else dict(n_layer=12, n_head=12, n_embd=768)
    config = GPT2Config(**shape, n_positions=1024, vocab_size=50304, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def child(args: list[str]) -> None:
    """In its own process: the dry run of `lmtune finetune ARGS`, its plan as one JSON line."""
    import logging

    from lmtune import config, display
    from lmtune.train import finetune

    display.quiet_libraries()
    logging.getLogger("lmtune").setLevel(logging.WARNING)
    model, *rest = args
    flags: dict[str, Any] = {"model": model}
    i = 0
    while i < len(rest):  # --key value, or --flag
        key = rest[i].removeprefix("--").replace("-", "_")
        if i + 1 < len(rest) and not rest[i + 1].startswith("--"):
            flags[key], i = rest[i + 1], i + 2
        else:
            flags[key], i = True, i + 1
    plan = finetune(config.build(None, flags), dry_run=True)
    print(json.dumps({"peak": plan["memory"]["peak"], "memory": plan["memory"]}, default=str))


def measure(
    name: str, base: Path, data: Path, out: Path, a: argparse.Namespace, extra: list[str], batch: int, steps: int
) -> dict[str, Any]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "LMTUNE_HOME": str(out / "home")}
    common = [
        str(base), "--data", str(data / "train.txt"), "--validation-data", str(data / "valid.txt"),
        "--block-size", str(a.block), "--batch-size", str(batch), "--max-steps", str(steps),
        "--mixed-precision", "no", "--eval-every", "0", "--save-every", "0", *extra,
    ]  # fmt: skip
    dry = subprocess.run(
        [sys.executable, __file__, "--child", *common], capture_output=True, text=True, env=env, timeout=1800
    )
    if dry.returncode:
        return {"name": name, "error": "dry run: " + dry.stderr.strip()[-500:]}
    planned = json.loads(dry.stdout.strip().splitlines()[-1])
    folder = out / "runs" / f"{name.replace(' ', '-').replace('(', '').replace(')', '')}-batch{batch}"
    start = time.time()
    real = subprocess.run(
        [sys.executable, "-m", "lmtune", "finetune", *common, "--output", str(folder), "--overwrite"],
        capture_output=True, text=True, env=env, timeout=3600,
    )  # fmt: skip
    if real.returncode:
        return {"name": name, "error": "run: " + real.stderr.strip()[-500:]}
    summary = json.loads((folder / "summary.json").read_text())
    peak = summary.get("peak_gpu_memory_bytes") or summary["peak_rss_bytes"]
    return {
        "name": name, "flags": extra, "peak": peak, "dry_run_peak": planned["peak"], "parts": planned["memory"],
        "dry_vs_real": planned["peak"] / peak - 1, "seconds": time.time() - start, "eval_loss": summary["eval_loss"],
    }  # fmt: skip


def table(results: list[dict[str, Any]], device: str) -> str:
    fulls = {r["name"]: r["peak"] for r in results if r["name"].startswith("full fine-tune") and "peak" in r}
    lines = [
        f"| configuration ({device}) | peak MB | vs full | dry run MB (off by) | weights | gradients | "
        "optimizer states | activations |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | failed: {r['error'][:120]} | | | | | | |")
            continue
        p = r["parts"]
        mb = [f"{p[k] / 1e6:,.0f}" for k in ("weights", "gradients", "optimizer_states", "activations")]
        batch = r["name"].partition(", ")[2]  # each compared with the full fine-tune of its own batch
        full = fulls.get(f"full fine-tune, {batch}" if batch else "full fine-tune")
        ratio = f"{r['peak'] / full:.0%}" if full else ""
        lines.append(
            f"| {r['name']} | {r['peak'] / 1e6:,.0f} | {ratio} | {r['dry_run_peak'] / 1e6:,.0f} "
            f"({r['dry_vs_real']:+.1%}) | " + " | ".join(mb) + " |"
        )
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="2 layers, 64 wide: a smoke test of the same path")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--big-batch", type=int, default=16, help="rows where activations dominate; 0 skips that table")
    p.add_argument("--only", action="append", help="configurations to run, by name (default: all)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "memory")
    a = p.parse_args()
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU, peak RSS"
    a.out.mkdir(parents=True, exist_ok=True)
    base, data = a.out / "base", a.out / "data"
    data.mkdir(exist_ok=True)
    parameters = build_base(base, a.tiny)
    write_text(data / "train.txt", 400 if a.tiny else 1500, seed=1)
    write_text(data / "valid.txt", 10, seed=2)
    print(
        f"model: {parameters / 1e6:.1f}M parameters; batch {a.batch} x {a.block} tokens, {a.steps} steps, fp32; {device}"
    )
    runs = [(name, extra, a.batch, a.steps) for name, extra in CONFIGS.items()]
    big = [("full fine-tune", []), ("+ checkpointing", ["--gradient-checkpointing"])] if a.big_batch else []
    # As many steps as the others: from the second on, AdamW's states are held through the passes, and the
    # dry run's figure is that peak (a one-step run never holds them during a pass: measured 15.7% under it).
    runs += [(f"{name}, batch {a.big_batch}", extra, a.big_batch, a.steps) for name, extra in big]
    results = []
    for name, extra, batch, steps in runs:
        if a.only and name not in a.only:
            continue
        r = measure(name, base, data, a.out, a, extra, batch, steps)
        results.append(r)
        print(r["name"], "failed: " + r["error"] if "error" in r else f"peak {r['peak'] / 1e6:,.0f} MB", flush=True)
        record = {"device": device, "parameters": parameters, "settings": vars(a), "results": results}
        (a.out / "results.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(table(results, device))


if __name__ == "__main__":
    main()
