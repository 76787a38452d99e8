"""The `lmtune` command. Each command turns its arguments into a config and makes one library call.

An option is declared once, as a field of a typed record: config.Config for a run, options.py's for the rest
(its name, type, default, bounds and docstring, which is its help); `typed_flags` makes it a flag of the
commands that take it. What a command prints when it is done is report.py's. Heavy libraries (torch,
transformers, datasets) are imported inside the commands so that `lmtune --help` answers at once.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from inspect import Parameter, signature
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError

from lmtune import atomic, config, options, report
from lmtune.cpu_launch import cpu_processes_requested, launch_cpu_processes
from lmtune.display import Display, quiet_libraries
from lmtune.errors import LmtuneError
from lmtune.metrics import SHIPPED
from lmtune.report import console, err_console

app = typer.Typer(
    help="Fine-tune causal language models (finetune), then generate with them and measure them (generate, eval).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
recipes_app = typer.Typer(help="List, show and copy the shipped recipes.", no_args_is_help=True)
app.add_typer(recipes_app, name="recipes")
data_app = typer.Typer(help="Look at training data as training sees it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


# --- typed options as flags ------------------------------------------------------------------------------------

SHORT = {"model": "-m", "data": "-d", "batch_size": "-b", "output": "-o", "recipe": "-r", "examples": "-n",
         "num_return_sequences": "-n"}  # fmt: skip
Command = TypeVar("Command", bound=Callable[..., None])
Record = TypeVar("Record", bound=BaseModel)


def flag(model: type[BaseModel], key: str, panel: str | None) -> Parameter:
    """The flag of field `key` of a typed options record: --batch-size for batch_size, with the field's type,
    docstring (its help) and bounds. A run's Config flag is None when not given, so that a recipe's value stands;
    the other records' flags carry their defaults, which --help shows."""
    field, run = model.model_fields[key], model is config.Config
    types = [t for t in get_args(field.annotation) or (field.annotation,) if t is not type(None)]
    kind: Any = types[0] if len(types) == 1 and types[0] in (bool, int, float, Path) else str
    if get_origin(types[-1]) is list and get_args(types[-1]) != (float,):  # --data a --data b; weights are text: 3,1
        kind = list[str]
    name = "--" + key.replace("_", "-")
    if kind is bool:  # --lora/--no-lora: a flag can undo a recipe's true
        name += "/--no-" + key.replace("_", "-")
    bounds = {} if run else {b: getattr(m, b) for m in field.metadata for b in ("ge", "le") if hasattr(m, b)}
    option = typer.Option(
        name, *[SHORT[key]] if key in SHORT else [], help=config.help_for(key) if run else field.description,
        show_default=not run, rich_help_panel=config.section(key) if run else panel, min=bounds.get("ge"),
        max=bounds.get("le"), metavar="TEXT" if key == "data" and run else None,
    )  # fmt: skip
    annotation = Annotated[kind | None, option]
    return Parameter(key, Parameter.KEYWORD_ONLY, default=None if run else field.default, annotation=annotation)


def typed_flags(model: type[BaseModel], *keys: str, panel: str | None = None) -> Callable[[Command], Command]:
    """Give a command a flag for each of `keys` (default: all) of a typed options record, placed before its own
    keyword-only options and received in its **flags. Typer reads options from a signature, so it is extended."""

    def add(command: Command) -> Command:
        sig = signature(command, eval_str=True)
        own = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        at = next((i for i, p in enumerate(own) if p.kind is p.KEYWORD_ONLY), len(own))
        flags = [flag(model, key, panel) for key in keys or model.model_fields]
        command.__signature__ = sig.replace(parameters=[*own[:at], *flags, *own[at:]])  # type: ignore[attr-defined]
        return command

    return add


def typed(model: type[Record], flags: dict[str, Any]) -> Record:
    """The record of `model` from the flags that are its fields; a value it refuses is one line naming the flag."""
    try:
        return model(**{k: v for k, v in flags.items() if k in model.model_fields})
    except ValidationError as err:
        e = err.errors()[0]
        if not e["loc"]:  # a rule across fields: its message names the flags
            raise LmtuneError(e["msg"].removeprefix("Value error, ")) from None
        why = f"choose {e['ctx']['expected']}".replace("'", "") if e["type"] == "literal_error" else e["msg"]
        raise LmtuneError(f"--{str(e['loc'][0]).replace('_', '-')} {e['input']}: {why}") from None


