"""`make bench-data`: preparing data of any size (issue 12), lmtune against run_clm.py's `datasets.map` path.

Builds text corpora of about 250 MB and 1 GB from ../shared/data (WikiText-2 and Tiny Shakespeare paragraphs,
repeated and shuffled; written under bench/out/data, never committed), and a byte-level BPE of 8,192 tokens
trained on Tiny Shakespeare (as `make bench`'s base model has). For each corpus, each in its own process:

- lmtune prepare, cold (empty token cache): seconds, tokens/s, peak RSS of the preparing process and of its
  largest tokenizing worker; then the same command again (the folder kept: its files checked, nothing tokenized);
- run_clm.py's path: `load_dataset("text")`, `datasets.map` tokenizing with `num_proc` = lmtune's workers,
  then `group_texts` (concatenate and cut into blocks), in a fresh datasets cache;
- on the 250 MB corpus only, the issue's measurement: `lmtune finetune --dry-run --block-size 128`, cold and
  cached (a small from-scratch model on the same tokenizer, so no base model is needed).

Prints one table and writes bench/out/data/results.json. Needs about 10 GB of disk and 30-40 minutes on 2 cores.
`python bench/data.py --sizes 50` for a quick look.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from itertools import chain
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("LMTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
OUT = ROOT / "bench" / "out" / "data"
PY = sys.executable
BLOCK = 128  # tokens per block, as in the measurement


def build_corpus(path: Path, megabytes: int) -> None:
    """Paragraphs of the shared corpora, shuffled, repeated until the file holds `megabytes` MB."""
    if path.is_file() and path.stat().st_size >= megabytes * 1_000_000:
        return
    texts = [(SHARED / "wikitext-2" / f).read_text() for f in ("valid.txt", "test.txt")]
    texts.append((SHARED / "tinyshakespeare" / "input.txt").read_text())
    paragraphs = [p.strip("\n") for t in texts for p in t.split("\n\n") if p.strip()]
    r = random.Random(0)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        while f.tell() < megabytes * 1_000_000:
            r.shuffle(paragraphs)
            f.write("\n\n".join(paragraphs) + "\n\n")
    tmp.replace(path)


def build_tokenizer(folder: Path) -> None:
    if (folder / "tokenizer.json").is_file():
        return
    sys.path.insert(0, str(ROOT))
    from lmtune.model import train_tokenizer

    text = (SHARED / "tinyshakespeare" / "input.txt").read_text()
    train_tokenizer(text.split("\n\n"), 8192).save_pretrained(folder)


def measure(name: str, cmd: list[Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh process: its wall seconds, the JSON it printed last, and the peak RSS of
    the process and of its largest child (Linux: wait4 reports the larger of the two)."""
    print(f"{name}: {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, env={**os.environ, **(env or {})})
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"{name} failed")
    lines = out.decode().strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    return {"wall_seconds": wall, "peak_rss_mb_any_process": usage.ru_maxrss / 1024, **result}


