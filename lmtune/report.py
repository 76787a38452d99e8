"""What each command prints when its work is done (the finished run, the tables of figures, the generated text),
and an error as lmtune's one red line.

The live display while work goes on is display.py's; this is the CLI layer's other half. The commands in
cli.py call these with the library's results (plain dicts and lists) and print nothing else themselves.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmtune.display import duration, plan_table

console = Console()
err_console = Console(stderr=True)


def finished(result: dict[str, Any], dry_run: bool) -> None:
    """What a finished run did: time and speed, perplexity before and after, where it is; or the plan of a dry run;
    or that the run had finished before."""
    if result.get("already_finished"):
        console.print(
            f"run {result['output']} already finished ({result['steps']} steps); nothing to train", soft_wrap=True
        )
        return
    if dry_run:
        title = "Dry run: nothing was trained and no run folder was made (tokenized data is cached for the real run)"
        console.print(plan_table(result, title))
        return
    console.print(
        f"[bold green]done[/] in {duration(result['train_seconds'])}: {result['steps']} steps, "
        f"{result['train_tokens']:,} tokens, {result['tokens_per_second']:,.0f} tokens/s\n"
        f"perplexity [bold]{result['base_eval_perplexity']:.2f}[/] before -> [bold]{result['eval_perplexity']:.2f}[/] after "
        f"(loss {result['base_eval_loss']:.4f} -> {result['eval_loss']:.4f}, {result['eval_tokens']:,} validation tokens)\n"
        f'saved to [bold]{result["output"]}[/]; try: lmtune generate "..."  or  lmtune eval',
        soft_wrap=True,  # whole lines in a log file; a terminal wraps them itself
    )
    if result.get("stopped_early_at") is not None:
        console.print(f"stopped early at step {result['stopped_early_at']} of {result['total_steps']}: no improvement")
    if result.get("best_step") is not None:
        console.print(
            f"the run folder holds the best model: step {result['best_step']}, loss {result['best_eval_loss']:.4f} "
            f"(the figures above are the last step's)",
            soft_wrap=True,
        )
    if "eval_dpo_loss" in result:  # preference pairs: the DPO figures on the held-out pairs
        console.print(
            f"dpo loss {result['eval_dpo_loss']:.4f}, reward accuracy {result['eval_reward_accuracy']:.3f}, "
            f"margin {result['eval_reward_margin']:+.4f} (against {escape(result['reference'])}, beta {result['beta']:g})",
            soft_wrap=True,
        )
    if result["hub_url"]:
        console.print(f"uploaded to [bold]{result['hub_url']}[/]")
    if result["finished_despite"]:
        console.print(
            f"({result['finished_despite']} came after the last step: the run was finished and saved, "
            "which takes as long as the checkpoint it asks for)"
        )


def prepared(r: dict[str, Any], model: str | None) -> None:
    """What `prepare` wrote (or found already written), and how to train on it."""
    said = "already prepared (same data, settings and tokenizer)" if r["already_prepared"] else "prepared"
    console.print(
        f"[bold green]{said}[/] {r['output']}: {r['documents']:,} training documents, {r['train_tokens']:,} tokens "
        f"({r['empty_documents']:,} empty skipped); validation {r['validation_tokens']:,} tokens in "
        f"{r['validation_documents']:,} documents ({r['validation']})"
        + ("" if r["already_prepared"] else f"; {duration(r['seconds'])}, {r['tokens_per_second']:,.0f} tokens/s")
        + f"\ntrain on it: lmtune finetune {model or 'MODEL'} --data {r['output']}",
        soft_wrap=True,
        highlight=False,
    )


def merged(run: str, written: Path) -> None:
    """What `merge` wrote, and how to load it."""
    console.print(
        f"[bold green]merged[/] {run} into [bold]{written}[/]; load it with AutoModelForCausalLM.from_pretrained",
        soft_wrap=True,
    )


# --- generate ---------------------------------------------------------------------------------------------------


def model_inputs(name: str, tokenizer: Any, texts: list[str], chat: bool | None) -> tuple[list[str], str]:
    """What a model is given: the prompts, or (chat) each as a user turn; and what to print before its output."""
    from lmtune.generate import as_chat, trained_on_chat

    if chat if chat is not None else trained_on_chat(name):
        return [as_chat(tokenizer, t) for t in texts], ""
    return texts, texts[0]


def jsonl(texts: list[str], net: Any, tok: Any, given: list[str], s: Any) -> None:
    """--prompts: one JSON line per prompt, with its continuations."""
    from lmtune.generate import generate

    for text, outs in zip(texts, generate(net, tok, given, s), strict=True):
        print(json.dumps({"prompt": text, "completions": outs}), flush=True)


def side_by_side(text: str, models: list[tuple[str, Any, Any]], chat: bool | None, s: Any) -> None:
    """--compare: each model's continuations of the prompt in a column of one table."""
    from lmtune.generate import generate

    table = Table(title=f"[bold]{escape(text)}[/] ...", show_lines=True)
    columns = []
    for name, net, tok in models:
        given, echo = model_inputs(name, tok, [text], chat)
        columns.append([echo + out for out in generate(net, tok, given, s)[0]])
        table.add_column(Path(name).name if Path(name).exists() else name, ratio=1)  # a folder by its name
    for row in zip(*columns, strict=True):
        table.add_row(*row)
    console.print(table)


