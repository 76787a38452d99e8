"""The corpus a run trains on: each source of the plan tokenized once (from the token cache, or from a folder
written by `lmtune prepare`), the tokenizer (trained on the plan's documents when there is none), and data
read whole for evaluation."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lmtune import model
from lmtune.config import Config
from lmtune.data.chat import encode, ensure_chat_template, has_text
from lmtune.data.plan import decide
from lmtune.data.plan import write as write_plan
from lmtune.data.sources import (
    PREPARED_TOKENIZER,
    Reading,
    eval_documents,
    identity,
    is_local,
    is_prepared,
    sources,
    train_split,
)
from lmtune.data.streams import DamagedCache, cache_key, read_cache, write_folder
from lmtune.data.tokens import default_workers, token_dtype, tokenizer_fingerprint
from lmtune.data.types import RENDERED, Corpus, DataPlan, SourcePlan, Split, log
from lmtune.errors import LmtuneError
from lmtune.events import Report
from lmtune.runs import home


def only_source(plan: DataPlan) -> SourcePlan:
    if len(plan.sources) != 1:
        raise LmtuneError("this reads one source of data; it was given several --data")
    return plan.sources[0]


def load_corpora(plan: DataPlan, tokenizer: Any, report: Report, workers: int | None = None) -> list[Corpus]:
    """Each source of the plan tokenized (or read from the cache or its prepared folder), in the plan's order."""
    return [load_corpus(src, tokenizer, report, workers) for src in plan.sources]


def load_corpus(what: Config | SourcePlan, tokenizer: Any, report: Report, workers: int | None = None) -> Corpus:
    """One source's tokenized train and validation streams (memory-mapped): from a folder written by `lmtune
    prepare`, from the cache when nothing that changes them changed, else tokenized now into the cache.
    Given a config of one source, its plan is decided first.

    A cache entry whose files are not what was written (truncated, overwritten, missing) is rebuilt, with
    one warning. Chat data sets the tokenizer's chat template when it has none (lmtune's SIMPLE_TEMPLATE,
    a constant: the key holds the tokenizer as it was).
    """
    src = what if isinstance(what, SourcePlan) else only_source(decide(what))
    if src.form == "prepared":
        log.info("tokenized data prepared in %s", src.data)
        return read_prepared(Path(src.data).expanduser(), tokenizer)
    folder = home() / "tokens" / cache_key(src, tokenizer)
    if folder.is_dir():
        try:
            corpus = read_cache(folder)
        except DamagedCache as err:
            log.warning("token cache entry %s is damaged (%s); rebuilding it", folder, err)
        else:
            if corpus.format in RENDERED:
                ensure_chat_template(tokenizer)
            log.info("tokenized data from cache %s", folder)
            if corpus.overlap_warning:
                log.warning(corpus.overlap_warning)
            return corpus
    write_folder(src, tokenizer, report, folder, workers or default_workers())
    corpus = read_cache(folder)
    corpus.cached = False
    return corpus


def read_prepared(folder: Path, tokenizer: Any) -> Corpus:
    """A prepared folder's streams, checked whole, after checking they are this tokenizer's tokens."""
    try:
        corpus = read_cache(folder)
        meta = json.loads((folder / "meta.json").read_text())
        fingerprints, made_from = list(meta["tokenizer"]), meta["data"]["data"]
    except (DamagedCache, KeyError, TypeError) as err:
        raise LmtuneError(
            f"prepared data {folder} is damaged ({err}); prepare it again with lmtune prepare ... --overwrite"
        ) from None
    own = {tokenizer_fingerprint(tokenizer), tokenizer_fingerprint(tokenizer, template=corpus.format in RENDERED)}
    if not own & set(fingerprints):
        raise LmtuneError(
            f"{folder} holds tokens of another tokenizer than this run's ({tokenizer.name_or_path}); train with the "
            f"one it was made with (--tokenizer {folder / PREPARED_TOKENIZER}), or prepare the data for this one: "
            f"lmtune prepare {made_from} --tokenizer {tokenizer.name_or_path}"
        )
    if corpus.format in RENDERED:
        ensure_chat_template(tokenizer)
    if corpus.overlap_warning:
        log.warning(corpus.overlap_warning)
    return corpus


