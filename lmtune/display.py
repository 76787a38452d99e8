"""What a person sees while lmtune works: a live Rich display on a terminal, plain lines otherwise.

The library reports events as dicts (the same dicts that go to metrics.jsonl); this turns them into
output. Nothing outside the CLI layer writes to the terminal.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table


def quiet_libraries() -> None:
    """lmtune shows its own progress; the libraries' bars and chatter would only interleave with it."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its load errors reach the user as lmtune's one line
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    # Deprecation notices between libraries (peft calling transformers) are for their authors, not users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    for chatty in ("bitsandbytes", "kernels"):  # bitsandbytes looks for an optional CPU kernel on the hub at import
        logging.getLogger(chatty).setLevel(logging.ERROR)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[logging.StreamHandler(sys.stderr)])
    logging.getLogger("lmtune").setLevel(logging.INFO)


def fit(name: str, width: int) -> str:
    """A phase's name in `width` characters: one that names a path keeps its words and the path's end (the file),
    `resuming from …/step-0000147`; any other keeps its start (the column cuts it with an ellipsis)."""
    words = name.split(" ")
    at = next((i for i, word in enumerate(words) if "/" in word), None)
    head = " ".join(words[:at]) if at is not None else name
    if len(name) <= width or at is None or len(head) > width - 8:
        return name
    path = " ".join(words[at:])
    return f"{head} …{path[-(width - len(head) - 2) :]}"


def human(n: float) -> str:
    for unit in ("", "k", "M", "B"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}T"


def duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def plan_table(plan: dict[str, Any], title: str) -> Table:
    t = Table(title=title, show_header=False, title_justify="left", box=None, padding=(0, 2))
    rows = [
        ("model", f"{plan['model']} ({human(plan['parameters'])} parameters)"),
        ("training", trainable_row(plan)),
        *data_rows(plan),
        (
            "validation",
            f"{plan['validation_tokens']:,} tokens in {plan['validation_documents']:,} "
            f"{'pairs' if plan['data_format'] == 'preference' else 'documents'}: {plan['validation']}",
        ),
        (
            "steps",
            f"{plan['steps_per_epoch']:,} per epoch x {plan['epochs']} epoch(s); {plan['total_steps']:,} in total",
        ),
        ("tokens per step", f"{plan['tokens_per_step']:,} ({plan['processes']} process(es))"),
        # Compiling makes the first steps slow (a minute or more for a large model): say so before they start.
        ("precision", plan["mixed_precision"] + (", compiled: the first steps take longer" if plan["compile"] else "")),
        ("output", plan["output"]),
    ]
    if "start" in plan:
        rows.append(("start", plan["start"]))
    savers = memory_savers(plan)
    if savers:
        rows.insert(-1, ("memory savers", savers))
    if "estimated_seconds" in plan:
        rows.append(("estimated time", f"{duration(plan['estimated_seconds'])} of training (evaluations not included)"))
    if "peak_gpu_memory_bytes" in plan:
        rows.append(("peak memory", f"{plan['peak_gpu_memory_bytes'] / 2**30:,.2f} GiB on the GPU in the timed passes"))
    elif "peak_rss_bytes" in plan:
        rows.append(
            ("peak memory", f"{plan['peak_rss_bytes'] / 2**30:,.2f} GiB (this process, data preparation included)")
        )
    if "memory" in plan:
        rows += memory_rows(plan["memory"])
    for k, v in rows:
        t.add_row(f"[bold]{k}[/]", str(v))
    return t


def data_rows(plan: dict[str, Any]) -> list[tuple[str, str]]:
    """What the training data is: its documents and tokens (a stream: read as training goes), each source's
    share when there are several, and how it is cut into rows."""
    if plan.get("streaming"):
        rows = [("documents", "streamed: read and tokenized as training takes them, so not counted ahead")]
    else:
        rows = [
            ("documents", f"{plan['documents']:,} (skipped {plan['empty_documents']:,} empty)")
            if plan["data_format"] != "preference"
            else (
                "pairs",
                f"{plan['documents']:,} (skipped {plan['empty_documents']:,}: a side missing or blank, or chosen = rejected)",
            ),
            (
                "training tokens",
                f"{plan['train_tokens_available']:,}" + (" (from cache)" if plan["data_from_cache"] else ""),
            ),
        ]
    sources = plan.get("sources", [])
    if len(sources) > 1:
        for s in sources:
            tokens = "" if s["epoch_tokens"] is None else f", {s['epoch_tokens']:,} tokens an epoch"
            seen = "" if s["epoch_tokens"] is None else f", seen {s['times_seen']:.2f}x"
            rows.append(
                (
                    f"  {escape(s['name'])}",
                    f"{s['format']}, {100 * s['share']:.1f}% of the training tokens{tokens}{seen}",
                )
            )
    return [*rows, data_row(plan)]


