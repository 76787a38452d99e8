"""The data plan: what is trained on and what is held out, decided once from the config and the sources,
before anything is tokenized. Everything after reads it (`DataPlan`, in types.py): tokenizing and the cache,
streaming, `data show`, `prepare`, the run folder's data_plan.json that `eval` and resume read. Nothing
decides these again.

For each source: its form (hub dataset, file, folder, prepared folder), its format (text, chat or preference pairs), its text
column, its weight, and where its validation comes from, in this order of preference: validation data given
for it, its own validation split (a hub dataset's `validation`, a folder's valid/validation/dev file), else a
share of its documents held out by a hash of their text (the last tokens of a single document).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import lmtune.data.sources as sources
from lmtune import atomic
from lmtune.config import Config, DataSource
from lmtune.data.types import DataPlan, SourcePlan
from lmtune.errors import LmtuneError

PLAN = "data_plan.json"  # in a run folder: the plan the run trained with


def decide(cfg: Config) -> DataPlan:
    """The plan for cfg's --data (one source or several), with what `auto` found for each."""
    given = cfg.data_sources()
    if not given:
        raise LmtuneError("no training data: pass --data with a file, a folder or a hub dataset name")
    names = unique_names([d.path for d in given])
    plans = tuple(source_plan(d, cfg, name) for d, name in zip(given, names, strict=True))
    notes = []
    if len(plans) > 1:
        weights = [p.weight for p in plans]
        if all(w is None for w in weights):
            notes.append("weights by size: each source once per epoch")
        elif any(w is None for w in weights):
            raise LmtuneError("give every --data a weight, or none (then: by size)")
        if cfg.streaming and all(w is None for w in weights):
            raise LmtuneError("a stream has no size to weigh by: pass --data-weights with --streaming")
        formats = {p.data_format for p in plans}
        if "preference" in formats and len(formats) > 1:
            raise LmtuneError(
                "preference pairs train with the DPO loss, which text and chat data have no place in; mix preference "
                "sources only with each other (train on the chat data first, then DPO from that run)"
            )
    return DataPlan(plans, notes=tuple(notes))


def source_plan(d: DataSource, cfg: Config, name: str) -> SourcePlan:
    """One source: what it is, read how, and where its validation comes from."""
    plan = SourcePlan(
        data=d.path, name=name, form="file", data_format=d.format or cfg.data_format,
        text_column=d.text_column or cfg.text_column, txt_documents=cfg.txt_documents, weight=d.weight,
        validation="held_out", validation_data=None, validation_percent=cfg.validation_percent, streaming=cfg.streaming,
    )  # fmt: skip
    if sources.is_prepared(d.path):
        if cfg.streaming:
            raise LmtuneError(f"{d.path} is prepared data, read from disk; drop --streaming")
        if d.validation:
            raise LmtuneError(
                f"{d.path} holds tokens prepared with their validation split; pass --validation-data to lmtune prepare"
            )
        return replace(plan, form="prepared", data_format=prepared_format(Path(d.path)), validation="prepared")
    if sources.is_local(d.path):
        files = sources.local_files(d.path)
        form = "folder" if Path(d.path).expanduser().is_dir() else "file"
        splits = {sources.split_of(f) for f in files} if form == "folder" else {"train"}
    else:
        form = "hub"
        splits = set(hub_splits(d.path, cfg.streaming))
    if "train" not in splits:
        raise LmtuneError(
            f"{d.path} has only {' and '.join(sorted(splits))} data; training needs a `train` split or file"
        )
    plan = replace(plan, form=form)
    plan = replace(plan, data_format=detect_format(d.path, plan))
    if d.validation:
        return replace(plan, validation="data", validation_data=d.validation)
    return replace(plan, validation="split" if "validation" in splits else "held_out")


def detect_format(spec: str, reading: SourcePlan) -> str:
    """text, chat or preference, as `auto` finds it from the data (a stream is text: streaming reads text only)."""
    if reading.streaming:
        if reading.data_format in ("chat", "preference"):
            raise LmtuneError(
                f"--streaming reads text data; prepare {reading.data_format} data (lmtune prepare) instead"
            )
        return "text"
    return sources.train_split(sources.sources(spec, reading), spec).format


def hub_splits(spec: str, streaming: bool) -> list[str]:
    """The splits of a hub dataset: loaded (and cached) when it is read whole, asked for when streamed."""
    if not streaming:
        return list(sources._hub_dataset(*sources.hub_name(spec)))
    import datasets

    try:
        return list(datasets.get_dataset_split_names(*sources.hub_name(spec)))
    except Exception:  # unknown (no network, a dataset without split metadata): read it as training data only
        return ["train"]


def prepared_format(folder: Path) -> str:
    try:
        return str(json.loads((folder / "meta.json").read_text())["format"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LmtuneError(f"prepared data {folder} is damaged ({err}); prepare it again with --overwrite") from None


def unique_names(paths: list[str]) -> list[str]:
    """Short names of the sources (a file's or folder's name, a hub id), made unique with -2, -3, ..."""
    out: list[str] = []
    for p in paths:
        base = Path(p).name if sources.is_local(p) else p
        name, n = base, 1
        while name in out:
            n += 1
            name = f"{base}-{n}"
        out.append(name)
    return out


def with_shape(plan: DataPlan, block_size: int, packing: bool) -> DataPlan:
    """The plan with the block size and packing, decided once the model is known."""
    return DataPlan(plan.sources, block_size, packing, plan.notes)


def write(plan: DataPlan, folder: Path) -> None:
    atomic.write_text(folder / PLAN, json.dumps(plan.as_dict(), indent=1) + "\n")


def read(run: Path, cfg: Config | None = None) -> DataPlan:
    """The plan a run folder trained with; a run written before plans existed: decided again from its config."""
    path = run / PLAN
    if path.is_file():
        try:
            return DataPlan.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise LmtuneError(f"cannot read {path} ({err}); the run folder is damaged") from None
    if cfg is None:
        raise LmtuneError(f"{run} has no {PLAN}")
    return decide(cfg)


def summary(plan: DataPlan) -> list[dict[str, Any]]:
    """Each source in a few words, for the plan shown before training."""
    return [
        {
            "data": s.data, "name": s.name, "form": s.form, "format": s.data_format, "weight": s.weight,
            "validation": s.describe_validation(),
        }
        for s in plan.sources
    ]  # fmt: skip
