"""`lmtune eval --generate`: answer each conversation's last user turn, write the answers beside their
references (predictions.jsonl), and score them with metrics from Hugging Face's `evaluate` library.

lmtune's own exact match, ROUGE-L and BLEU (`lmtune/metrics/`) work offline; any other metric name or
script goes to `evaluate.load`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmtune import atomic, card, data, runs
from lmtune.config import Config, build
from lmtune.data import plan as data_plan
from lmtune.data.types import Conversation, Documents, Pair
from lmtune.errors import LmtuneError, first_line
from lmtune.evaluate import check_models
from lmtune.events import Report, silent
from lmtune.generate import generate, load, trained_on_chat
from lmtune.metrics import SHIPPED, own_metric
from lmtune.model import context_length
from lmtune.options import Sampling

log = logging.getLogger("lmtune")

PREDICTIONS = "predictions.jsonl"  # in a run folder: the answers of its latest `lmtune eval --generate`


@dataclass
class Question:
    messages: Conversation  # the conversation up to and with its last user turn: what the model answers
    reference: str  # the assistant's answer to that turn in the data


def questions(docs: Documents, where: str) -> tuple[list[Question], int]:
    """Each conversation's last user turn, with the turns before it, and the answer the data gives it.

    Returns the questions and the number of conversations skipped: no user turn, or none answered.
    """
    out, skipped = [], 0
    for doc in docs:
        conv = doc.side("chosen") if isinstance(doc, Pair) else doc  # a pair: its chosen answer is the reference
        if isinstance(conv, str):
            raise LmtuneError(
                f"{where} is plain text, not conversations; --generate answers conversations: pass --data with "
                "JSONL of prompt/response or messages"
            )
        last = max((i for i, m in enumerate(conv) if m["role"] == "user"), default=None)
        reply = (
            next((m["content"] for m in conv[last + 1 :] if m["role"] == "assistant"), "") if last is not None else ""
        )
        if last is None or not reply.strip():
            skipped += 1
            continue
        out.append(Question(conv[: last + 1], reply))
    if not out:
        raise LmtuneError(f"{where} holds no conversation whose last user turn has an answer to compare with")
    return out, skipped


def run_folder(name: str) -> Path | None:
    """`name` as a finished run folder (config.yaml and summary.json), or None."""
    path = Path(name).expanduser()
    return path if (path / runs.CONFIG).is_file() and (path / runs.SUMMARY).is_file() else None


def validation_conversations(run: Path) -> tuple[Documents, str]:
    """A run's validation conversations, from where its data plan says (data_plan.json): validation data of a
    source's own, its validation split, or the documents held out of it by the rule training applied
    (`data.held_out`); and their names, for the output. Text sources mixed in are left out: they hold no
    question to answer."""
    cfg = build(str(run / runs.CONFIG))
    plan = data_plan.read(run, cfg)
    docs: list[Any] = []
    for src in (s for s in plan.sources if s.data_format == "chat"):
        if src.validation == "prepared":
            raise LmtuneError(
                f"{run} was trained on tokens written by lmtune prepare, which keep no text to answer; pass --data "
                "with the validation conversations"
            )
        if src.validation == "data":
            assert src.validation_data, "the plan names it"
            docs += data.eval_documents(src.validation_data, src)
            continue
        splits = data.read_documents(src.data, src)
        if src.validation == "split":
            docs += splits["validation"]
        else:
            kept = [d for d in data.train_split(splits, src.data) if data.has_text(d)]
            docs += [d for d, held in zip(kept, data.held_out(kept, src.validation_percent), strict=True) if held]
    names = ", ".join(s.validation_data or s.data for s in plan.sources if s.data_format == "chat")
    return [d for d in docs if data.has_text(d)], names


def dataset_name(spec: str) -> str:
    """The data as the model card names it: a hub dataset by its id, a local file or folder by its name."""
    if data.is_local(spec):
        return Path(spec).expanduser().name or spec
    return data.hub_name(spec)[0]


def conversations(data_spec: str | None, run: Path | None, text_column: str) -> tuple[list[Question], int, str, str]:
    """The questions to answer, conversations skipped, where they come from (said in the output) and the
    data's name (for the model card): --data, else the validation data of `run`."""
    if data_spec:
        docs = data.eval_documents(data_spec, Config(data_format="chat", text_column=text_column))
        where, name = data_spec, dataset_name(data_spec)
    else:
        assert run, "checked by the caller"
        docs, spec = validation_conversations(run)
        where, name = f"the validation data of {run} ({spec})", ", ".join(map(dataset_name, spec.split(", ")))
    return (*questions(docs, where), where, name)