def prepare(cfg: Config, output: Path, overwrite: bool, report: Report, workers: int | None = None) -> dict[str, Any]:
    """`lmtune prepare`: tokenize cfg.data once into the folder `output` (token streams, meta.json with the
    counts, checksums and fingerprints, the tokenizer, and the data plan), for `lmtune finetune MODEL --data
    OUTPUT`. Returns what it holds; a folder already prepared from the same data, settings and tokenizer is kept."""
    from lmtune.config import absolute_paths

    if not cfg.data:
        raise LmtuneError("no data: lmtune prepare DATA --model M (a file, a folder or a hub dataset name)")
    if not cfg.model and not cfg.tokenizer:
        raise LmtuneError("pass --model M or --tokenizer T: the data is prepared as that tokenizer's tokens")
    cfg = absolute_paths(cfg)
    output = output.expanduser().absolute()
    check_prepare_output(cfg, output)
    data_plan = decide(cfg)
    if len(data_plan.sources) > 1:
        raise LmtuneError(
            "lmtune prepare writes one source a folder: prepare each, then mix the folders with "
            "lmtune finetune MODEL --data A-tokens --data B-tokens --data-weights ..."
        )
    src = data_plan.sources[0]
    if src.form == "prepared":
        raise LmtuneError(f"{src.data} is prepared already; train on it with lmtune finetune MODEL --data {src.data}")
    tokenizer = tokenizer_for(cfg, data_plan, report)
    start = time.perf_counter()
    key = cache_key(src, tokenizer)
    kept = not overwrite and prepared_key(output) == key
    if not kept:
        if output.exists() and not overwrite:
            raise LmtuneError(
                f"{output} holds data prepared from other data, settings or tokenizer; pass --overwrite to replace it"
            )

        def save_tokenizer_and_plan(folder: Path) -> None:
            tokenizer.save_pretrained(folder / PREPARED_TOKENIZER)
            write_plan(data_plan, folder)

        write_folder(src, tokenizer, report, output, workers or default_workers(), save_tokenizer_and_plan)
    corpus = read_prepared(output, tokenizer)
    seconds = time.perf_counter() - start
    tokens = len(corpus.train.ids) + len(corpus.validation.ids)
    return {
        "output": str(output), "already_prepared": kept, "format": corpus.format,
        "documents": corpus.train.documents, "empty_documents": corpus.empty_documents,
        "train_tokens": len(corpus.train.ids), "validation_documents": corpus.validation.documents,
        "validation_tokens": len(corpus.validation.ids), "validation": corpus.validation_source,
        "seconds": seconds, "tokens_per_second": tokens / seconds, "overlap_warning": corpus.overlap_warning,
    }  # fmt: skip


def check_prepare_output(cfg: Config, output: Path) -> None:
    """An --output that is free or holds prepared data; never one that holds the data."""
    for spec in [*(d.path for d in cfg.data_sources()), cfg.validation_data]:
        if spec and is_local(spec) and Path(spec).expanduser().resolve().is_relative_to(output.resolve()):
            raise LmtuneError(f"--output {output} holds the data {spec}; write the prepared data elsewhere")
    if output.exists() and not is_prepared(str(output)):
        raise LmtuneError(f"{output} exists and is not prepared data; choose another --output")


def prepared_key(folder: Path) -> str | None:
    """The cache key a prepared folder was written with, if it is one."""
    try:
        return str(json.loads((folder / "meta.json").read_text())["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def eval_split(spec: str, cfg: Reading, tokenizer: Any, report: Report) -> Split:
    """Any data as one evaluation split, tokenized with `tokenizer` (not cached: eval reads it once)."""
    report({"event": "phase", "phase": f"reading {spec}"})
    docs = [d for d in eval_documents(spec, cfg) if has_text(d)]
    if not docs:
        raise LmtuneError(f"{spec} holds no text (0 non-empty documents)")
    return encode(docs, tokenizer, report, spec).split(range(len(docs)), tokenizer.eos_token_id, token_dtype(tokenizer))


def tokenizer_for(cfg: Config, plan: DataPlan, report: Report) -> Any:
    """The run's tokenizer: --tokenizer, the model's, or (from scratch with neither) one trained on the training
    documents of the plan's sources, cached by what they are."""
    if cfg.tokenizer or cfg.model:
        return model.get_tokenizer(cfg)
    key_parts = [[identity(s.data) for s in plan.sources], cfg.text_column, cfg.txt_documents, cfg.vocab_size]
    key = hashlib.sha256(json.dumps(key_parts, default=str).encode()).hexdigest()[:24]
    return model.trained_tokenizer(lambda: training_texts(plan), key, cfg.vocab_size, report)


def training_texts(plan: DataPlan) -> Iterator[str]:
    """The text of every training document of every source: a conversation's messages joined by newlines."""
    for src in plan.sources:
        if src.form == "prepared":
            raise LmtuneError(
                f"{src.data} holds tokens, not text: pass --tokenizer {Path(src.data) / PREPARED_TOKENIZER}"
            )
        for docs, _ in train_split(sources(src.data, src), src.data).read():
            for d in docs:
                yield d if isinstance(d, str) else "\n".join(m["content"] for m in d)
