"""The `lmtune` command. Each command turns its arguments into a config and makes one library call.

Heavy libraries (torch, transformers, datasets) are imported inside the commands so that
`lmtune --help` answers at once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lmtune import atomic, config
from lmtune.cpu_launch import cpu_processes_requested, launch_cpu_processes
from lmtune.errors import LmtuneError
from lmtune.metrics import SHIPPED

app = typer.Typer(
    help="Fine-tune causal language models: finetune, generate, eval, merge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
recipes_app = typer.Typer(help="List, show and copy the shipped recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
data_app = typer.Typer(help="Look at training data as training sees it.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)


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


def opt(key: str, *names: str, **kwargs: Any) -> Any:
    """A flag for config key `key`: its name is the key's, its help the key's docstring."""
    flag = "--" + key.replace("_", "-")
    if config.Config.model_fields[key].annotation is bool:  # --lora/--no-lora: a flag can undo a recipe's true
        flag += "/--no-" + key.replace("_", "-")
    return typer.Option(flag, *names, help=config.help_for(key), **kwargs)


MODEL, LORA, DATA, TRAIN = "Model", "LoRA", "Data", "Training"
MEMORY = "Memory (a bigger model on the same hardware)"
ANSWERS = "Answers (--generate)"
DTYPES = get_args(config.Config.model_fields["dtype"].annotation)  # float32, bfloat16, float16, auto


@app.command()
def finetune(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            help="MODEL (hub id or folder) and any key=value config overrides, e.g. lr=1e-4.", show_default=False
        ),
    ] = None,
    recipe: Annotated[
        str | None, typer.Option("--recipe", "-r", help="Recipe name (lmtune recipes list) or YAML file.")
    ] = None,
    model: Annotated[str | None, opt("model", "-m", rich_help_panel=MODEL)] = None,
    from_scratch: Annotated[bool | None, opt("from_scratch", rich_help_panel=MODEL)] = None,
    tokenizer: Annotated[str | None, opt("tokenizer", rich_help_panel=MODEL)] = None,
    vocab_size: Annotated[int | None, opt("vocab_size", rich_help_panel=MODEL)] = None,
    n_layer: Annotated[int | None, opt("n_layer", rich_help_panel=MODEL)] = None,
    n_head: Annotated[int | None, opt("n_head", rich_help_panel=MODEL)] = None,
    n_embd: Annotated[int | None, opt("n_embd", rich_help_panel=MODEL)] = None,
    n_positions: Annotated[int | None, opt("n_positions", rich_help_panel=MODEL)] = None,
    dtype: Annotated[str | None, opt("dtype", rich_help_panel=MODEL)] = None,
    trust_remote_code: Annotated[bool | None, opt("trust_remote_code", rich_help_panel=MODEL)] = None,
    dropout: Annotated[float | None, opt("dropout", rich_help_panel=MODEL)] = None,
    lora: Annotated[bool | None, opt("lora", rich_help_panel=LORA)] = None,
    lora_rank: Annotated[int | None, opt("lora_rank", rich_help_panel=LORA)] = None,
    lora_alpha: Annotated[int | None, opt("lora_alpha", rich_help_panel=LORA)] = None,
    lora_dropout: Annotated[float | None, opt("lora_dropout", rich_help_panel=LORA)] = None,
    lora_targets: Annotated[str | None, opt("lora_targets", rich_help_panel=LORA)] = None,
    quantize: Annotated[str | None, opt("quantize", rich_help_panel=MEMORY)] = None,
    gradient_checkpointing: Annotated[bool | None, opt("gradient_checkpointing", rich_help_panel=MEMORY)] = None,
    optimizer: Annotated[str | None, opt("optimizer", rich_help_panel=MEMORY)] = None,
    data: Annotated[list[str] | None, opt("data", "-d", rich_help_panel=DATA, metavar="TEXT")] = None,
    data_weights: Annotated[str | None, opt("data_weights", rich_help_panel=DATA)] = None,
    text_column: Annotated[str | None, opt("text_column", rich_help_panel=DATA)] = None,
    data_format: Annotated[str | None, opt("data_format", rich_help_panel=DATA)] = None,
    validation_data: Annotated[str | None, opt("validation_data", rich_help_panel=DATA)] = None,
    validation_percent: Annotated[float | None, opt("validation_percent", rich_help_panel=DATA)] = None,
    txt_documents: Annotated[str | None, opt("txt_documents", rich_help_panel=DATA)] = None,
    block_size: Annotated[int | None, opt("block_size", rich_help_panel=DATA)] = None,
    streaming: Annotated[bool | None, opt("streaming", rich_help_panel=DATA)] = None,
    packing: Annotated[bool | None, opt("packing", rich_help_panel=DATA)] = None,
    epochs: Annotated[int | None, opt("epochs", rich_help_panel=TRAIN)] = None,
    max_steps: Annotated[int | None, opt("max_steps", rich_help_panel=TRAIN)] = None,
    batch_size: Annotated[int | None, opt("batch_size", "-b", rich_help_panel=TRAIN)] = None,
    gradient_accumulation_steps: Annotated[
        int | None, opt("gradient_accumulation_steps", rich_help_panel=TRAIN)
    ] = None,
    lr: Annotated[float | None, opt("lr", rich_help_panel=TRAIN)] = None,
    schedule: Annotated[str | None, opt("schedule", rich_help_panel=TRAIN)] = None,
    warmup_ratio: Annotated[float | None, opt("warmup_ratio", rich_help_panel=TRAIN)] = None,
    weight_decay: Annotated[float | None, opt("weight_decay", rich_help_panel=TRAIN)] = None,
    max_grad_norm: Annotated[float | None, opt("max_grad_norm", rich_help_panel=TRAIN)] = None,
    mixed_precision: Annotated[str | None, opt("mixed_precision", rich_help_panel=TRAIN)] = None,
    seed: Annotated[int | None, opt("seed", rich_help_panel=TRAIN)] = None,
    eval_every: Annotated[int | None, opt("eval_every", rich_help_panel=TRAIN)] = None,
    save_every: Annotated[int | None, opt("save_every", rich_help_panel=TRAIN)] = None,
    keep_checkpoints: Annotated[int | None, opt("keep_checkpoints", rich_help_panel=TRAIN)] = None,
    keep_best: Annotated[bool | None, opt("keep_best", rich_help_panel=TRAIN)] = None,
    early_stopping: Annotated[int | None, opt("early_stopping", rich_help_panel=TRAIN)] = None,
    early_stopping_delta: Annotated[float | None, opt("early_stopping_delta", rich_help_panel=TRAIN)] = None,
    log_every: Annotated[int | None, opt("log_every", rich_help_panel=TRAIN)] = None,
    report_to: Annotated[str | None, opt("report_to", rich_help_panel=TRAIN)] = None,
    compile: Annotated[bool | None, opt("compile", rich_help_panel=TRAIN)] = None,
    beta: Annotated[float | None, opt("beta", rich_help_panel=TRAIN)] = None,
    reference: Annotated[str | None, opt("reference", rich_help_panel=TRAIN)] = None,
    output: Annotated[str | None, opt("output", "-o")] = None,
    push_to_hub: Annotated[str | None, opt("push_to_hub")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run folder at --output.")] = False,
    resume: Annotated[
        bool,
        typer.Option(
            help="Continue the unfinished run at --output from its newest complete checkpoint. `--resume auto`: "
            "that if there is one, else start the run; a finished run is left as it is (for requeued jobs)."
        ),
    ] = False,
    force: Annotated[
        bool,
        typer.Option(
            help="With --resume: continue even if settings that change the model or data order, or the data, differ."
        ),
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="Prepare everything and print the plan, without training.")] = False,
) -> None:
    """Fine-tune MODEL on --data (or train a new model with --from-scratch) and save a run folder.

    Examples:  lmtune finetune gpt2 --data wikitext  |  lmtune finetune ./base --data corpus.txt lr=1e-4
    |  lmtune finetune ./base --data chat.jsonl --data books.txt --data-weights 3,1
    """
    flags = {k: v for k, v in locals().items() if k in config.Config.model_fields}
    # `--resume auto`: --resume is a flag, so "auto" arrives among the arguments
    how: bool | Literal["auto"] = "auto" if resume and "auto" in (args or []) else resume
    args = [a for a in args or [] if not (how == "auto" and a == "auto")]
    models = [a for a in args if "=" not in a]
    overrides = [a for a in args if "=" in a]
    if len(models) > 1 or (models and model and models[0] != model):
        given = ", ".join([*models, *([model] if model else [])])
        raise LmtuneError(f"expected one MODEL, got {given}; overrides are written key=value")
    if models:
        flags["model"] = models[0]
    cfg = config.build(recipe, flags, overrides)

    quiet_libraries()
    from lmtune.display import Display, plan_table
    from lmtune.events import silent
    from lmtune.train import finetune as run_finetune

    # Under `accelerate launch` every process runs this; only the first (RANK 0) talks to the terminal.
    if os.environ.get("RANK", "0") != "0":
        run_finetune(cfg, dry_run=dry_run, overwrite=overwrite, resume=how, force=force, report=silent)
        return
    with Display(console) as display:
        result = run_finetune(cfg, dry_run=dry_run, overwrite=overwrite, resume=how, force=force, report=display)
    if result.get("already_finished"):
        console.print(
            f"run {result['output']} already finished ({result['steps']} steps); nothing to train", soft_wrap=True
        )
    elif dry_run:
        title = "Dry run: nothing was trained and no run folder was made (tokenized data is cached for the real run)"
        console.print(plan_table(result, title))
    else:
        print_finished(result)


@app.command()
def prepare(
    data: Annotated[str, typer.Argument(help="Data to tokenize, as for finetune --data.", show_default=False)],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model whose tokenizer to use.")] = None,
    tokenizer: Annotated[str | None, opt("tokenizer")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder to write. Default: DATA's name + '-tokens', here.")
    ] = None,
    text_column: Annotated[str | None, opt("text_column")] = None,
    data_format: Annotated[str | None, opt("data_format")] = None,
    validation_data: Annotated[str | None, opt("validation_data")] = None,
    validation_percent: Annotated[float | None, opt("validation_percent")] = None,
    txt_documents: Annotated[str | None, opt("txt_documents")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace prepared data already at --output.")] = False,
) -> None:
    """Tokenize DATA once into a folder that finetune --data reads: token streams, their counts and checksums,
    and the tokenizer. Prepare once on shared storage for a job on several machines.

    Example:  lmtune prepare corpus.txt --model gpt2 --output corpus-tokens  |  lmtune finetune gpt2 --data corpus-tokens
    """
    flags = {k: v for k, v in locals().items() if k in config.Config.model_fields and k != "output"}
    cfg = config.build(None, flags)
    target = output or Path(f"{Path(data.rstrip('/')).stem.replace(':', '-') or 'data'}-tokens")
    quiet_libraries()
    from lmtune.data import prepare as run_prepare
    from lmtune.display import Display, duration

    with Display(err_console) as display:
        r = run_prepare(cfg, target, overwrite, report=display)
    said = "already prepared (same data, settings and tokenizer)" if r["already_prepared"] else "prepared"
    console.print(
        f"[bold green]{said}[/] {r['output']}: {r['documents']:,} training documents, {r['train_tokens']:,} tokens "
        f"({r['empty_documents']:,} empty skipped); validation {r['validation_tokens']:,} tokens in "
        f"{r['validation_documents']:,} documents ({r['validation']})"
        + ("" if r["already_prepared"] else f"; {duration(r['seconds'])}, {r['tokens_per_second']:,.0f} tokens/s")
        + f"\ntrain on it: lmtune finetune {cfg.model or 'MODEL'} --data {r['output']}",
        soft_wrap=True,
        highlight=False,
    )


def print_finished(result: dict[str, Any]) -> None:
    """What a finished run did: time and speed, perplexity before and after, where it is."""
    from lmtune.display import duration

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


@app.command()
def generate(
    prompt: Annotated[str | None, typer.Argument(help="Text to continue.", show_default=False)] = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Run folder, model folder or hub id. Default: the latest run.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to add at most (generation stops at EOS).")] = 50,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 is greedy.")] = 0.8,
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the k likeliest tokens; 0 turns it off.")] = 50,
    top_p: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Sample from the smallest set of tokens holding this probability.")
    ] = 0.95,
    num_return_sequences: Annotated[
        int, typer.Option("--num-return-sequences", "-n", min=1, help="Continuations per prompt.")
    ] = 1,
    greedy: Annotated[bool, typer.Option(help="Always take the likeliest token (same as --temperature 0).")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed for reproducible sampling.")] = None,
    prompts: Annotated[
        Path | None, typer.Option(help="File of prompts, one per line (or JSONL with a `prompt` field); prints JSONL.")
    ] = None,
    compare: Annotated[
        str | None, typer.Option(help="Another model (e.g. the base) to continue the same prompt, side by side.")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")] = "float32",
    chat: Annotated[
        bool | None,
        typer.Option(
            "--chat/--no-chat",
            help="Send the prompt as a user turn in the model's chat template and print the answer. "
            "Default: when the run was trained on chat data.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Continue PROMPT with a model (or answer it, for chat runs); the text streams as it is made.

    Example:  lmtune generate "Hello, my dog" --max-new-tokens 40 --seed 0
    """
    from lmtune import runs

    if (prompt is None) == (prompts is None):
        raise LmtuneError("give a PROMPT or --prompts FILE (one of the two)")
    if dtype not in DTYPES:
        raise LmtuneError(f"--dtype {dtype}: choose {', '.join(DTYPES[:-1])} or {DTYPES[-1]}")
    if (greedy or temperature == 0) and num_return_sequences > 1:
        raise LmtuneError(
            f"--greedy gives one continuation, the same each time; sample instead (--temperature above 0) "
            f"or drop -n {num_return_sequences}"
        )
    model = model or str(runs.latest())
    texts = read_prompts(prompts) if prompts else [prompt or ""]
    quiet_libraries()
    from lmtune.generate import Sampling, load

    s = Sampling(max_new_tokens, 0.0 if greedy else temperature, top_k, top_p, num_return_sequences, seed)
    net, tok = load(model, dtype)
    if prompts:
        print_jsonl(texts, net, tok, model_inputs(model, tok, texts, chat)[0], s)
    elif compare:
        print_side_by_side(texts[0], [(model, net, tok), (compare, *load(compare, dtype))], chat, s)
    elif num_return_sequences == 1:
        stream_one(net, tok, *model_inputs(model, tok, texts, chat), s)
    else:
        print_several(net, tok, *model_inputs(model, tok, texts, chat), s)


