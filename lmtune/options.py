"""What the commands take besides a run's Config, as typed records like it: each field is a flag of its command.

A field's name, type, default, bounds and docstring (its --help) are written here once; cli.typed_flags makes
them flags, and a command hands the record (or its values) to the library.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmtune.metrics import SHIPPED

Options = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


class Launch(BaseModel):
    """How `lmtune finetune` starts: from a recipe, in a new run folder, over an old one, resuming one, or only
    planning. (What the run does is its Config.)"""

    model_config = Options

    recipe: str | None = None
    """Recipe name (lmtune recipes list) or YAML file."""
    overwrite: bool = False
    """Replace an existing run folder at --output."""
    resume: bool = False
    """Continue the unfinished run at --output from its newest complete checkpoint. `--resume auto`: that if there is one, else start the run; a finished run is left as it is (for requeued jobs)."""
    force: bool = False
    """With --resume: continue even if settings that change the model or data order, or the data, differ."""
    dry_run: bool = False
    """Prepare everything and print the plan, without training."""


class Preparing(BaseModel):
    """`lmtune prepare`: whose tokenizer, and where the prepared data goes."""

    model_config = Options

    model: str | None = None
    """Model whose tokenizer to use."""
    output: Path | None = None
    """Folder to write. Default: DATA's name + '-tokens', here."""
    overwrite: bool = False
    """Replace prepared data already at --output."""


class Showing(BaseModel):
    """`lmtune data show`: which model's view of the data, and how much of it."""

    model_config = Options

    model: str | None = None
    """Model whose tokenizer and chat template training uses. Default: the recipe's, else the latest run."""
    examples: int = Field(3, ge=1)
    """Training rows to show."""
    recipe: str | None = None
    """Recipe name (lmtune recipes list) or YAML file."""


class Sampling(BaseModel):
    """How `lmtune generate` picks each next token. Each field's docstring is its --help."""

    model_config = Options

    max_new_tokens: int = Field(50, ge=1)
    """Tokens to add at most (generation stops at EOS)."""
    temperature: float = Field(0.8, ge=0.0)
    """Sampling temperature; 0 is greedy."""
    top_k: int = Field(50, ge=0)
    """Sample from the k likeliest tokens; 0 turns it off."""
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    """Sample from the smallest set of tokens holding this probability."""
    num_return_sequences: int = Field(1, ge=1)
    """Continuations per prompt."""
    seed: int | None = None
    """Seed for reproducible sampling."""

    @model_validator(mode="after")
    def _greedy_is_one(self) -> Sampling:
        if self.temperature == 0 and self.num_return_sequences > 1:
            raise ValueError(
                "--greedy gives one continuation, the same each time; sample instead (--temperature above 0) "
                f"or drop -n {self.num_return_sequences}"
            )
        return self


class Generation(BaseModel):
    """What `lmtune generate` continues, with which model and how it prints. Each field's docstring is its --help."""

    model_config = Options

    model: str | None = None
    """Run folder, model folder or hub id. Default: the latest run."""
    greedy: bool = False
    """Always take the likeliest token (same as --temperature 0)."""
    prompts: Path | None = None
    """File of prompts, one per line (or JSONL with a `prompt` field); prints JSONL."""
    compare: str | None = None
    """Another model (e.g. the base) to continue the same prompt, side by side."""
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """float32, bfloat16, float16 or auto."""
    chat: bool | None = None
    """Send the prompt as a user turn in the model's chat template and print the answer. Default: when the run was trained on chat data."""


class Scoring(BaseModel):
    """What `lmtune eval` scores and how. Each field's docstring is its --help."""

    model_config = Options

    data: str | None = None
    """Data to score, as for finetune --data. Default: the run's validation data."""
    block_size: int | None = Field(None, ge=2)
    """Context window in tokens. Default: the run's block size, else the model's context (at most 1024)."""
    stride: int | None = Field(None, ge=1)
    """Tokens the window moves each time; smaller scores each token with more history. Default: the block size."""
    batch_size: int = Field(8, ge=1)
    """Windows per forward pass (with --generate: prompts answered at once)."""
    text_column: str = "text"
    """Column that holds the text in tabular data."""
    chart: Path | None = None
    """Also write a bar chart of the perplexities to this image (.png, .svg, .pdf)."""


MAX_ANSWER_TOKENS = 128  # per answer by default: enough for a few sentences; answers end at EOS before


class Answering(BaseModel):
    """`lmtune eval --generate`: how the answers are made and scored. Unset sampling options mean greedy answers."""

    model_config = Options

    generate: bool = False
    """Instead of the perplexity: answer each conversation's last user turn and score the answers (--metric). Chat runs, or any model with --chat."""
    metric: list[str] | None = Field(
        None,
        description=f"Metric for the answers: {', '.join(SHIPPED)} (lmtune's own, offline), or any name or "
        "script evaluate.load takes (a hub metric needs the network or its cache). Repeat for several. "
        "Default: lmtune's own.",
    )
    chat: bool = False
    """Answer in the model's chat template (lmtune's simple one if it has none) although it was not trained on chat data."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Tokens per answer at most (it ends at EOS). Default: 128."""
    temperature: float | None = Field(None, ge=0.0)
    """Sample at this temperature (default 0.8 when sampling); without it, greedy."""
    top_k: int | None = Field(None, ge=0)
    """Sample from the k likeliest tokens (default 50)."""
    top_p: float | None = Field(None, ge=0.0, le=1.0)
    """Sample from this much probability (default 0.95)."""
    seed: int | None = None
    """Seed for reproducible sampling."""
    predictions: Path | None = None
    """Folder for the answers (predictions-NAME.jsonl). Default: a run's own folder (predictions.jsonl), else the current folder."""

    @model_validator(mode="after")
    def _answers_need_generate(self) -> Answering:
        given = [k for k, v in self if v not in (None, False) and k != "generate"]
        if given and not self.generate:
            raise ValueError(f"--{given[0].replace('_', '-')} is for answers, which --generate scores; add --generate")
        return self

    def sampling(self) -> Sampling:
        """Greedy unless a sampling option is given; the other sampling options then take generate's defaults."""
        tokens = self.max_new_tokens or MAX_ANSWER_TOKENS
        if all(v is None for v in (self.temperature, self.top_k, self.top_p)):
            return Sampling(max_new_tokens=tokens, temperature=0.0, seed=self.seed)
        given = {k: v for k in ("temperature", "top_k", "top_p") if (v := getattr(self, k)) is not None}
        return Sampling(max_new_tokens=tokens, seed=self.seed, **given)
