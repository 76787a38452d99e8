"""The one typed configuration of a run, and how recipes and overrides build it.

Precedence: the defaults below, then a recipe YAML, then command-line flags, then `key=value`
overrides. A key, its flag (`--batch-size`), the variable and the logged name are the same word.
"""

from __future__ import annotations

import difflib
import shutil
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmtune.errors import LmtuneError, first_line

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
# A wheel install carries the recipes inside the package (see pyproject.toml).
PACKAGED_RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class DataSource(BaseModel):
    """One entry of a recipe's `data:` list; unset keys take the run's own (--text-column, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)

    path: str
    """A hub dataset, a file, a folder, or a folder written by lmtune prepare."""
    weight: float | None = Field(None, gt=0)
    """Relative share of the training tokens. Default: by size (each source once per epoch)."""
    text_column: str | None = None
    """Column that holds the text in tabular data."""
    format: Literal["auto", "text", "chat", "preference"] | None = None
    """text, chat, preference or auto, as --data-format."""
    validation: str | None = None
    """This source's validation data, as --validation-data."""


class Config(BaseModel):
    """Everything that decides what a fine-tuning run does. Each field's docstring is its --help."""

    # allow_inf_nan=False: `--lr inf` or `.nan` in YAML would pass gt/ge bounds (inf) or fail them with a
    # confusing message (nan), then wreck the run; every float must be a finite number.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)

    # --- model ---
    model: str | None = None
    """Hub id (gpt2) or local folder in save_pretrained format to start from."""
    from_scratch: bool = False
    """Random weights in a GPT-2-shaped model instead of loading pretrained ones."""
    tokenizer: str | None = None
    """Tokenizer folder or hub id. Default: the model's own; from scratch with no model, one trained on the data."""
    vocab_size: int = Field(8192, ge=260)
    """Vocabulary size of a tokenizer trained on the data (from scratch only)."""
    n_layer: int | None = Field(None, gt=0)
    """Transformer layers of a from-scratch model (default: GPT-2's 12, or the --model's)."""
    n_head: int | None = Field(None, gt=0)
    """Attention heads of a from-scratch model (default: 12, or the --model's)."""
    n_embd: int | None = Field(None, gt=0)
    """Width of a from-scratch model (default: 768, or the --model's); must divide by n_head."""
    n_positions: int | None = Field(None, gt=0)
    """Context length in tokens of a from-scratch model (default: 1024, or the --model's)."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype the weights are loaded in; float32 keeps exact master weights under mixed precision."""
    trust_remote_code: bool = False
    """Run Python code shipped with a hub model. Off unless you trust its author."""
    dropout: float | None = Field(None, ge=0, lt=1)
    """Dropout probability while training. Default: the model's own (GPT-2: 0.1). 0 trains about 1.3-1.4x faster on CPU (make bench)."""

    # --- LoRA ---
    lora: bool = False
    """Train a LoRA adapter (peft) instead of every weight; the run folder then holds the adapter."""
    lora_rank: int = Field(8, gt=0)
    """Rank of the LoRA matrices: trainable parameters grow with it."""
    lora_alpha: int = Field(16, gt=0)
    """LoRA scaling: the adapter's update is multiplied by lora_alpha / lora_rank."""
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    """Dropout on the adapter's input while training."""
    lora_targets: str = "all-linear"
    """Comma-separated module names to adapt, or all-linear: every linear layer but the output head (GPT-2: c_attn, c_proj, c_fc)."""

    # --- memory ---
    quantize: Literal["no", "4bit", "8bit"] = "no"
    """4bit (QLoRA: NF4, double quantization) or 8bit: the frozen base weights held quantized, computed in the run's precision; needs --lora and bitsandbytes. no: off."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input and recompute the rest in backward: far less activation memory, about a third more compute."""
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw", "paged-adamw-8bit"] = "adamw"
    """adamw; adamw-8bit: bitsandbytes', its states in 8 bits (a quarter of the memory); paged-adamw, paged-adamw-8bit: states paged to CPU memory when the GPU runs short (CUDA only)."""

    # --- data ---
    data: str | list[str | DataSource] | None = None
    """Training data: 'wikitext', a hub dataset as name or name:config, or a .txt/.jsonl/.json/.csv/.parquet file or folder. Give it more than once to mix several."""
    data_weights: list[float] | None = None
    """Relative weights of several --data, one each, as shares of the training tokens: 3,1. Default: by size (each once per epoch)."""
    text_column: str = "text"
    """Column that holds the text in tabular data."""
    data_format: Literal["auto", "text", "chat", "preference"] = "auto"
    """chat: JSONL/tables with `messages` (role, content) or `prompt`/`response`, loss on responses only. preference: `prompt`/`chosen`/`rejected`, trained with DPO. auto: by the columns."""
    validation_data: str | None = None
    """Validation data, same forms as --data. Default: the dataset's validation split, else a held-out share."""
    validation_percent: float = Field(5.0, gt=0, lt=50)
    """Percent of documents held out for validation when the data has no validation split."""
    txt_documents: Literal["paragraph", "line", "file"] = "paragraph"
    """How a .txt file splits into documents: at blank lines, at every line, or one per file."""
    block_size: int | None = Field(None, gt=1)
    """Tokens per training sequence. Default: the model's context, at most 1024."""
    streaming: bool = False
    """Read the data as a stream and tokenize it as training takes it (hub datasets too large to download); needs --max-steps."""
    packing: bool = True
    """Chat data: pack several conversations into each row, attention kept within each (off, or a model that cannot: one per row, padded)."""

    # --- training ---
    epochs: int = Field(1, gt=0)
    """Passes over the training data (ignored when --max-steps is set)."""
    max_steps: int | None = Field(None, gt=0)
    """Stop after this many optimizer steps."""
    batch_size: int = Field(8, gt=0)
    """Sequences per micro-batch on each process."""
    gradient_accumulation_steps: int = Field(1, gt=0)
    """Micro-batches summed into one optimizer step."""
    lr: float | None = Field(None, gt=0)
    """Peak learning rate. Default: 5e-5, or 2e-4 with --lora (an adapter starts at zero and needs larger steps)."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warmup."""
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    """Share of the optimizer steps spent warming the learning rate up from 0."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay, applied to weight matrices only (not biases or norms)."""
    max_grad_norm: float = Field(1.0, ge=0)
    """Clip the gradient norm to this; 0 turns clipping off."""
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = "auto"
    """auto: bf16 on GPUs (fp16 on old ones) and on CPUs with bf16 units, else no."""
    seed: int = Field(42, ge=0, lt=2**32)  # numpy's seeding accepts 0 to 2**32 - 1
    """Seeds weights of new models, data order and dropout (0 to 4294967295)."""
    eval_every: int | None = Field(None, ge=0)
    """Evaluate every N optimizer steps; 0 only at the end. Default: five times per run."""
    save_every: int | None = Field(None, ge=0)
    """Save a resumable checkpoint every N optimizer steps; 0 never. Default: with each evaluation."""
    keep_checkpoints: int = Field(2, gt=0)
    """How many of the newest checkpoints to keep; older ones are deleted once a newer one is complete."""
    keep_best: bool = False
    """Keep the checkpoint with the best evaluation loss out of the rotation; the run folder's model is then the best one."""
    early_stopping: int | None = Field(None, gt=0)
    """Stop after N evaluations in a row that do not improve on the best by more than --early-stopping-delta."""
    early_stopping_delta: float = Field(0.0, ge=0)
    """A drop in evaluation loss (nats) below the best must exceed this to count as an improvement (and as the best)."""
    log_every: int = Field(10, gt=0)
    """Log training loss every N optimizer steps."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Also log metrics to this tracker, through Accelerate: tensorboard (files in RUN/lmtune/) or wandb."""
    compile: bool = False
    """torch.compile the model: pays on GPUs for long runs; costs a minute of compiling, no gain on CPU (bench/)."""
    beta: float = Field(0.1, gt=0)
    """Preference data (DPO): how far from the reference the model may move; smaller lets it move further."""
    reference: str | None = None
    """Preference data (DPO): the reference model. Default: the starting model (with --lora: it, adapter off)."""

    # --- output ---
    output: str | None = None
    """Run folder. Default: runs/<model>-<data>-<date>-<time>."""
    push_to_hub: str | None = None
    """Upload the finished run folder to this hub repo (user/name; created private), with your hub token."""

    @field_validator("data", mode="before")
    @classmethod
    def _one_source_is_a_string(cls, value: Any) -> Any:
        """A list of one plain path is that path: `--data a` given once, or `data: [a]`."""
        if isinstance(value, list | tuple) and len(value) == 1 and isinstance(value[0], str):
            return value[0]
        return value

    @field_validator("data_weights", mode="before")
    @classmethod
    def _weights_from_text(cls, value: Any) -> Any:
        """--data-weights 3,1 (or YAML's [3, 1], or 3,1 read by YAML as a string)."""
        if isinstance(value, str):
            try:
                return [float(w) for w in value.split(",")]
            except ValueError:
                raise ValueError("give one number per --data, separated by commas: 3,1") from None
        if isinstance(value, int | float):
            return [value]
        return value

    @model_validator(mode="after")
    def _sources_agree(self) -> Config:
        n = len(self.data) if isinstance(self.data, list) else 1
        if self.data_weights is not None:
            if n < 2:
                raise ValueError("--data-weights mixes several --data; give --data more than once")
            if len(self.data_weights) != n:
                raise ValueError(f"{len(self.data_weights)} weights for {n} --data; give one weight per --data")
            if any(not w > 0 for w in self.data_weights):
                raise ValueError("each weight must be a number above 0")
            if isinstance(self.data, list) and any(isinstance(d, DataSource) and d.weight for d in self.data):
                raise ValueError("give weights either in --data-weights or in the data list, not both")
        if n > 1 and self.validation_data:
            raise ValueError(
                "--validation-data with several --data is ambiguous: give each its own in a recipe "
                "(data: [{path: a, validation: a-valid}, ...])"
            )
        return self

    def data_sources(self) -> list[DataSource]:
        """Every --data as a DataSource, each setting it does not give taken from the run's."""
        items = self.data if isinstance(self.data, list) else [self.data] if self.data else []
        weights: list[float | None] = [*self.data_weights] if self.data_weights else [None] * len(items)
        out = []
        for item, weight in zip(items, weights, strict=True):
            d = item if isinstance(item, DataSource) else DataSource(path=item)
            out.append(
                DataSource(
                    path=d.path,
                    weight=d.weight or weight,
                    text_column=d.text_column or self.text_column,
                    format=d.format or self.data_format,
                    validation=d.validation or self.validation_data,
                )
            )
        return out

    @property
    def data_label(self) -> str:
        """The data in a few words, for names and messages: the source, or the sources joined by +."""
        return "+".join(d.path for d in self.data_sources())

    @model_validator(mode="after")
    def _shape_fits(self) -> Config:
        if self.n_embd is not None and self.n_head is not None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.lora and self.from_scratch:
            raise ValueError("--lora adapts pretrained weights; it cannot train a model --from-scratch")
        if self.early_stopping and self.eval_every == 0:
            raise ValueError("--early-stopping counts evaluations, and --eval-every 0 makes none before the end")
        # AdamW multiplies the weights by 1 - lr x decay each step. A huge --lr is the learning rate's fault (the
        # run stops at a non-finite loss and says so); a decay above 1 that does this is the decay's.
        if self.weight_decay > 1 and self.learning_rate * self.weight_decay >= 1:
            raise ValueError(
                f"weight_decay {self.weight_decay:g} with lr {self.learning_rate:g} would zero or flip the weights at "
                f"every step (AdamW multiplies them by 1 - lr x weight_decay); use a weight_decay below "
                f"{1 / self.learning_rate:g} (usually 0 to 0.1)"
            )
        if self.quantize != "no" and self.from_scratch:
            raise ValueError("--quantize freezes pretrained weights; it cannot train a model --from-scratch")
        if self.quantize != "no" and not self.lora:
            raise ValueError(
                f"--quantize {self.quantize} freezes the base weights, so it trains a LoRA adapter: add --lora"
            )
        return self

    @property
    def learning_rate(self) -> float:
        """The peak learning rate used: --lr, else the default for full fine-tuning or LoRA."""
        return self.lr or (2e-4 if self.lora else 5e-5)

    def to_yaml(self) -> str:
        """The resolved config as a recipe: every key, so the run can be repeated exactly."""
        return yaml.safe_dump(self.model_dump(exclude={"output"}), sort_keys=False)