def model_inputs(name: str, tokenizer: Any, texts: list[str], chat: bool | None) -> tuple[list[str], str]:
    """What a model is given: the prompts, or (chat) each as a user turn; and what to print before its output."""
    from lmtune.generate import as_chat, trained_on_chat

    if chat if chat is not None else trained_on_chat(name):
        return [as_chat(tokenizer, t) for t in texts], ""
    return texts, texts[0]


def print_jsonl(texts: list[str], net: Any, tok: Any, given: list[str], s: Any) -> None:
    """--prompts: one JSON line per prompt, with its continuations."""
    from lmtune.generate import generate

    for text, outs in zip(texts, generate(net, tok, given, s), strict=True):
        print(json.dumps({"prompt": text, "completions": outs}), flush=True)


def print_side_by_side(text: str, models: list[tuple[str, Any, Any]], chat: bool | None, s: Any) -> None:
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


def print_several(net: Any, tok: Any, given: list[str], echo: str, s: Any) -> None:
    """-n N: the continuations one after another, numbered."""
    from lmtune.generate import generate

    for i, out in enumerate(generate(net, tok, given, s)[0], 1):
        console.print(f"[bold]--- {i}[/]")
        print(echo + out)


def read_prompts(path: Path) -> list[str]:
    """The prompts in a file: one per line; JSONL with a `prompt` field; or a JSON list of them."""
    if not path.is_file():
        raise LmtuneError(f"no such prompts file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LmtuneError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if path.suffix == ".json":
        prompts = json_prompts(path, text)
    elif path.suffix == ".jsonl":
        prompts = [jsonl_prompt(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LmtuneError(f"prompts file {path} holds no prompts")
    return prompts


def jsonl_prompt(path: Path, n: int, line: str) -> str:
    try:
        row = json.loads(line)
        prompt = row["prompt"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LmtuneError(f"{path} line {n}: expected a JSON object with a `prompt` field") from None
    if not isinstance(prompt, str):
        raise LmtuneError(f"{path} line {n}: `prompt` must be text, not {json_kind(prompt)}")
    return prompt


def json_prompts(path: Path, text: str) -> list[str]:
    expected = 'expected a JSON list of strings or of {"prompt": "..."} objects'
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise LmtuneError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); {expected}") from None
    if not isinstance(items, list):
        raise LmtuneError(f"{path} holds {json_kind(items)}; {expected}")
    prompts = []
    for i, item in enumerate(items, 1):
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise LmtuneError(f"{path} item {i}: expected a string or an object with a `prompt` string")
        prompts.append(prompt)
    return [p for p in prompts if p.strip()]


def json_kind(value: Any) -> str:
    """What a JSON value is, in words, for error messages."""
    kinds = {type(None): "null", bool: "true/false", list: "a list", dict: "an object", str: "a string"}
    return kinds.get(type(value), "a number")


# eval --generate's options, declared once here so that eval's signature stays readable.
GenerateAnswers = Annotated[
    bool,
    typer.Option(
        "--generate",
        help="Instead of the perplexity: answer each conversation's last user turn and score the answers "
        "(--metric). Chat runs, or any model with --chat.",
        rich_help_panel=ANSWERS,
    ),
]
Metric = Annotated[
    list[str] | None,
    typer.Option(
        help=f"Metric for the answers: {', '.join(SHIPPED)} (lmtune's own, offline), or any name or "
        "script evaluate.load takes (a hub metric needs the network or its cache). Repeat for several. "
        "Default: lmtune's own.",
        show_default=False,
        rich_help_panel=ANSWERS,
    ),
]
ChatAnswers = Annotated[
    bool,
    typer.Option(
        "--chat",
        help="Answer in the model's chat template (lmtune's simple one if it has none) although it was not "
        "trained on chat data.",
        rich_help_panel=ANSWERS,
    ),
]
AnswerTokens = Annotated[
    int | None,
    typer.Option(min=1, help="Tokens per answer at most (it ends at EOS). Default: 128.", rich_help_panel=ANSWERS),
]
AnswerTemperature = Annotated[
    float | None,
    typer.Option(
        min=0.0,
        help="Sample at this temperature (default 0.8 when sampling); without it, greedy.",
        rich_help_panel=ANSWERS,
    ),
]
AnswerTopK = Annotated[
    int | None,
    typer.Option(min=0, help="Sample from the k likeliest tokens (default 50).", rich_help_panel=ANSWERS),
]
AnswerTopP = Annotated[
    float | None,
    typer.Option(min=0.0, max=1.0, help="Sample from this much probability (default 0.95).", rich_help_panel=ANSWERS),
]
AnswerSeed = Annotated[int | None, typer.Option(help="Seed for reproducible sampling.", rich_help_panel=ANSWERS)]
PredictionsFolder = Annotated[
    Path | None,
    typer.Option(
        help="Folder for the answers (predictions-NAME.jsonl). Default: a run's own folder (predictions.jsonl), "
        "else the current folder.",
        show_default=False,
        rich_help_panel=ANSWERS,
    ),
]


@app.command("eval")
def eval_(
    models: Annotated[
        list[str] | None,
        typer.Argument(help="Run folders, model folders or hub ids. Default: the latest run.", show_default=False),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option("--data", "-d", help="Data to score, as for finetune --data. Default: the run's validation data."),
    ] = None,
    block_size: Annotated[
        int | None,
        typer.Option(
            min=2,
            help="Context window in tokens. Default: the run's block size, else the model's context (at most 1024).",
        ),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Tokens the window moves each time; smaller scores each token with more history. Default: the block size.",
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Windows per forward pass (with --generate: prompts answered at once).")
    ] = 8,
    text_column: Annotated[str, typer.Option(help="Column that holds the text in tabular data.")] = "text",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    chart: Annotated[
        Path | None, typer.Option(help="Also write a bar chart of the perplexities to this image (.png, .svg, .pdf).")
    ] = None,
    generate_answers: GenerateAnswers = False,
    metric: Metric = None,
    chat: ChatAnswers = False,
    max_new_tokens: AnswerTokens = None,
    temperature: AnswerTemperature = None,
    top_k: AnswerTopK = None,
    top_p: AnswerTopP = None,
    seed: AnswerSeed = None,
    predictions: PredictionsFolder = None,
) -> None:
    """Loss, perplexity and bits per byte of one or more models on the same data; with --generate, their answers
    scored by metrics.

    Example:  lmtune eval runs/my-run ./base-model --data test.txt --stride 512  |  lmtune eval runs/chat --generate
    """
    from lmtune import runs

    targets = models or [str(runs.latest())]
    sampling = {"--temperature": temperature, "--top-k": top_k, "--top-p": top_p, "--seed": seed}
    if generate_answers:
        perplexity_only = {"--block-size": block_size, "--stride": stride, "--chart": chart}
        for flag, value in perplexity_only.items():
            if value is not None:
                raise LmtuneError(f"{flag} is for the perplexity and --generate scores answers; drop one of the two")
        answer(targets, data, metric, chat, max_new_tokens, temperature, top_k, top_p, seed, predictions,
               batch_size, text_column, as_json)  # fmt: skip
        return
    answer_flags = {"--metric": metric, "--chat": chat or None, "--max-new-tokens": max_new_tokens, **sampling}
    given = [flag for flag, value in {**answer_flags, "--predictions": predictions}.items() if value is not None]
    if given:
        raise LmtuneError(f"{given[0]} is for answers, which --generate scores; add --generate")
    score_models(targets, data, block_size, stride, batch_size, text_column, as_json, chart)


def answer(
    targets: list[str], data: str | None, metric: list[str] | None, chat: bool, max_new_tokens: int | None,
    temperature: float | None, top_k: int | None, top_p: float | None, seed: int | None, predictions: Path | None,
    batch_size: int, text_column: str, as_json: bool,
) -> None:  # fmt: skip
    """eval --generate: each model's answers to the validation conversations, scored by the metrics."""
    if predictions is not None:
        check_folder("--predictions", predictions)
    quiet_libraries()
    from lmtune.answers import MAX_NEW_TOKENS, evaluate_answers
    from lmtune.display import Display
    from lmtune.generate import Sampling

    sampled = any(v is not None for v in (temperature, top_k, top_p))
    s = Sampling(
        max_new_tokens or MAX_NEW_TOKENS, (0.8 if temperature is None else temperature) if sampled else 0.0,
        50 if top_k is None else top_k, 0.95 if top_p is None else top_p, 1, seed,
    )  # fmt: skip
    with Display(err_console) as display:
        results = evaluate_answers(
            targets, data, metric or list(SHIPPED), s, batch_size, chat=chat, text_column=text_column,
            predictions_folder=predictions, report=display,
        )  # fmt: skip
    if results:  # the first process's; the others only answered their share
        print_answers(results, as_json)


def score_models(
    targets: list[str], data: str | None, block_size: int | None, stride: int | None, batch_size: int,
    text_column: str, as_json: bool, chart: Path | None,
) -> None:  # fmt: skip
    """eval: loss, perplexity and bits per byte of each model, as a table or JSON, and the chart."""
    if chart:
        check_chart(chart)
    quiet_libraries()
    from lmtune.display import Display
    from lmtune.dpo import is_preference, models_on_pairs
    from lmtune.evaluate import evaluate_models

    with Display(err_console) as display:
        if is_preference(data, text_column):  # pairs: which answer each model prefers, no perplexity
            results = models_on_pairs(targets, str(data), block_size, batch_size, text_column, report=display)
        else:
            results = evaluate_models(targets, data, block_size, stride, batch_size, text_column, report=display)
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
        table = Table(title=f"Evaluation on {results[0]['data']}", title_justify="left")
        for col in ("model", "tokens scored", "loss", "perplexity", "bits/byte"):
            table.add_column(col, justify="left" if col == "model" else "right")
        for r in results:
            # A run of several sources: its whole (token-weighted, as training reports it), then each source's.
            for name, f in [(r["model"], r), *((f"  {escape(one['name'])}", one) for one in r.get("sources", []))]:
                row = (f"{f['tokens']:,}", f"{f['loss']:.4f}", f"{f['perplexity']:.2f}", f"{f['bits_per_byte']:.4f}")
                table.add_row(name, *row)
        console.print(table)
        for r in results:
            console.print(f"[dim]{r['model']}: {r['perplexity_kind']}[/]")
    if chart and "pair_accuracy" in results[0]:
        raise LmtuneError("--chart draws perplexities; preference pairs have none (see the table)")
    if chart:  # after the figures, so that a failing chart loses none of them
        from lmtune.card import plot_perplexities

        plot_perplexities(results, chart)
        err_console.print(f"chart written to {chart}")


def check_chart(chart: Path) -> None:
    """Fail before the evaluation, not after it, when --chart cannot be written."""
    if chart.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LmtuneError(f"--chart {chart}: name a .png, .svg or .pdf file")
    if not chart.parent.is_dir():
        raise LmtuneError(f"--chart {chart}: folder {chart.parent} does not exist")
    if chart.is_dir():
        raise LmtuneError(f"--chart {chart} is a folder; name an image file, e.g. {chart / 'perplexity.png'}")
    if reason := atomic.cannot_write_in(chart.parent):
        raise LmtuneError(f"--chart {chart}: cannot write in {chart.parent} ({reason}); choose another folder")
    if chart.exists() and not os.access(chart, os.W_OK):
        raise LmtuneError(f"--chart {chart}: the file is read-only; choose another name")


def check_folder(flag: str, folder: Path) -> None:
    """Fail before the work, not after it, when the folder `flag` names cannot take files."""
    if not folder.is_dir():
        raise LmtuneError(f"{flag} {folder}: no such folder; make it first or choose another")
    if reason := atomic.cannot_write_in(folder):
        raise LmtuneError(f"{flag} {folder}: cannot write in it ({reason}); choose another folder")


def print_answers(results: list[dict[str, Any]], as_json: bool) -> None:
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


@app.command()
def merge(
    run: Annotated[str, typer.Argument(help="Run folder trained with --lora.", show_default=False)],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Folder to write. Default: RUN-merged beside the run.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --output folder.")] = False,
) -> None:
    """Merge a LoRA run's adapter into its base model: a plain model folder that transformers loads without peft.

    Example:  lmtune merge runs/my-lora-run --output my-model
    """
    quiet_libraries()
    from lmtune.lora import merge as run_merge

    target = output or Path(f"{Path(run).expanduser().resolve()}-merged")
    written = run_merge(run, target, overwrite)
    console.print(
        f"[bold green]merged[/] {run} into [bold]{written}[/]; load it with AutoModelForCausalLM.from_pretrained"
    )


@app.command()
def push(
    run: Annotated[Path, typer.Argument(help="Run folder to upload.", show_default=False)],
    repo: Annotated[str, typer.Argument(help="Hub repo, user/name or org/name (created private).", show_default=False)],
) -> None:
    """Upload a finished run folder to the Hugging Face Hub (without its checkpoints), using your hub token.

    Example:  lmtune push runs/my-run me/my-model
    """
    from lmtune import hub, runs

    if not (run / runs.SUMMARY).is_file():
        raise LmtuneError(f"{run} is not a finished run folder (no {runs.SUMMARY})")
    hub.check_push(repo, command="push")
    console.print(f"uploaded {run} to [bold]{hub.push(run, repo)}[/]")


@recipes_app.command("list")
def recipes_list() -> None:
    """The shipped recipes and what each does."""
    table = Table("recipe", "what it does", box=None)
    for name, path in config.list_recipes().items():
        table.add_row(f"[bold]{name}[/]", recipe_summary(path))
    console.print(table)


def recipe_summary(path: Path) -> str:
    """First line of the recipe's header comment."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and line.strip("# "):
            return line.strip("# ")
    return ""


@recipes_app.command("show")
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name or file.")]) -> None:
    """Print a recipe, header and all."""
    print(config.find_recipe(name).read_text(), end="")


@recipes_app.command("copy")
def recipes_copy(
    name: Annotated[str, typer.Argument(help="Recipe name.")],
    dest: Annotated[Path | None, typer.Argument(help="Where to write it. Default: NAME.yaml here.")] = None,
) -> None:
    """Copy a recipe to edit it; run it with lmtune finetune --recipe FILE."""
    src = config.find_recipe(name)
    target = dest or Path(src.name)
    if target.is_dir():
        target = target / src.name
    if target.exists():
        raise LmtuneError(f"{target} already exists; choose another destination")
    shutil.copyfile(src, target)
    console.print(f"copied {name} to {target}; run it with: lmtune finetune --recipe {target}")


@data_app.command("show")
def data_show(
    data: Annotated[str, typer.Argument(help="Training data, as for finetune --data.", show_default=False)],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Model whose tokenizer and chat template training uses. Default: the recipe's, else the latest run.",
            show_default=False,
        ),
    ] = None,
    examples: Annotated[int, typer.Option("--examples", "-n", min=1, help="Training rows to show.")] = 3,
    recipe: Annotated[
        str | None, typer.Option("--recipe", "-r", help="Recipe name (lmtune recipes list) or YAML file.")
    ] = None,
    tokenizer: Annotated[str | None, opt("tokenizer")] = None,
    from_scratch: Annotated[bool | None, opt("from_scratch")] = None,
    data_format: Annotated[str | None, opt("data_format")] = None,
    text_column: Annotated[str | None, opt("text_column")] = None,
    validation_data: Annotated[str | None, opt("validation_data")] = None,
    validation_percent: Annotated[float | None, opt("validation_percent")] = None,
    txt_documents: Annotated[str | None, opt("txt_documents")] = None,
    block_size: Annotated[int | None, opt("block_size")] = None,
    packing: Annotated[bool | None, opt("packing")] = None,
) -> None:
    """Show the first training rows exactly as training sees them: token by token, with their conversations,
    EOS and the tokens the loss counts (coloured on a terminal, marked in a pipe); warn about chat templates
    that leave nothing to train on or end responses without EOS.

    Example:  lmtune data show instructions.jsonl --model gpt2 -n 2
    """
    from lmtune import runs

    flags = {k: v for k, v in locals().items() if k in config.Config.model_fields}
    cfg = config.build(recipe, flags)
    if not cfg.model and not cfg.from_scratch:
        cfg = cfg.model_copy(update={"model": str(runs.latest())})
    quiet_libraries()
    from lmtune.display import Display
    from lmtune.show import as_text, legend, training_view

    with Display(err_console) as display:
        view = training_view(cfg, examples, report=display)
    colour = console.is_terminal
    for line in view.about:
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(legend(colour), soft_wrap=True)
    for row in view.rows:
        console.print()
        console.print(f"── {row.title} ──", style="bold" if colour else None, markup=False, highlight=False)
        console.print(as_text(row, colour), soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the app and turns known problems into one red line: exit code 2 for a command
    line click cannot parse (the Unix convention for usage errors), 1 for other errors."""
    processes, machines, rank = cpu_processes_requested()
    if processes > 1 or machines > 1:
        sys.exit(launch_cpu_processes(processes, machines, rank, sys.argv[1:] if argv is None else argv))
    try:
        # Not standalone: click raises its usage errors here instead of printing its boxed version, and
        # returns the exit code of --help (0) or of a Ctrl-C (130) instead of calling sys.exit.
        code = app(args=argv, prog_name="lmtune", standalone_mode=False)
    except typer.TyperException as err:  # click's errors: typer carries its own copy of click
        if type(err).__name__ == "NoArgsIsHelpError":  # `lmtune` alone (typer too tells it by name)
            if err.format_message().strip():  # with Rich, typer has printed the help already
                print(err.format_message())
            sys.exit(err.exit_code)
        ctx = getattr(err, "ctx", None)  # a usage error knows its command
        fail(err.format_message().strip() + (f" (see {ctx.command_path} --help)" if ctx else ""), err.exit_code)
    except typer.Abort:
        err_console.print("[bold red]aborted[/]")
        sys.exit(1)
    except LmtuneError as err:
        if os.environ.get("LMTUNE_DEBUG"):
            raise
        if err.everywhere and os.environ.get("RANK", "0") != "0":  # the first process says it
            sys.exit(err.exit_code)
        fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        code = 130
    except Exception as err:  # a bug or an unforeseen failure: still one line, the traceback on request
        if os.environ.get("LMTUNE_DEBUG"):
            raise
        first = (str(err).splitlines() or [""])[0]
        if "closed by peer" in first or "reset by peer" in first:  # gloo's words for a process that is gone
            fail(
                "another process of this run ended (gloo: connection closed by peer), so this one stopped too; that "
                "process's own error, or the launcher's line about it, says why. Resume with --resume",
                1,
            )
        fail(f"{type(err).__name__}: {first} (LMTUNE_DEBUG=1 shows the traceback)", 1)
    if code == 130:  # click turns a Ctrl-C into exit code 130
        err_console.print("[bold red]interrupted[/]")
    if isinstance(code, int) and code:
        sys.exit(code)


def fail(message: str, exit_code: int) -> NoReturn:
    """Print `message` as lmtune's one red line and exit."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    sys.exit(exit_code)