def memory_savers(plan: dict[str, Any]) -> str:
    """--quantize, --gradient-checkpointing and --optimizer, in words, where they differ from the defaults."""
    said = []
    if plan.get("quantize", "no") != "no":
        said.append("base weights in 4 bits (NF4)" if plan["quantize"] == "4bit" else "base weights in 8 bits")
    if plan.get("gradient_checkpointing"):
        said.append("activation checkpointing")
    if plan.get("optimizer", "adamw") != "adamw":
        said.append(f"optimizer {plan['optimizer']}")
    return ", ".join(said)


def memory_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    """The dry run's answer to "will it fit": the peak's parts, and what would fit when it does not."""

    def gib(n: float) -> str:
        return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"

    where = "the GPU's" if m["device"] == "gpu" else "this machine's available"
    measured = "PyTorch's allocations" if m["device"] == "gpu" else "resident memory; other: libraries, data"
    rows = [
        (
            "memory",
            f"weights {gib(m['weights'])}, gradients {gib(m['gradients'])}, optimizer states "
            f"{gib(m['optimizer_states'])}, activations {gib(m['activations'])}"
            + (f", other {gib(m['other'])}" if m["device"] == "cpu" else "")
            + f" (measured: {measured})",
        )
    ]
    if m["peak"] <= m["capacity"]:
        rows.append(("fits", f"yes: peak {gib(m['peak'])} of {where} {gib(m['capacity'])}"))
        return rows
    rows.append(("fits", f"NO: peak {gib(m['peak'])}, more than {where} {gib(m['capacity'])}; each change alone:"))
    for option in m["alternatives"]:
        verdict = "fits" if option["fits"] else "does not fit"
        rows.append(("", f"{option['change']}: peak about {gib(option['peak'])} ({option['how']}), {verdict}"))
    return rows


def data_row(plan: dict[str, Any]) -> tuple[str, str]:
    """How the training data is cut: packed blocks of text, or one conversation per row."""
    if plan.get("streaming"):
        return "blocks", f"of {plan['block_size']} tokens, packed from the stream as training takes them"
    if "+" in plan["data_format"]:  # chat mixed with text: each row keeps its own loss mask
        packed = "packed several to a row" if plan.get("packing") else "one per row"
        return "rows", (
            f"{plan['blocks']:,} of up to {plan['block_size']} tokens: text in full blocks, conversations {packed} "
            "with the loss on responses only"
        )
    if plan["data_format"] == "preference":
        return "rows", (
            f"{plan['conversations']:,} pairs, one per row (chosen and rejected side by side), up to {plan['block_size']} "
            f"tokens a side; {plan['examples_truncated']:,} sides cut short, {plan['examples_skipped']:,} pairs skipped "
            f"(an answer with no token left); DPO loss on the answers, beta {plan['beta']:g}, reference "
            f"{escape(str(plan['reference']))}, scored once before step 1"
        )
    if plan["data_format"] != "chat":
        return "blocks", (
            f"{plan['blocks']:,} of {plan['block_size']} tokens; {plan['tokens_dropped']:,} tokens dropped at the end"
        )
    rows = (
        f"packed into {plan['blocks']:,} rows of up to {plan['block_size']} tokens"
        if plan.get("packing")
        else f"one per row, up to {plan['block_size']} tokens"
    )
    return "conversations", (
        f"{plan.get('conversations', plan['blocks']):,}, {rows}; {plan['examples_truncated']:,} cut "
        f"short ({plan['tokens_dropped']:,} tokens), {plan['examples_skipped']:,} skipped (no response left); "
        "loss on responses only"
    )


def dpo_line(event: dict[str, Any]) -> str:
    """The DPO figures of an evaluation, in one line (and at step 0, what its baseline is)."""
    line = (
        f"     dpo loss {event['eval_dpo_loss']:.4f}  reward accuracy {event['eval_reward_accuracy']:.3f}  "
        f"margin {event['eval_reward_margin']:+.4f}  logp/token chosen {event['eval_chosen_logp']:.4f} "
        f"rejected {event['eval_rejected_logp']:.4f}  ({event['eval_pairs']:,} held-out pairs)"
    )
    return line + (f"\n     {escape(event['baseline'])}" if event.get("baseline") else "")