def prompt_text(tokenizer: Any, messages: Conversation) -> str:
    """The conversation in the chat template training used (lmtune's simple one if the tokenizer has none),
    ending where the assistant's answer starts."""
    data.ensure_chat_template(tokenizer)
    text: str = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


def answer(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    s: Sampling,
    batch_size: int,
    report: Report,
    phase: str = "answering",
) -> tuple[list[str], int]:
    """One answer to each prompt, `batch_size` prompts at a time, left-padded (generate.generate), and the
    fewest new tokens a batch was allowed.

    The prompt is the question, so it is never cut to make room: the answers get what the model's context
    leaves after the longest prompt of their batch, up to s.max_new_tokens.
    """
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    context = context_length(model)
    # Prompts of similar length share a batch: less padding, and more room for the shorter ones' answers.
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    out = [""] * len(prompts)
    fewest = s.max_new_tokens
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        room = context - max(lengths[i] for i in batch) if context else s.max_new_tokens
        fitted = (
            s.model_copy(update={"max_new_tokens": min(s.max_new_tokens, room)}) if room > 0 else s
        )  # none: generate cuts
        fewest = min(fewest, fitted.max_new_tokens)
        for i, texts in zip(batch, generate(model, tokenizer, [prompts[i] for i in batch], fitted), strict=True):
            out[i] = texts[0]
        report({"event": "phase", "phase": phase, "done": min(b + batch_size, len(order)), "total": len(order)})
    return out, fewest


def answer_everywhere(
    model: Any, tokenizer: Any, prompts: list[str], s: Sampling, batch_size: int, report: Report, phase: str
) -> list[str]:
    """The answers to `prompts`; under several processes (accelerate launch) each process answers its
    share on its own device and every process gets them all back, in order."""
    from accelerate.utils import gather_object

    state = process_state()
    model.to(state.device)
    with state.split_between_processes(prompts) as mine:  # contiguous shares, in rank order
        say = report if state.is_main_process else silent
        answers, fewest = answer(model, tokenizer, mine, s, batch_size, say, phase)
    if state.num_processes > 1:
        answers, fewest = gather_object(answers), min(gather_object([fewest]))
    if fewest < s.max_new_tokens and state.is_main_process:
        log.warning(
            "the model's context of %s tokens leaves room for %d new tokens after the longest prompts, not %d: "
            "their answers may be cut short",
            context_length(model), fewest, s.max_new_tokens,
        )  # fmt: skip
    return answers


def process_state() -> Any:
    """This process among those `accelerate launch` started (alone otherwise). Without a GPU, cpu=True makes
    accelerate join processes started by torchrun over gloo, as training's Accelerator does."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()))


def load_metric(name: str) -> Any:
    """A metric ready to compute: lmtune's own by name (offline), anything else through `evaluate.load`."""
    import evaluate

    evaluate.logging.set_verbosity_error()
    evaluate.disable_progress_bar()
    # Scratch space for the predictions a metric is given (kept in memory; evaluate still makes the folder).
    scratch = {"keep_in_memory": True, "cache_dir": str(runs.home() / "metrics")}
    if name in SHIPPED:
        return own_metric(name, **scratch)
    try:
        return evaluate.load(name, **scratch)
    except Exception as err:  # evaluate raises many types for "cannot get it"; each means one thing to a user
        raise LmtuneError(metric_error(name, err)) from None


def metric_error(name: str, err: Exception) -> str:
    """One line saying why `evaluate.load(name)` failed and what works instead."""
    import huggingface_hub

    own = f"lmtune's own metrics work offline ({', '.join(SHIPPED)})"
    if isinstance(err, ImportError):
        return f"metric {name} needs another package ({first_line(err)})"
    local = Path(name).suffix == ".py" or name.startswith((".", "/", "~")) or Path(name).expanduser().exists()
    if local:
        return f"cannot load metric script {name} ({first_line(err)})"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return (
            f"cannot load metric `{name}`: it is fetched from the hub, which is off (HF_HUB_OFFLINE is set), and "
            f"it is not in the cache; {own}, or pass a local metric script"
        )
    return f"cannot load metric `{name}` ({first_line(err)}); check the name and your network; {own}"


def score(metrics: dict[str, Any], predictions: list[str], references: list[str]) -> dict[str, float]:
    """Every number each metric reports (a key two metrics share is prefixed with the metric's name)."""
    figures: dict[str, float] = {}
    for name, metric in metrics.items():
        try:
            result = metric.compute(predictions=predictions, references=references)
        except Exception as err:
            raise LmtuneError(
                f"metric {name} could not score the answers ({first_line(err)}); it is given predictions and "
                "references as lists of strings"
            ) from None
        numbers = {
            key: float(value)
            for key, value in (result or {}).items()
            if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
        }
        if not numbers:
            raise LmtuneError(f"metric {name} gave no number for the answers (it returned {result!r:.100})")
        for key, value in numbers.items():
            figures[f"{Path(name).stem}/{key}" if key in figures else key] = value
    return figures


