"""`make bench-compile`: lmtune eager against `--compile` on make bench's fine-tuning job, on this machine.

Needs make bench's base model (bench/out/base; `make bench` makes it). Each configuration runs in its own
process, ROUNDS times interleaved: bf16 (this CPU's default where it has bf16 units) and fp32, each eager
and with --compile. Tokens/s is one batch over the median step time after WARM steps (compiling is in the
first step, shown on its own); eval loss is the run's final validation loss. Writes bench/out/compile.json.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # make bench's job: its shape, data and run helpers

ROUNDS = 2
WARM = 5  # first steps left out of the median: compiling, allocator growth
CONFIGS = {
    "bf16": ["--mixed-precision", "bf16"],
    "bf16 --compile": ["--mixed-precision", "bf16", "--compile"],
    "fp32": ["--mixed-precision", "no"],
    "fp32 --compile": ["--mixed-precision", "no", "--compile"],
}


def main() -> None:
    if not (bench.OUT / "base" / "model.safetensors").is_file():
        raise SystemExit("no base model in bench/out/base: run `make bench` first")
    os.environ["LMTUNE_HOME"] = str(bench.OUT / "home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for _ in range(ROUNDS):
        for name, flags in CONFIGS.items():
            out = bench.OUT / ("compile-" + name.replace(" --", "-"))
            job = bench.finetune_job(name, out, *flags)
            summary = json.loads((out / "summary.json").read_text())
            steps = job["step_seconds"]
            rounds[name].append({"first_step": steps[0], "steps": steps[WARM:], "eval_loss": summary["eval_loss"]})
    results: dict[str, dict[str, Any]] = {}
    for name, rs in rounds.items():
        steps = sorted(s for r in rs for s in r["steps"])
        results[name] = {
            "tokens_per_second": bench.BATCH * bench.BLOCK / steps[len(steps) // 2],
            "first_step_seconds": [round(r["first_step"], 1) for r in rs],
            "eval_loss": statistics.mean(r["eval_loss"] for r in rs),
        }
    for precision in ("bf16", "fp32"):
        eager, compiled = results[precision], results[precision + " --compile"]
        compiled["vs_eager"] = compiled["tokens_per_second"] / eager["tokens_per_second"]
        compiled["eval_loss_vs_eager"] = compiled["eval_loss"] / eager["eval_loss"] - 1
    (bench.OUT / "compile.json").write_text(json.dumps(results, indent=1))
    for name, r in results.items():
        extra = f"  {r['vs_eager']:.2f}x eager, eval loss {r['eval_loss_vs_eager']:+.4%}" if "vs_eager" in r else ""
        first = ", ".join(f"{s:.1f}" for s in r["first_step_seconds"])
        print(
            f"{name:16} {r['tokens_per_second']:8,.0f} tok/s  first step {first} s  eval loss {r['eval_loss']:.4f}{extra}"
        )


if __name__ == "__main__":
    main()