def run_config(args: list[str], flags: dict[str, Any]) -> tuple[config.Config, dict[str, Any]]:
    """finetune's config (its recipe, MODEL, flags, then key=value overrides) and how to start the run."""
    launch = typed(options.Launch, flags)
    # `--resume auto`: --resume is a flag, so "auto" arrives among the arguments
    how: bool | Literal["auto"] = "auto" if launch.resume and "auto" in args else launch.resume
    args = [a for a in args if not (how == "auto" and a == "auto")]
    models = [a for a in args if "=" not in a]
    if len(models) > 1 or (models and flags["model"] and models[0] != flags["model"]):
        given = ", ".join([*models, *([flags["model"]] if flags["model"] else [])])
        raise LmtuneError(f"expected one MODEL, got {given}; overrides are written key=value")
    keys = {k: v for k, v in flags.items() if k in config.FIELDS} | ({"model": models[0]} if models else {})
    cfg = config.build(launch.recipe, keys, [a for a in args if "=" in a])
    return cfg, {**launch.model_dump(exclude={"recipe"}), "resume": how}


# --- commands ---------------------------------------------------------------------------------------------------

Overrides = Annotated[
    list[str] | None,
    typer.Argument(
        help="MODEL (hub id or folder) and any key=value config overrides, e.g. lr=1e-4.", show_default=False
    ),
]


@app.command()
@typed_flags(options.Launch)
@typed_flags(config.Config)
def finetune(args: Overrides = None, **flags: Any) -> None:
    """Fine-tune MODEL on --data (or train a new model with --from-scratch) and save a run folder.

    Examples:  lmtune finetune gpt2 --data wikitext  |  lmtune finetune ./base --data corpus.txt lr=1e-4
    |  lmtune finetune ./base --data chat.jsonl --data books.txt --data-weights 3,1
    """
    cfg, how = run_config(args or [], flags)
    quiet_libraries()
    from lmtune.events import silent
    from lmtune.train import finetune as run_finetune

    # Under `accelerate launch` every process runs this; only the first (RANK 0) talks to the terminal.
    if os.environ.get("RANK", "0") != "0":
        run_finetune(cfg, **how, report=silent)
        return
    with Display(console) as display:
        result = run_finetune(cfg, **how, report=display)
    report.finished(result, how["dry_run"])


PREPARE_KEYS = ("tokenizer", "text_column", "data_format", "validation_data", "validation_percent", "txt_documents")


@app.command()
@typed_flags(options.Preparing)
@typed_flags(config.Config, *PREPARE_KEYS)
def prepare(
    data: Annotated[str, typer.Argument(help="Data to tokenize, as for finetune --data.", show_default=False)],
    **flags: Any,
) -> None:
    """Tokenize DATA once into a folder that finetune --data reads: token streams, their counts and checksums,
    and the tokenizer. Prepare once on shared storage for a job on several machines.

    Example:  lmtune prepare corpus.txt --model gpt2 --output corpus-tokens  |  lmtune finetune gpt2 --data corpus-tokens
    """
    p = typed(options.Preparing, flags)
    cfg = config.build(None, {k: flags[k] for k in PREPARE_KEYS} | {"data": data, "model": p.model})
    target = p.output or Path(f"{Path(data.rstrip('/')).stem.replace(':', '-') or 'data'}-tokens")
    quiet_libraries()
    from lmtune.data import prepare as run_prepare

    with Display(err_console) as display:
        report.prepared(run_prepare(cfg, target, p.overwrite, report=display), cfg.model)


@app.command()
@typed_flags(options.Generation)
@typed_flags(options.Sampling)
def generate(
    prompt: Annotated[str | None, typer.Argument(help="Text to continue.", show_default=False)] = None, **flags: Any
) -> None:
    """Continue PROMPT with a model (or answer it, for chat runs); the text streams as it is made.

    Example:  lmtune generate "Hello, my dog" --max-new-tokens 40 --seed 0
    """
    from lmtune import runs

    g = typed(options.Generation, flags)
    s = typed(options.Sampling, flags | ({"temperature": 0.0} if g.greedy else {}))
    if (prompt is None) == (g.prompts is None):
        raise LmtuneError("give a PROMPT or --prompts FILE (one of the two)")
    model = g.model or str(runs.latest())
    quiet_libraries()
    from lmtune.generate import load, read_prompts

    texts = read_prompts(g.prompts) if g.prompts else [prompt or ""]
    net, tok = load(model, g.dtype)
    if g.prompts:
        report.jsonl(texts, net, tok, report.model_inputs(model, tok, texts, g.chat)[0], s)
    elif g.compare:
        report.side_by_side(texts[0], [(model, net, tok), (g.compare, *load(g.compare, g.dtype))], g.chat, s)
    elif s.num_return_sequences == 1:
        report.stream_one(net, tok, *report.model_inputs(model, tok, texts, g.chat), s)
    else:
        report.several(net, tok, *report.model_inputs(model, tok, texts, g.chat), s)


Models = Annotated[
    list[str] | None,
    typer.Argument(help="Run folders, model folders or hub ids. Default: the latest run.", show_default=False),
]


