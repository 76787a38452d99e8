"""`make bench-packing`: instruction tuning with conversations packed into rows against one per row, padded.

The data: Tiny Shakespeare's dialogue as an instruction set (one speaker's speech is the prompt, the next
speaker's the response: from a few tokens to several hundred), built under bench/out/packing/, never
committed. The model: a small GPT-2 shape trained from scratch with its own BPE (no download). Both
runs see the same conversations for one epoch with about the same real tokens per optimizer step (the
padded run takes `BATCH` conversations a step, the packed run as many rows as hold as many), so their
optimization is comparable. Printed: real tokens per second (padding not counted), training time, the
final evaluation loss, and the time each took to reach the padded run's final loss (within 1%).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LMTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "bench" / "out" / "packing"
BLOCK = 512  # tokens per row: the longest conversations are cut here
BATCH = 16  # conversations per step, padded run
CONVERSATIONS = 1200  # the first ones of the play: one epoch is about 70 steps, a few minutes on 2 cores
SHAPE = ["n_layer=2", "n_head=4", "n_embd=128", f"n_positions={BLOCK}", "vocab_size=4096"]


def dialogue(path: Path) -> list[dict[str, str]]:
    """Consecutive speeches of Tiny Shakespeare as prompt/response pairs (speaker names dropped)."""
    speeches = []
    for block in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        lines = block.strip().splitlines()
        if len(lines) >= 2 and lines[0].endswith(":"):
            speeches.append(" ".join(line.strip() for line in lines[1:]))
    return [{"prompt": a, "response": b} for a, b in itertools.pairwise(speeches)]


def finetune(name: str, data: Path, *extra: str) -> dict[str, Any]:
    out = OUT / name
    cmd = [
        sys.executable, "-m", "lmtune", "finetune", "--from-scratch", "--data", str(data / "train.jsonl"),
        "--validation-data", str(data / "valid.jsonl"), "--output", str(out), "--overwrite", "--block-size",
        str(BLOCK), "--epochs", "1", "--lr", "1e-3", "--log-every", "1", "--mixed-precision", "no", "--seed", "0",
        *extra, *SHAPE,
    ]  # fmt: skip
    env = {**os.environ, "LMTUNE_HOME": str(OUT / "home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    print(f"{name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "summary.json").read_text())
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary["evals"] = [e for e in events if e["event"] == "eval"]
    summary["elapsed"] = {e["step"]: e["elapsed"] for e in events if e["event"] == "train"}
    return summary


def seconds_to(run: dict[str, Any], target: float) -> float | None:
    """Training seconds until an evaluation first reached `target` (None: never)."""
    for e in run["evals"]:
        if e["step"] and e["eval_loss"] <= target:
            return float(run["elapsed"][e["step"]])
    return None


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    pairs = dialogue(SHARED / "tinyshakespeare" / "input.txt")[:CONVERSATIONS]
    held = len(pairs) // 20
    for name, rows in (("train", pairs[held:]), ("valid", pairs[:held])):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    padded = finetune("padded", OUT, "--no-packing", "--batch-size", str(BATCH), "--eval-every", "20")
    per_row = padded["conversations"] / dry_rows(OUT)  # conversations per packed row
    packed_batch = max(1, round(BATCH / per_row))
    packed = finetune("packed", OUT, "--packing", "--batch-size", str(packed_batch), "--eval-every", "20")

    target = padded["eval_loss"] * 1.01
    table = Table(title="Packing (same machine, same data, one epoch)", title_justify="left")
    for col in ("run", "rows/step", "steps", "real tok/s", "train s", "final eval loss", f"s to loss {target:.3f}"):
        table.add_column(col, justify="right" if col != "run" else "left")
    for name, run, batch in (("padded, one per row", padded, BATCH), ("packed", packed, packed_batch)):
        reached = seconds_to(run, target)
        table.add_row(
            name, str(batch), str(run["steps"]), f"{run['tokens_per_second']:,.0f}", f"{run['train_seconds']:.1f}",
            f"{run['eval_loss']:.4f}", f"{reached:.1f}" if reached is not None else "not reached",
        )  # fmt: skip
    Console(width=150).print(table)
    speed = packed["tokens_per_second"] / padded["tokens_per_second"]
    loss_change = packed["eval_loss"] / padded["eval_loss"] - 1
    print(
        f"packed / padded: {speed:.2f}x real tokens/s; final eval loss {loss_change:+.2%}; "
        f"{padded['conversations']:,} conversations, {per_row:.1f} per packed row of {BLOCK}"
    )
    (OUT / "results.json").write_text(json.dumps({"padded": padded, "packed": packed}, indent=2))


def dry_rows(data: Path) -> int:
    """Rows the training data packs into (a dry run's plan, with the padded run's model and tokenizer)."""
    proc = subprocess.run(
        [
            sys.executable, "-c",
            "import json, sys\n"
            "from lmtune.config import Config\nfrom lmtune.train import finetune\n"
            "cfg = Config.model_validate_json(sys.argv[1])\n"
            "print(json.dumps(finetune(cfg, dry_run=True, report=lambda e: None)['blocks']))",
            json.dumps({
                "model": str(OUT / "padded"), "data": str(data / "train.jsonl"),
                "validation_data": str(data / "valid.jsonl"), "block_size": BLOCK, "packing": True,
            }),
        ],
        env={**os.environ, "LMTUNE_HOME": str(OUT / "home"), "HF_HUB_OFFLINE": "1"}, capture_output=True,
        text=True, check=True,
    )  # fmt: skip
    return int(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
