"""Benchmark parts that time lmtune's own functions: data preparation, evaluation, generation.

`python bench/parts.py data|eval|generate ...` prints one JSON line; bench/run.py runs each in its own
process so caches, threads and peak memory do not leak from one measurement into the next.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from itertools import chain
from typing import Any


def seconds(fn: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def data_prep(a: argparse.Namespace) -> dict[str, Any]:
    """Tokenize and pack the WikiText-2 files: lmtune cold, lmtune cached, and run_clm's datasets.map path."""
    os.environ["LMTUNE_HOME"] = tempfile.mkdtemp(prefix="bench-home-")  # cold: nothing cached
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="bench-datasets-")
    from datasets import load_dataset

    from lmtune import batches, data
    from lmtune.config import Config
    from lmtune.model import load_tokenizer

    tokenizer = load_tokenizer(a.model)
    cfg = Config(model=a.model, data=a.train, validation_data=a.validation, txt_documents="line")

    def lmtune_prep() -> int:
        corpus = data.load_corpus(cfg, tokenizer, lambda e: None)
        batches.pack(corpus.train.ids, a.block_size)
        return len(corpus.train.ids) + len(corpus.validation.ids)

    tokens, cold = seconds(lmtune_prep)
    _, cached = seconds(lmtune_prep)

    eos = tokenizer.eos_token

    def datasets_prep() -> int:
        # transformers' examples/run_clm.py: text loader, batched map to tokenize, batched map to group.
        raw = load_dataset("text", data_files={"train": a.train, "validation": a.validation})
        tok = raw.map(
            lambda ex: tokenizer([t + eos if t.strip() else "" for t in ex["text"]], add_special_tokens=False),
            batched=True,
            remove_columns=["text"],
        )

        def group(ex: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
            joined = list(chain(*ex["input_ids"]))
            total = len(joined) // a.block_size * a.block_size
            return {"input_ids": [joined[i : i + a.block_size] for i in range(0, total, a.block_size)]}

        tok.map(group, batched=True, remove_columns=tok["train"].column_names)
        return sum(len(x) for split in tok.values() for x in split["input_ids"])

    hf_tokens, hf_cold = seconds(datasets_prep)
    _, hf_cached = seconds(datasets_prep)
    return {
        "tokens": tokens,
        "lmtune_cold_seconds": cold,
        "lmtune_cached_seconds": cached,
        "lmtune_cold_tokens_per_second": tokens / cold,
        "cached_speedup": cold / cached,
        "datasets_tokens": hf_tokens,
        "datasets_cold_seconds": hf_cold,
        "datasets_cached_seconds": hf_cached,
        "datasets_cold_tokens_per_second": hf_tokens / hf_cold,
        "cold_ratio_vs_datasets": hf_cold / cold,
        "cached_ratio_vs_datasets": hf_cached / cached,
    }


def evaluation(a: argparse.Namespace) -> dict[str, Any]:
    """lmtune's scorer (what `lmtune eval` runs) at stride = context and stride = context / 2."""
    os.environ["LMTUNE_HOME"] = tempfile.mkdtemp(prefix="bench-home-")
    from lmtune import data
    from lmtune.config import Config
    from lmtune.evaluate import score
    from lmtune.generate import load

    model, tokenizer = load(a.model)
    split = data.eval_split(a.validation, Config(txt_documents="line"), tokenizer, lambda e: None)
    out: dict[str, Any] = {"stream_tokens": len(split.ids)}
    for name, stride in (("full", a.block_size), ("half", a.block_size // 2)):
        s, secs = seconds(lambda stride=stride: score(model, split, a.block_size, stride, a.batch_size))
        out[f"stride_{name}"] = stride
        out[f"stride_{name}_tokens_per_second"] = s.tokens / secs
        out[f"stride_{name}_loss"] = s.loss
    return out


def generation(a: argparse.Namespace) -> dict[str, Any]:
    """Greedy decoding of exactly --new-tokens tokens at batch 1 and 8, with and without the KV cache."""
    import torch

    from lmtune.generate import load

    model, tokenizer = load(a.model)
    prompt = " The song was released in"
    out: dict[str, Any] = {"new_tokens": a.new_tokens}
    for batch in (1, 8):
        enc = tokenizer([prompt] * batch, return_tensors="pt")
        for cache in (True, False):
            kwargs = dict(max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens, do_sample=False, use_cache=cache)
            with torch.no_grad():
                model.generate(**enc, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm up
                made, secs = seconds(lambda enc=enc, kwargs=kwargs: model.generate(**enc, **kwargs))
            new = (made.shape[1] - enc["input_ids"].shape[1]) * batch
            out[f"batch{batch}_{'cache' if cache else 'no_cache'}_tokens_per_second"] = new / secs
        out[f"batch{batch}_cache_speedup"] = (
            out[f"batch{batch}_cache_tokens_per_second"] / out[f"batch{batch}_no_cache_tokens_per_second"]
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("part", choices=["data", "eval", "generate"])
    p.add_argument("--model", required=True)
    p.add_argument("--train")
    p.add_argument("--validation")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    a = p.parse_args()
    part = {"data": data_prep, "eval": evaluation, "generate": generation}[a.part]
    print(json.dumps(part(a)))


if __name__ == "__main__":
    main()