@app.command("eval")
@typed_flags(options.Scoring)
@typed_flags(options.Answering, panel="Answers (--generate)")
def eval_(
    models: Models = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    **flags: Any,
) -> None:
    """Loss, perplexity and bits per byte of one or more models on the same data; with --generate, their answers
    scored by metrics.

    Example:  lmtune eval runs/my-run ./base-model --data test.txt --stride 512  |  lmtune eval runs/chat --generate
    """
    from lmtune import runs

    targets = models or [str(runs.latest())]
    scoring, answering = typed(options.Scoring, flags), typed(options.Answering, flags)
    perplexity_only = [
        f"--{k.replace('_', '-')}" for k in ("block_size", "stride", "chart") if getattr(scoring, k) is not None
    ]
    if answering.generate and perplexity_only:
        raise LmtuneError(
            f"{perplexity_only[0]} is for the perplexity and --generate scores answers; drop one of the two"
        )
    if answering.generate:
        answer(targets, scoring, answering, as_json)
    else:
        score(targets, scoring, as_json)


def answer(targets: list[str], scoring: options.Scoring, answering: options.Answering, as_json: bool) -> None:
    """eval --generate: each model's answers to the validation conversations, scored by the metrics."""
    if answering.predictions is not None:
        atomic.check_folder("--predictions", answering.predictions)
    quiet_libraries()
    from lmtune.answers import evaluate_answers

    with Display(err_console) as display:
        results = evaluate_answers(
            targets, scoring.data, answering.metric or list(SHIPPED), answering.sampling(), scoring.batch_size,
            chat=answering.chat, text_column=scoring.text_column, predictions_folder=answering.predictions,
            report=display,
        )  # fmt: skip
    if results:  # the first process's; the others only answered their share
        report.answers(results, as_json)


def score(targets: list[str], s: options.Scoring, as_json: bool) -> None:
    """eval: loss, perplexity and bits per byte of each model (on preference pairs: which answer it prefers)."""
    from lmtune.card import check_chart, plot_perplexities

    quiet_libraries()
    from lmtune.dpo import is_preference, models_on_pairs
    from lmtune.evaluate import evaluate_models

    pairs = is_preference(s.data, s.text_column)
    if s.chart and pairs:
        raise LmtuneError("--chart draws perplexities; preference pairs have none (eval prints their table)")
    if s.chart:
        check_chart(s.chart)
    with Display(err_console) as display:
        if pairs:
            results = models_on_pairs(targets, str(s.data), s.block_size, s.batch_size, s.text_column, report=display)
        else:
            results = evaluate_models(
                targets, s.data, s.block_size, s.stride, s.batch_size, s.text_column, report=display
            )
    report.scores(results, as_json)
    if s.chart:  # after the figures, so that a failing chart loses none of them
        err_console.print(f"chart written to {plot_perplexities(results, s.chart)}")


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

    report.merged(run, run_merge(run, output, overwrite))


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
    report.recipes(config.list_recipes())


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
    target = config.copy_recipe(name, dest)
    console.print(f"copied {name} to {target}; run it with: lmtune finetune --recipe {target}")


@data_app.command("show")
@typed_flags(options.Showing)
@typed_flags(config.Config, "tokenizer", "from_scratch", "data_format", "text_column", "validation_data",
             "validation_percent", "txt_documents", "block_size", "packing")  # fmt: skip
def data_show(
    data: Annotated[str, typer.Argument(help="Training data, as for finetune --data.", show_default=False)],
    **flags: Any,
) -> None:
    """Show the first training rows exactly as training sees them: token by token, with their conversations,
    EOS and the tokens the loss counts (coloured on a terminal, marked in a pipe); warn about chat templates
    that leave nothing to train on or end responses without EOS.

    Example:  lmtune data show instructions.jsonl --model gpt2 -n 2
    """
    from lmtune import runs

    show = typed(options.Showing, flags)
    keys = {k: v for k, v in flags.items() if k in config.FIELDS} | {"data": data, "model": show.model}
    cfg = config.build(show.recipe, keys)
    if not cfg.model and not cfg.from_scratch:
        cfg = cfg.model_copy(update={"model": str(runs.latest())})
    quiet_libraries()
    from lmtune.show import training_view

    with Display(err_console) as display:
        view = training_view(cfg, show.examples, report=display)
    report.training_rows(view)


# --- the one place errors become a red line ----------------------------------------------------------------------


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
        report.usage_error(err)
    except typer.Abort:
        err_console.print("[bold red]aborted[/]")
        sys.exit(1)
    except LmtuneError as err:
        if os.environ.get("LMTUNE_DEBUG"):
            raise
        if err.everywhere and os.environ.get("RANK", "0") != "0":  # the first process says it
            sys.exit(err.exit_code)
        report.fail(str(err), err.exit_code)
    except KeyboardInterrupt:
        code = 130
    except Exception as err:  # a bug or an unforeseen failure: still one line, the traceback on request
        if os.environ.get("LMTUNE_DEBUG"):
            raise
        report.unforeseen(err)
    if code == 130:  # click turns a Ctrl-C into exit code 130
        err_console.print("[bold red]interrupted[/]")
    if isinstance(code, int) and code:
        sys.exit(code)