def trainable_row(plan: dict[str, Any]) -> str:
    """What trains, and for a LoRA adapter the gradient and optimizer memory it saves."""
    n, total = plan["trainable_parameters"], plan["parameters"]
    if n == total:
        return f"all {human(total)} parameters"
    return (
        f"LoRA adapter: {human(n)} parameters ({100 * n / total:.2f}%); gradients + AdamW state "
        f"{plan['training_state_bytes'] / 1e6:,.1f} MB instead of {plan['full_training_state_bytes'] / 1e6:,.1f} MB"
    )


class Display:
    """Turns lmtune's events into a live display (terminal) or log lines (pipe, file, CI)."""

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[str, TaskID] = {}
        self.phase = ""
        self.info = ""
        self.last_line = 0.0
        self.name_width = 30  # characters of a phase's name on a terminal (set from its width)

    def __enter__(self) -> Display:
        if self.live:
            # Fixed widths for all but the last column, which takes what is left and loses its end (lr first):
            # left to itself, Rich squeezes the bars and counts away on a terminal of 100 columns.
            width = self.console.width
            self.name_width, bar = (
                (22, 6) if width < 100 else (30, 8 if width < 110 else 16) if width < 140 else (40, 24)
            )
            info = max(10, width - self.name_width - bar - 23)  # the spinner, counts, time and gaps: 22, and a spare
            self.progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True, width=self.name_width)),
                BarColumn(bar_width=bar),
                MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=9)),
                TimeRemainingColumn(elapsed_when_finished=True, table_column=Column(no_wrap=True, min_width=7)),
                TextColumn(
                    "{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", max_width=info)
                ),
                console=self.console,
                transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()

    def print(self, *things: Any) -> None:
        self.console.print(*things)

    def _task(self, name: str, total: int | None) -> TaskID:
        assert self.progress
        if name not in self.tasks:
            # A new phase ends the previous ones. Rich's `tasks` is a list in which a task's id is not its
            # position once a task was removed (each evaluation's is), so tasks are found by id.
            for task in self.progress.tasks:
                if task.id in self.tasks.values() and task.total is None:
                    self.progress.update(task.id, total=1, completed=1)
            self.tasks[name] = self.progress.add_task(fit(name, self.name_width), total=total, info="")
        return self.tasks[name]

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "phase":
            self._phase(event)
        elif kind == "plan":
            self.print(plan_table(event, "Plan"))
        elif kind == "progress":
            if self.progress:
                self.progress.update(
                    self._task("training", event["total_steps"]), completed=event["step"], info=self.info
                )
        elif kind == "train":
            ppl = "" if event.get("perplexity") is None else f"  ppl {event['perplexity']:.2f}"  # DPO: none
            name = "loss" if ppl else "dpo loss"
            self.info = (
                f"{name} {event['loss']:.4f}{ppl}  {human(event['tokens_per_second'])} tok/s  lr {event['lr']:.2e}"
            )
            if self.progress:
                self.progress.update(self._task("training", None), info=self.info)
            else:
                self.print(f"step {event['step']}  {self.info}")
        elif kind == "stopped_early":
            self.print(
                f"[yellow]stopped early[/] at step {event['step']}: {event['evaluations']} evaluations without an "
                f"improvement of more than {event['delta']:g}; the best was step {event['best_step']} "
                f"(loss {event['best_eval_loss']:.4f})"
            )
        elif kind == "eval":
            per_source = "  ".join(f"{escape(one['name'])} {one['eval_loss']:.4f}" for one in event.get("sources", []))
            self.print(
                f"[cyan]eval[/] step {event['step']}: loss {event['eval_loss']:.4f}  perplexity {event['eval_perplexity']:.2f}"
                + (f"  (by source: {per_source})" if per_source else "")
            )
            if "eval_dpo_loss" in event:  # preference pairs: the DPO figures on the held-out pairs
                self.print(dpo_line(event))

    def _phase(self, event: dict[str, Any]) -> None:
        name, total, done = event["phase"], event.get("total"), event.get("done")
        if self.progress:
            task = self._task(name, total)
            if done is not None:  # info: a phase's own figure, such as tokens/s while tokenizing
                self.progress.update(task, completed=done, total=total, info=event.get("info", ""))
            if name == "evaluating" and done == total:
                # Evaluation repeats: forget its bar so the next one starts fresh.
                self.progress.remove_task(task)
                del self.tasks[name]
            return
        # Plain output: say when a phase starts, then at most one progress line every 10 seconds.
        now = time.monotonic()
        if name != self.phase:
            self.phase = name
            self.last_line = now
            self.print(f"{name}" + (f" ({total:,})" if total else "") + " ...")
        elif done is not None and total and now - self.last_line > 10:
            self.last_line = now
            self.print(f"{name}: {done:,}/{total:,}" + (f"  {event['info']}" if event.get("info") else ""))
        if name == "evaluating" and done == total:
            self.phase = ""