def stream_one(net: Any, tok: Any, given: list[str], echo: str, s: Any) -> None:
    """One continuation, written as it is made, after the prompt: which is written with the first piece, so
    that a notice about the prompt (too long for the context) comes before it, on a line of its own."""
    from lmtune.generate import generate

    said = [echo]

    def write(piece: str) -> None:
        sys.stdout.write(said.pop() + piece if said else piece)
        sys.stdout.flush()

    generate(net, tok, given, s, on_text=write)
    write("\n")


def several(net: Any, tok: Any, given: list[str], echo: str, s: Any) -> None:
    """-n N: the continuations one after another, numbered."""
    from lmtune.generate import generate

    for i, out in enumerate(generate(net, tok, given, s)[0], 1):
        console.print(f"[bold]--- {i}[/]")
        print(echo + out)


# --- eval ---------------------------------------------------------------------------------------------------------


def scores(results: list[dict[str, Any]], as_json: bool) -> None:
    """eval: each model's loss, perplexity and bits per byte (or, on preference pairs, which answer it prefers)."""
    if as_json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    elif "pair_accuracy" in results[0]:  # preference pairs: which answer each model prefers, side by side
        table = Table(title=f"Preference pairs of {results[0]['data']} (per answer token)", title_justify="left")
        for col in ("model", "pairs", "chosen preferred", "margin", "logp chosen", "logp rejected"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in results:
            table.add_row(
                escape(r["model"]), f"{r['pairs']:,}", f"{r['pair_accuracy']:.3f}", f"{r['pair_margin']:+.4f}",
                f"{r['chosen_logp']:.4f}", f"{r['rejected_logp']:.4f}",
            )  # fmt: skip
        console.print(table)
    else:
        perplexities(results)


def perplexities(results: list[dict[str, Any]]) -> None:
    """eval's table: a run of several sources shows its whole (token-weighted, as training reports it), then each."""
    table = Table(title=f"Evaluation on {results[0]['data']}", title_justify="left")
    for col in ("model", "tokens scored", "loss", "perplexity", "bits/byte"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for r in results:
        for name, f in [(r["model"], r), *((f"  {escape(one['name'])}", one) for one in r.get("sources", []))]:
            row = (f"{f['tokens']:,}", f"{f['loss']:.4f}", f"{f['perplexity']:.2f}", f"{f['bits_per_byte']:.4f}")
            table.add_row(name, *row)
    console.print(table)
    for r in results:
        console.print(f"[dim]{r['model']}: {r['perplexity_kind']}[/]")


def answers(results: list[dict[str, Any]], as_json: bool) -> None:
    """eval --generate: each model's scores in one table (or JSON), and where its answers were written."""
    if as_json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return
    first = results[0]
    console.print(
        f"Answers to {first['conversations']:,} conversations of {escape(first['data'])} ({first['generation']}):",
        soft_wrap=True,
    )
    table = Table()
    keys = list(dict.fromkeys(key for r in results for key in r["metrics"]))
    table.add_column("model")
    for key in keys:
        table.add_column(key, justify="right")
    for r in results:
        table.add_row(escape(r["model"]), *(f"{r['metrics'][k]:.4f}" if k in r["metrics"] else "" for k in keys))
    console.print(table)
    if first["skipped"]:
        console.print(f"[dim]{first['skipped']:,} conversations skipped: no user turn with an answer after it[/]")
    for r in results:
        card = f"; scores added to its model card {escape(r['card'])}" if "card" in r else ""
        console.print(f"[dim]{escape(r['model'])}: answers in {escape(r['predictions'])}{card}[/]", soft_wrap=True)


# --- data show, recipes -------------------------------------------------------------------------------------------


def training_rows(view: Any) -> None:
    """data show: what the data is, the legend, then each row token by token (coloured on a terminal)."""
    from lmtune.show import as_text, legend

    colour = console.is_terminal
    for line in view.about:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(legend(colour), soft_wrap=True)
    for row in view.rows:
        console.print()
        console.print(f"── {row.title} ──", style="bold" if colour else None, markup=False, highlight=False)
        console.print(as_text(row, colour), soft_wrap=True)


def recipes(found: dict[str, Path]) -> None:
    """recipes list: each recipe with the first line of its header comment."""
    table = Table("recipe", "what it does", box=None)
    for name, path in found.items():
        lines = [line.strip("# ") for line in path.read_text().splitlines() if line.startswith("#")]
        table.add_row(f"[bold]{name}[/]", next((line for line in lines if line), ""))
    console.print(table)


# --- errors -------------------------------------------------------------------------------------------------------


def usage_error(err: Any) -> NoReturn:
    """A command line click cannot parse: its message and the command whose --help says more."""
    if type(err).__name__ == "NoArgsIsHelpError":  # `lmtune` alone (typer too tells it by name)
        if err.format_message().strip():  # with Rich, typer has printed the help already
            print(err.format_message())
        sys.exit(err.exit_code)
    ctx = getattr(err, "ctx", None)  # a usage error knows its command
    fail(err.format_message().strip() + (f" (see {ctx.command_path} --help)" if ctx else ""), err.exit_code)


def unforeseen(err: Exception) -> NoReturn:
    """A bug or a failure nobody foresaw, as one line; gloo's words for a lost process in ours."""
    first = (str(err).splitlines() or [""])[0]
    if "closed by peer" in first or "reset by peer" in first:
        fail(
            "another process of this run ended (gloo: connection closed by peer), so this one stopped too; that "
            "process's own error, or the launcher's line about it, says why. Resume with --resume",
            1,
        )
    fail(f"{type(err).__name__}: {first} (LMTUNE_DEBUG=1 shows the traceback)", 1)


def fail(message: str, exit_code: int) -> NoReturn:
    """Print `message` as lmtune's one red line and exit."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(exit_code)