def lmtune_prepare(a: argparse.Namespace) -> None:
    """One `lmtune prepare` through its library call; prints its figures and this process's peak RSS."""
    sys.path.insert(0, str(ROOT))
    from lmtune.config import Config
    from lmtune.data import prepare

    cfg = Config(data=a.corpus, tokenizer=a.tokenizer)
    r = prepare(cfg, Path(a.output), overwrite=a.overwrite, report=lambda e: None, workers=a.workers)
    print(json.dumps({
        "tokens": r["train_tokens"] + r["validation_tokens"], "seconds": r["seconds"],
        "tokens_per_second": r["tokens_per_second"], "already_prepared": r["already_prepared"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))  # fmt: skip


def datasets_map(a: argparse.Namespace) -> None:
    """run_clm.py's preparation: the text loader, a batched map that tokenizes, a batched map that groups."""
    import datasets
    from datasets import load_dataset
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()

    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    eos = tokenizer.eos_token
    start = time.perf_counter()
    raw = load_dataset("text", data_files={"train": a.corpus}, split="train")
    tokenized = raw.map(
        lambda ex: tokenizer([t + eos if t.strip() else "" for t in ex["text"]], add_special_tokens=False),
        batched=True,
        num_proc=a.workers,
        remove_columns=["text"],
    )

    def group(ex: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
        joined = list(chain(*ex["input_ids"]))
        total = len(joined) // BLOCK * BLOCK
        return {"input_ids": [joined[i : i + BLOCK] for i in range(0, total, BLOCK)]}

    grouped = tokenized.map(group, batched=True, num_proc=a.workers, remove_columns=tokenized.column_names)
    seconds = time.perf_counter() - start
    tokens = len(grouped) * BLOCK
    print(json.dumps({
        "tokens": tokens, "seconds": seconds, "tokens_per_second": tokens / seconds,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }))  # fmt: skip


def main(a: argparse.Namespace) -> None:
    if not (SHARED / "wikitext-2" / "valid.txt").is_file():
        raise SystemExit(f"no WikiText-2 under {SHARED}; set LMTUNE_SHARED_DATA to the shared data folder")
    OUT.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    from lmtune.data import default_workers

    workers = a.workers or default_workers()
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "true"}
    tokenizer = OUT / "tokenizer"
    build_tokenizer(tokenizer)
    results: dict[str, Any] = {"workers": workers, "cpus": os.cpu_count(), "block_size": BLOCK, "corpora": {}}
    me = [PY, Path(__file__)]
    for size in a.sizes:
        corpus = OUT / f"corpus-{size}mb.txt"
        build_corpus(corpus, size)
        home, prepared, hf_cache = OUT / "home", OUT / f"prepared-{size}mb", OUT / "datasets-cache"
        for folder in (home, prepared, hf_cache):
            shutil.rmtree(folder, ignore_errors=True)
        run_env = {**env, "LMTUNE_HOME": str(home), "HF_DATASETS_CACHE": str(hf_cache)}
        args = ["prepare-one", corpus, tokenizer, prepared, "--workers", workers]
        r: dict[str, Any] = {"megabytes": corpus.stat().st_size / 1e6}
        r["lmtune_cold"] = measure(f"lmtune prepare {size} MB, cold", [*me, *args], run_env)
        r["lmtune_again"] = measure(f"lmtune prepare {size} MB, again", [*me, *args], run_env)
        if size <= a.dry_run_up_to:
            shutil.rmtree(home, ignore_errors=True)
            dry = [
                PY, "-m", "lmtune", "finetune", "--from-scratch", "--tokenizer", tokenizer, "--n-layer", 2,
                "--n-head", 2, "--n-embd", 64, "--n-positions", BLOCK, "--data", corpus, "--block-size", BLOCK, "--dry-run",
            ]  # fmt: skip
            r["finetune_dry_run_cold"] = measure(f"finetune --dry-run {size} MB, cold", dry, run_env)
            r["finetune_dry_run_cached"] = measure(f"finetune --dry-run {size} MB, cached", dry, run_env)
        if not a.skip_datasets:
            r["datasets_map"] = measure(
                f"datasets.map {size} MB", [*me, "datasets-map", corpus, tokenizer, "--workers", workers], run_env
            )
        for folder in (home, prepared, hf_cache):
            shutil.rmtree(folder, ignore_errors=True)
        results["corpora"][f"{size}mb"] = r
        (OUT / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict[str, Any]) -> None:
    print(f"{results['workers']} tokenizing processes, {results['cpus']} CPUs; peak RSS: the preparing process "
          "(its largest worker)")  # fmt: skip
    print(f"{'corpus':>8} {'measurement':<34} {'tokens':>13} {'seconds':>8} {'tokens/s':>11} {'peak RSS MB':>16}")
    for name, r in results["corpora"].items():
        for key, label in [
            ("lmtune_cold", "lmtune prepare, cold"),
            ("lmtune_again", "lmtune prepare, again (kept)"),
            ("finetune_dry_run_cold", "finetune --dry-run, cold"),
            ("finetune_dry_run_cached", "finetune --dry-run, cached"),
            ("datasets_map", "datasets.map + group_texts"),
        ]:
            if key not in r:
                continue
            m = r[key]
            seconds = m.get("seconds", m["wall_seconds"])
            tokens = m.get("tokens")
            rate = (
                f"{m['tokens_per_second'] / 1e6:.2f}M"
                if "tokens_per_second" in m and not m.get("already_prepared")
                else ""
            )
            peak = (
                f"{m['peak_rss_mb']:,.0f} ({m['worker_peak_rss_mb']:,.0f})"
                if "peak_rss_mb" in m
                else f"{m['peak_rss_mb_any_process']:,.0f}"
            )
            count = f"{tokens:,}" if tokens else ""
            print(f"{name:>8} {label:<34} {count:>13} {seconds:>8.1f} {rate:>11} {peak:>16}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part")
    one = sub.add_parser("prepare-one")
    one.add_argument("corpus")
    one.add_argument("tokenizer")
    one.add_argument("output")
    one.add_argument("--workers", type=int, required=True)
    one.add_argument("--overwrite", action="store_true")
    hf = sub.add_parser("datasets-map")
    hf.add_argument("corpus")
    hf.add_argument("tokenizer")
    hf.add_argument("--workers", type=int, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000], help="corpora, MB")
    parser.add_argument("--workers", type=int, default=0, help="tokenizing processes (default: lmtune's)")
    parser.add_argument("--dry-run-up-to", type=int, default=250, help="also time finetune --dry-run up to this size")
    parser.add_argument("--skip-datasets", action="store_true", help="without the datasets.map comparison")
    a = parser.parse_args()
    if a.part == "prepare-one":
        lmtune_prepare(a)
    elif a.part == "datasets-map":
        datasets_map(a)
    else:
        main(a)