FIELDS = list(Config.model_fields)


# The sections of Config, each by its first key (the "# --- model ---" comments above): `lmtune finetune --help`
# shows each section's flags under its title; the last section's (output) join the command's own options.
SECTIONS = {
    "model": "Model",
    "lora": "LoRA",
    "quantize": "Memory (a bigger model on the same hardware)",
    "data": "Data",
    "epochs": "Training",
    "output": None,
}


def section(key: str) -> str | None:
    """The title of the section `key` belongs to."""
    title = None
    for field in FIELDS[: FIELDS.index(key) + 1]:
        title = SECTIONS.get(field, title)
    return title


# What --resume accepts changed. A change to one of these would make it another run (another model, other
# data or data order), so it is refused unless --force; every other key may change (how long and how
# fast to train, how often to log, evaluate and save, where to report and upload). Every field is in
# exactly one of the two (tests/test_config.py), so a new field is classified when it is added.
RESUME_MUST_MATCH = (
    "model", "from_scratch", "tokenizer", "vocab_size", "n_layer", "n_head", "n_embd", "n_positions", "dtype",
    "dropout", "data", "data_weights", "text_column", "data_format", "validation_data", "validation_percent", "txt_documents",
    "block_size", "streaming", "packing", "batch_size", "gradient_accumulation_steps", "seed", "lora", "lora_rank",
    "lora_alpha", "lora_dropout", "lora_targets",
    "quantize", "optimizer",  # the base weights the adapter learns against; the optimizer state's format
    "beta", "reference",
)  # fmt: skip
RESUME_MAY_CHANGE = (
    "trust_remote_code", "epochs", "max_steps", "lr", "schedule", "warmup_ratio", "weight_decay", "max_grad_norm",
    "mixed_precision", "eval_every", "save_every", "keep_checkpoints", "log_every", "report_to", "compile",
    "output", "push_to_hub",
    "keep_best", "early_stopping", "early_stopping_delta",
    "gradient_checkpointing",  # the same gradients, recomputed (dropout's masks too)
)  # fmt: skip


def absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute, so the saved config.yaml (and `lmtune eval`) works from any folder."""
    update: dict[str, Any] = {
        key: absolute(value)
        for key in ("model", "tokenizer", "data", "validation_data", "reference")
        if isinstance(value := getattr(cfg, key), str)
    }
    if isinstance(cfg.data, list):
        update["data"] = [absolute(d) if isinstance(d, str) else absolute_source(d) for d in cfg.data]
    return cfg.model_copy(update=update)


def absolute_source(d: DataSource) -> DataSource:
    validation = absolute(d.validation) if d.validation else None
    return d.model_copy(update={"path": absolute(d.path), "validation": validation})


def absolute(value: str) -> str:
    """A local path made absolute; anything else (a hub name) as it is."""
    return str(Path(value).expanduser().resolve()) if Path(value).expanduser().exists() else value


def help_for(key: str) -> str:
    """The --help text of a flag: its config field's docstring, then the choices and the default where the
    docstring does not already say them (both read from the field, so they cannot go stale)."""
    field = Config.model_fields[key]
    text = field.description or ""
    choices = [str(c) for c in get_args(field.annotation)] if get_origin(field.annotation) is Literal else []
    if choices and not all(c in text for c in choices):
        text += f" One of: {', '.join(choices)}."
    if field.default not in (None, False) and "Default" not in text and "default" not in text:
        text += f" Default: {'on' if field.default is True else field.default}."
    return text


def suggest(key: str) -> str:
    close = difflib.get_close_matches(key, FIELDS, n=1, cutoff=0.5)
    return f"; did you mean `{close[0]}`?" if close else ""


def build(recipe: str | None = None, flags: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the recipe, then flags, then `key=value` overrides; every problem reported at once."""
    values: dict[str, Any] = dict(load_recipe(recipe)) if recipe else {}
    values.update({k: v for k, v in (flags or {}).items() if v is not None and v != []})
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise LmtuneError(f"cannot read override `{item}`: write it as key=value, for example lr=1e-4")
        if key not in Config.model_fields:
            raise LmtuneError(f"unknown config key `{key}`{suggest(key)}")
        # YAML reads the value so that 1e-4, true and null mean what they look like.
        values[key] = yaml.safe_load(raw) if raw.strip() else None
    return validate(values, source=recipe)