def check_writable(models: list[str], folder: Path | None) -> None:
    """Every model's answers file can be written (a read-only run's model card is only left without scores)."""
    for name in models:
        where = predictions_path(name, run_folder(name), folder).parent
        if reason := atomic.cannot_write_in(where):
            raise LmtuneError(
                f"cannot write the answers of {name} in {where} ({reason}); pass --predictions with a writable folder"
            )


def predictions_path(name: str, run: Path | None, folder: Path | None) -> Path:
    """Where a model's answers go: its run folder, else (or with --predictions) FOLDER/predictions-NAME.jsonl."""
    if run and folder is None:
        return run / PREDICTIONS
    label = Path(name).expanduser().name if Path(name).expanduser().exists() else name.replace("/", "--")
    return (folder or Path(".")) / f"predictions-{label}.jsonl"


def write_predictions(path: Path, qs: list[Question], predictions: list[str]) -> None:
    """One JSON line per question: the user turn answered, the data's answer, the model's."""
    lines = (
        json.dumps({"prompt": q.messages[-1]["content"], "reference": q.reference, "prediction": p}, ensure_ascii=False)
        for q, p in zip(qs, predictions, strict=True)
    )
    with atomic.written_beside(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def describe(s: Sampling) -> str:
    """How the answers were made, for the output and the model card."""
    how = (
        "greedy"
        if s.temperature == 0
        else f"sampled: temperature {s.temperature:g}, top-k {s.top_k}, top-p {s.top_p:g}"
        + (f", seed {s.seed}" if s.seed is not None else "")
    )
    return f"{how}, at most {s.max_new_tokens} new tokens"


def evaluate_answers(
    models: list[str],
    data_spec: str | None,
    metric_names: list[str],
    sampling: Sampling,
    batch_size: int,
    *,
    chat: bool = False,
    text_column: str = "text",
    predictions_folder: Path | None = None,
    report: Report = lambda e: None,
) -> list[dict[str, Any]]:
    """Answer the same conversations with each model and score the answers: --data, else the validation data
    of the first run folder given. A run's answers go to RUN/predictions.jsonl and its model card."""
    main = process_state().is_main_process
    report = report if main else silent
    first_run = next((r for r in map(run_folder, models) if r), None)
    if data_spec is None and first_run is None:
        raise LmtuneError("none of these models is a run folder with its own validation data; pass --data")
    for name in models:
        if not chat and not trained_on_chat(name):
            raise LmtuneError(
                f"{name} was not trained on chat data; pass --chat to answer in its chat template "
                "(lmtune's simple one if it has none)"
            )
    check_models(models)
    if main:  # where the answers (and a run's scores) go, checked before an hour of answering
        check_writable(models, predictions_folder)
    # Loaded before any answer is generated: a metric that cannot load fails at once, not after an hour.
    metrics = {name: load_metric(name) for name in metric_names}
    report({"event": "phase", "phase": f"reading {data_spec or first_run}"})
    qs, skipped, where, dataset = conversations(data_spec, first_run, text_column)
    results = []
    for name in models:
        report({"event": "phase", "phase": f"loading {name}"})
        net, tok = load(name)
        prompts = [prompt_text(tok, q.messages) for q in qs]
        predictions = answer_everywhere(net, tok, prompts, sampling, batch_size, report, f"answering with {name}")
        del net
        if not main:  # the first process scores and writes; the others only answered their share
            continue
        figures = score(metrics, predictions, [q.reference for q in qs])
        run = run_folder(name)
        path = predictions_path(name, run, predictions_folder)
        write_predictions(path, qs, predictions)
        result: dict[str, Any] = {
            "model": name, "data": where, "dataset": dataset, "conversations": len(qs), "skipped": skipped,
            "generation": describe(sampling), "metrics": figures, "predictions": str(path),
        }  # fmt: skip
        if run and (reason := atomic.cannot_write_in(run)):
            log.warning("the scores of %s are not added to its model card: cannot write in it (%s)", name, reason)
        elif run:  # the model card shows the figures, and the hub reads them from its model-index
            result["card"] = str(card.write_answers(run, result))
        results.append(result)
    leave_together()
    return results


def leave_together() -> None:
    """Several processes wait for the first (it writes) and free their process group themselves. Left to
    the interpreter's exit, rank 1 once aborted in CI ("terminate called without an active exception":
    gloo's threads torn down while still joinable)."""
    state = process_state()
    if state.num_processes > 1:
        state.wait_for_everyone()
        state.destroy_process_group()
