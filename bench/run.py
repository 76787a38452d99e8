"""`make bench`: lmtune against the Hugging Face Trainer and a bare PyTorch loop, measured in one run.

The job (issue 3): a small GPT-2 shaped model pretrained by lmtune on Tiny Shakespeare, fine-tuned on
WikiText-2 valid.txt, evaluated on the start of test.txt. Every measurement runs in its own process
(peak memory is that process's maximum resident set size) one after another, so the ratios in the
table come from the same machine in the same minutes. Prints one table, writes bench/out/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LMTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "bench" / "out"
PY = sys.executable

# The job. Small enough that the whole benchmark fits in 10 minutes on 2 CPU cores.
SHAPE = ["--n-layer", "4", "--n-head", "4", "--n-embd", "256", "--n-positions", "256"]  # 5.3M parameters
BLOCK = 256  # tokens per sequence
BATCH = 8  # sequences per step
PRETRAIN_STEPS = 40  # base model: 40 x 16 x 256 tokens of Shakespeare
STEPS = 40  # fine-tuning steps: 82k tokens of WikiText-2 valid
LR = 5e-4
WEIGHT_DECAY = 0.01
WARMUP = 2  # steps: lmtune's default warmup_ratio 0.05 of 40
ROUNDS = 2  # runs of each fine-tuning configuration
EVAL_LINES = 0.15  # share of test.txt's lines evaluated on (its start), to keep each evaluation short

console = Console(width=150)


def run(
    name: str, cmd: list[Any], env: dict[str, str] | None = None, cwd: Path | None = None
) -> tuple[str, float, float]:
    """Run one measurement in a fresh process: what it printed, its wall seconds and its peak RSS in MB."""
    console.print(f"[dim]{name}: {' '.join(map(str, cmd))}[/]")
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "stdout.txt", "w+") as out, open(OUT / "stderr.txt", "w+") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=out, stderr=err, env={**os.environ, **(env or {})}, cwd=cwd
        )
        # wait4 gives this child's own resource usage, so each peak belongs to one measurement.
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0), err.seek(0)
        text, errors = out.read(), err.read()
    if proc.returncode:
        console.print(errors[-3000:], markup=False)
        raise SystemExit(f"{name} failed (exit {proc.returncode})")
    return text, wall, usage.ru_maxrss / 1024  # ru_maxrss is in KiB on Linux


def last_json(text: str) -> Any:
    return json.loads(text.strip().splitlines()[-1])


def lmtune(*args: Any) -> list[Any]:
    return [PY, "-m", "lmtune", *args]


def finetune_job(name: str, out: Path, *extra: Any, cwd: Path | None = None) -> dict[str, Any]:
    """lmtune on the job; its figures come from the run's summary.json (training time excludes evaluation).
    cwd: a folder holding another version's lmtune package, which `python -m` then imports instead."""
    _, wall, peak = run(
        name,
        lmtune(
            "finetune", OUT / "base", "--data", SHARED / "wikitext-2" / "valid.txt",
            "--validation-data", OUT / "test-part.txt", "--txt-documents", "line",
            "--block-size", BLOCK, "--batch-size", BATCH, "--max-steps", STEPS, "--lr", LR,
            "--weight-decay", WEIGHT_DECAY, "--eval-every", 0, "--log-every", 1, "--output", out, "--overwrite", *extra,
        ),
        cwd=cwd,
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    # --log-every 1: each step's record holds the training seconds so far
    elapsed = [0.0] + [e["elapsed"] for e in map(json.loads, (out / "metrics.jsonl").open()) if e["event"] == "train"]
    return {
        "step_seconds": [b - a for a, b in pairwise(elapsed)],
        "tokens_per_second": summary["tokens_per_second"],
        "train_seconds": summary["train_seconds"],
        "train_tokens": summary["train_tokens"],
        "blocks": summary["blocks"],
        "mixed_precision": summary["mixed_precision"],
        "wall_seconds": wall,
        "peak_rss_mb": peak,
    }


def trainer_job(name: str, out: Path, *extra: Any) -> dict[str, Any]:
    text, wall, peak = run(
        name,
        [
            PY, ROOT / "bench" / "trainer_clm.py", "--model", OUT / "base", "--train", SHARED / "wikitext-2" / "valid.txt",
            "--output", out, "--block-size", BLOCK, "--batch-size", BATCH, "--max-steps", STEPS, "--lr", LR,
            "--warmup-steps", WARMUP, "--weight-decay", WEIGHT_DECAY, "--schedule", "cosine", *extra,
        ],
    )  # fmt: skip
    return {**last_json(text), "wall_seconds": wall, "peak_rss_mb": peak, "mixed_precision": "bf16" if extra else "no"}


def summarise(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s from the median step time over every run of a configuration: robust to a noisy minute on a
    shared machine (and to the slow first step), where a whole-run average is not. Whole-run figures kept too."""
    steps = sorted(s for r in rounds for s in r["step_seconds"])
    last = rounds[-1]
    return {
        "tokens_per_second": BATCH * BLOCK / steps[len(steps) // 2],
        "run_tokens_per_second": [r["tokens_per_second"] for r in rounds],
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rounds),
        "mixed_precision": last["mixed_precision"],
        "train_tokens": last["train_tokens"],
        "blocks": last["blocks"],
    }


def configurations(other: Path | None = None) -> dict[str, Any]:
    """The fine-tuning configurations, by name: each a function that runs it once. other: a folder holding
    another version's lmtune package (`git archive COMMIT lmtune | tar -x -C FOLDER`), run as "lmtune_other"."""
    configs: dict[str, Any] = {
        "trainer": lambda: trainer_job("Trainer, defaults", OUT / "trainer"),
        "lmtune": lambda: finetune_job("lmtune, defaults", OUT / "lmtune"),
        "lmtune_dropout0": lambda: finetune_job("lmtune, dropout=0", OUT / "lmtune-dropout0", "dropout=0"),
    }
    if bf16_is_fast():
        configs["trainer_bf16"] = lambda: trainer_job("Trainer, bf16", OUT / "trainer-bf16", "--bf16")
        configs["lmtune_fp32"] = lambda: finetune_job("lmtune, fp32", OUT / "lmtune-fp32", "--mixed-precision", "no")
    if other:
        configs["lmtune_other"] = lambda: finetune_job(f"lmtune from {other}", OUT / "lmtune-other", cwd=other)
    return configs


def interleaved(configs: dict[str, Any], rounds: int) -> dict[str, dict[str, Any]]:
    """Each configuration `rounds` times, one round of all after another, so a noisy minute hits all alike."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    for _ in range(rounds):
        for name, job in configs.items():
            runs[name].append(job())
    return {name: {**summarise(rs), "rounds": rs} for name, rs in runs.items()}


def only(names: list[str], rounds: int, other: Path | None) -> None:
    """--only: the named configurations interleaved, each one's tokens/s (median step, over all its runs and per
    round) and the ratio of each pair; written to bench/out/only.json."""
    configs = configurations(other)
    if unknown := [n for n in names if n not in configs]:
        raise SystemExit(f"no configuration {', '.join(unknown)}; there are {', '.join(configs)}")
    jobs = interleaved({n: configs[n] for n in names}, rounds)
    t = Table("configuration", "tok/s (median step)", "per round", "whole runs", title="--only", title_justify="left")
    for name, job in jobs.items():
        medians = [BATCH * BLOCK / sorted(r["step_seconds"])[len(r["step_seconds"]) // 2] for r in job["rounds"]]
        t.add_row(
            name, f"{job['tokens_per_second']:,.0f}", ", ".join(f"{x:,.0f}" for x in medians),
            ", ".join(f"{x:,.0f}" for x in job["run_tokens_per_second"]),
        )  # fmt: skip
    console.print(t)
    for x, y in ((x, y) for i, x in enumerate(jobs) for y in list(jobs)[i + 1 :]):
        console.print(f"{x} / {y}: {jobs[x]['tokens_per_second'] / jobs[y]['tokens_per_second']:.3f}x")
    (OUT / "only.json").write_text(json.dumps(jobs, indent=2) + "\n")


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bf16_is_fast() -> bool:
    sys.path.insert(0, str(ROOT))
    from lmtune.setup import resolve_precision

    return cuda() or resolve_precision("auto") == "bf16"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--only", help="comma-separated fine-tuning configurations (e.g. lmtune,trainer_bf16): only these, "
        "interleaved, then their ratios, on the base model of an earlier run; no evaluation or other parts",
    )  # fmt: skip
    p.add_argument(
        "--other", type=Path, help="with --only: a folder holding another version's lmtune package, as lmtune_other"
    )
    p.add_argument("--rounds", type=int, default=ROUNDS, help=f"runs of each configuration (default {ROUNDS})")
    a = p.parse_args()
    if not (SHARED / "wikitext-2" / "valid.txt").is_file():
        raise SystemExit(f"no WikiText-2 under {SHARED}; set LMTUNE_SHARED_DATA to the shared data folder")
    OUT.mkdir(parents=True, exist_ok=True)
    os.environ["LMTUNE_HOME"] = str(OUT / "home")  # lmtune's caches, kept out of the user's
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_DATASETS_CACHE"] = str(OUT / "datasets-cache")
    started = time.perf_counter()
    results: dict[str, Any] = {"settings": {
        "shape": " ".join(SHAPE), "block_size": BLOCK, "batch_size": BATCH, "steps": STEPS, "lr": LR,
        "weight_decay": WEIGHT_DECAY, "warmup_steps": WARMUP, "eval_share_of_test": EVAL_LINES,
        "cpu_threads": os.cpu_count(),
    }}  # fmt: skip

    # The evaluation text: the start of test.txt, cut at a line.
    lines = (SHARED / "wikitext-2" / "test.txt").read_text().splitlines(keepends=True)
    (OUT / "test-part.txt").write_text("".join(lines[: int(len(lines) * EVAL_LINES)]))

    # The base model, pretrained by lmtune from scratch (tokenizer trained on the same text).
    if a.only and (OUT / "base" / "summary.json").is_file():
        return only(a.only.split(","), a.rounds, a.other)
    _, wall, _ = run(
        "pretrain base",
        lmtune(
            "finetune", "--from-scratch", "--data", SHARED / "tinyshakespeare" / "input.txt", *SHAPE,
            "--block-size", BLOCK, "--batch-size", 16, "--lr", 1e-3, "--max-steps", PRETRAIN_STEPS,
            "--eval-every", 0, "--output", OUT / "base", "--overwrite",
        ),
    )  # fmt: skip
    results["pretrain_seconds"] = wall

    # 1. Fine-tuning: the Trainer and lmtune on the same job, ROUNDS times interleaved; the best of each
    # counts, so a noisy minute on a shared machine does not decide a ratio.
    if a.only:
        return only(a.only.split(","), a.rounds, a.other)
    jobs = interleaved(configurations(), a.rounds)
    # Every final model scored by the same scorer on the same text.
    folders = {name: OUT / name.replace("_", "-") for name in jobs}
    text, _, _ = run(
        "evaluate all",
        lmtune(
            "eval", OUT / "base", *folders.values(), "--data", OUT / "test-part.txt", "--block-size", BLOCK, "--json"
        ),
    )
    scores = {Path(r["model"]).name: r for r in json.loads(text)}
    results["base_eval_loss"] = scores["base"]["loss"]
    for name, job in jobs.items():
        job["eval_loss"] = scores[folders[name].name]["loss"]
        job["eval_perplexity"] = scores[folders[name].name]["perplexity"]
    results["eval_tokens"] = scores["base"]["tokens"]
    results["finetune"] = jobs

    # 2. The bare loop on the same model and batch.
    text, _, peak = run(
        "bare loop",
        [PY, ROOT / "bench" / "bare_loop.py", "--model", OUT / "base", "--train", SHARED / "wikitext-2" / "valid.txt",
         "--block-size", BLOCK, "--batch-size", BATCH],
    )  # fmt: skip
    results["bare_loop"] = {**last_json(text), "peak_rss_mb": peak}

    # 3-5. Data preparation, evaluation, generation.
    parts = [PY, ROOT / "bench" / "parts.py"]
    wt = SHARED / "wikitext-2"
    common = ["--model", OUT / "base", "--block-size", BLOCK, "--batch-size", BATCH]
    data_cmd = [*parts, "data", *common, "--train", wt / "valid.txt", "--validation", wt / "test.txt"]
    results["data"] = last_json(run("data preparation", data_cmd)[0])
    eval_cmd = [*parts, "eval", *common, "--validation", OUT / "test-part.txt"]
    results["eval"] = last_json(run("evaluation", eval_cmd)[0])
    results["generate"] = last_json(run("generation", [*parts, "generate", "--model", OUT / "lmtune"])[0])
    results["gpu"] = "not measured: no CUDA device here" if not cuda() else "not measured: no GPU part yet"
    results["total_seconds"] = time.perf_counter() - started

    (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    console.print(table(results))
    console.print(f"figures: {OUT / 'results.json'}; {results['total_seconds']:.0f} s in all")


def table(r: dict[str, Any]) -> Table:
    """One table: each figure, and the ratio that the issue's target is about."""
    t = Table(title="lmtune benchmark (same machine, same run)", title_justify="left")
    t.add_column("measurement")
    t.add_column("figure", justify="right")
    t.add_column("ratio", justify="right")
    jobs = r["finetune"]
    trainer, ours = jobs["trainer"], jobs["lmtune"]
    for name, job in jobs.items():
        ratio = job["tokens_per_second"] / trainer["tokens_per_second"]
        runs = ", ".join(f"{x:,.0f}" for x in job["run_tokens_per_second"])
        t.add_row(
            f"fine-tune: {name} ({job['mixed_precision']})",
            f"{job['tokens_per_second']:,.0f} tok/s (whole runs: {runs}); eval loss {job['eval_loss']:.4f}; "
            f"peak {job['peak_rss_mb']:,.0f} MB",
            f"{ratio:.2f}x Trainer",
        )
    t.add_row(
        "eval loss vs Trainer", f"{ours['eval_loss']:.4f} vs {trainer['eval_loss']:.4f} (base {r['base_eval_loss']:.4f})",
        f"{(ours['eval_loss'] / trainer['eval_loss'] - 1) * 100:+.2f}%",
    )  # fmt: skip
    t.add_row(
        "peak memory vs Trainer", f"{ours['peak_rss_mb']:,.0f} vs {trainer['peak_rss_mb']:,.0f} MB",
        f"{ours['peak_rss_mb'] / trainer['peak_rss_mb']:.2f}x",
    )  # fmt: skip
    bare = r["bare_loop"]
    t.add_row(
        "bare PyTorch loop", f"{bare['tokens_per_second']:,.0f} tok/s",
        f"lmtune {ours['tokens_per_second'] / bare['tokens_per_second']:.2f}x",
    )  # fmt: skip
    d = r["data"]
    t.add_row(
        "data prep, lmtune cold / cached", f"{d['lmtune_cold_seconds']:.2f} s / {d['lmtune_cached_seconds']:.3f} s "
        f"({d['tokens']:,} tokens, {d['lmtune_cold_tokens_per_second']:,.0f} tok/s cold)", f"{d['cached_speedup']:.0f}x",
    )  # fmt: skip
    t.add_row(
        "data prep, datasets.map cold / cached", f"{d['datasets_cold_seconds']:.2f} s / {d['datasets_cached_seconds']:.3f} s",
        f"lmtune {d['cold_ratio_vs_datasets']:.1f}x / {d['cached_ratio_vs_datasets']:.1f}x",
    )  # fmt: skip
    e = r["eval"]
    for name in ("full", "half"):
        t.add_row(
            f"eval, stride {e[f'stride_{name}']} (context {BLOCK})",
            f"{e[f'stride_{name}_tokens_per_second']:,.0f} tok/s", "",
        )  # fmt: skip
    g = r["generate"]
    for b in (1, 8):
        t.add_row(
            f"generate {g['new_tokens']} tokens, batch {b}",
            f"{g[f'batch{b}_cache_tokens_per_second']:,.0f} tok/s cached, "
            f"{g[f'batch{b}_no_cache_tokens_per_second']:,.0f} without",
            f"{g[f'batch{b}_cache_speedup']:.1f}x",
        )  # fmt: skip
    t.add_row("GPU", r["gpu"], "")
    return t


if __name__ == "__main__":
    main()