def validate(values: dict[str, Any], source: str | None = None) -> Config:
    try:
        return Config(**values)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"]) or "config"
            if e["type"] == "extra_forbidden":
                problems.append(f"unknown config key `{key}`{suggest(key)}")
            elif not e["loc"]:  # a rule across keys: its input is the whole config, not worth repeating
                problems.append(e["msg"].removeprefix("Value error, "))
            else:
                problems.append(f"{key}: {e['msg'].removeprefix('Value error, ')} (got {e['input']!r})")
        where = f" in {source}" if source else ""
        raise LmtuneError(f"bad configuration{where}: " + "; ".join(problems)) from None


# --- recipes ---------------------------------------------------------------------------------


def recipe_dirs() -> list[Path]:
    return [d for d in (RECIPES_DIR, PACKAGED_RECIPES_DIR) if d.is_dir()]


def list_recipes() -> dict[str, Path]:
    """Shipped recipes by name (file stem)."""
    found: dict[str, Path] = {}
    for d in recipe_dirs():
        for path in sorted(d.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def find_recipe(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise LmtuneError(f"no such recipe file: {path}")
        return path
    shipped = list_recipes()
    if name_or_path in shipped:
        return shipped[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(shipped), n=1)
    hint = f"; did you mean `{close[0]}`?" if close else ""
    raise LmtuneError(f"no recipe named `{name_or_path}`{hint} (`lmtune recipes list` shows them)")


def copy_recipe(name: str, dest: Path | None) -> Path:
    """Copy a recipe to edit it: to `dest` (a file or folder), by default NAME.yaml here; never over a file."""
    src = find_recipe(name)
    target = dest or Path(src.name)
    if target.is_dir():
        target = target / src.name
    if target.exists():
        raise LmtuneError(f"{target} already exists; choose another destination")
    shutil.copyfile(src, target)
    return target


def load_recipe(name_or_path: str) -> dict[str, Any]:
    path = find_recipe(name_or_path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise LmtuneError(f"cannot read recipe {path}: {err.strerror or first_line(err)}") from None
    bad = raw.find(b"\x00")  # valid UTF-8 can hold NUL bytes, text files do not
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        bad = err.start if bad < 0 else min(bad, err.start)
    if bad >= 0:
        raise LmtuneError(
            f"cannot read recipe {path}: not a text file (binary data at byte {bad}); "
            "a recipe is a YAML file of config keys (`lmtune recipes show tiny-cpu` shows one)"
        )
    try:
        # safe_load builds plain data only: a `!!python/object` tag is refused, never run.
        values = yaml.safe_load(text)
    except yaml.constructor.ConstructorError as err:
        tag = getattr(err, "problem", "") or first_line(err)
        raise LmtuneError(
            f"recipe {path} could not be read safely ({tag}); recipes hold plain keys and values, "
            "and lmtune never runs code from YAML"
        ) from None
    except yaml.YAMLError as err:
        raise LmtuneError(f"cannot read recipe {path}: {first_line(err)}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise LmtuneError(f"recipe {path} must be a mapping of config keys to values")
    return values
