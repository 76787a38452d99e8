"""LoRA through peft: add an adapter to train, load a folder that holds one, merge it into a plain model.

A LoRA run folder holds `adapter_config.json` + `adapter_model.safetensors` (peft's format, which
transformers and the hub also read) and the tokenizer; the adapter's config names the base model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lmtune import atomic, runs
from lmtune.config import Config
from lmtune.errors import LmtuneError, first_line
from lmtune.model import load_pretrained, load_tokenizer

ADAPTER_CONFIG = "adapter_config.json"
# Bytes of training state per trainable parameter besides the weight itself, in float32: its gradient
# and AdamW's two moments. What full fine-tuning pays for every parameter and LoRA only for the adapter.
STATE_BYTES_PER_PARAMETER = 4 + 8


def is_adapter(folder: str | Path) -> bool:
    return (Path(folder).expanduser() / ADAPTER_CONFIG).is_file()


def linear_layer_names(model: Any) -> list[str]:
    """Distinct names of the layers LoRA can adapt (nn.Linear, and GPT-2's Conv1D), for error messages."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)}
    )


def add_adapter(model: Any, cfg: Config, checkpoint: Path | None = None) -> Any:
    """`model` frozen with a trainable LoRA adapter: new (B = 0, so it starts as the base), or a checkpoint's."""
    from peft import LoraConfig, PeftModel, get_peft_model

    if checkpoint is not None:
        return PeftModel.from_pretrained(model, checkpoint, is_trainable=True)
    names = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    targets: str | list[str] = "all-linear" if names == ["all-linear"] else names
    lora_config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
        # GPT-2 keeps its layers as Conv1D, whose weights are stored (in, out): peft must transpose them.
        fan_in_fan_out=model.config.model_type == "gpt2",
    )
    try:
        return get_peft_model(model, lora_config)
    except ValueError as err:
        raise LmtuneError(
            f"--lora-targets {cfg.lora_targets}: {first_line(err)}; "
            f"this model's linear layers are: {', '.join(linear_layer_names(model))}"
        ) from None


def trainable_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def base_model_of(folder: Path) -> str:
    """The base model an adapter folder was trained on, as its adapter_config.json names it."""
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, json.JSONDecodeError) as err:
        raise LmtuneError(f"cannot read {folder / ADAPTER_CONFIG}: {err}") from None
    if not base:
        raise LmtuneError(f"{folder / ADAPTER_CONFIG} does not name its base model (base_model_name_or_path)")
    return str(base)


def load_merged(folder: str | Path, dtype: Any, trust_remote_code: bool = False) -> Any:
    """The base model with the adapter in `folder` merged into its weights: a plain transformers model,
    as fast at inference as the base (no separate adapter matmuls)."""
    from peft import PeftModel

    folder = Path(folder).expanduser()
    base_name = base_model_of(folder)
    try:
        base = load_pretrained(base_name, dtype, trust_remote_code)
    except LmtuneError as err:
        raise LmtuneError(f"the adapter in {folder} needs its base model {base_name}, which failed: {err}") from None
    return PeftModel.from_pretrained(base, folder).merge_and_unload()


def merge(run: str | Path, output: Path, overwrite: bool = False) -> Path:
    """Write the base model with the adapter of `run` merged in as a plain model folder (no peft needed to load it)."""
    run = Path(run).expanduser()
    if not run.exists():
        raise LmtuneError(f"{run} does not exist; pass the folder of a run trained with --lora")
    if not is_adapter(run):
        raise LmtuneError(f"{run} holds no LoRA adapter ({ADAPTER_CONFIG}); only runs trained with --lora need merging")
    if output.resolve() == run.resolve() or run.resolve().is_relative_to(output.resolve()):
        raise LmtuneError(f"--output {output} would replace the run {run}; choose another folder")
    base = Path(base_model_of(run)).expanduser()
    # Writing over the base (or a folder holding it) would leave the adapter applied twice on the next
    # load; a model folder inside the base would ride along with every copy of it.
    if base.exists() and (
        output.resolve().is_relative_to(base.resolve()) or base.resolve().is_relative_to(output.resolve())
    ):
        raise LmtuneError(
            f"--output {output} would replace or sit inside the adapter's base model {base}; choose a folder outside it"
        )
    taken = output.is_file() or (output.is_dir() and any(output.iterdir()))
    if taken and not overwrite:
        raise LmtuneError(f"{output} already exists; choose another --output or pass --overwrite")
    tokenizer = load_tokenizer(str(run), what="model")
    model = load_merged(run, "auto")
    # Written beside its final place and renamed, so a cut-short merge leaves nothing that looks complete.
    with atomic.written_beside(output, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (run / runs.CONFIG).is_file():  # the recipe that made it; `generate` reads the data format from it
            shutil.copyfile(run / runs.CONFIG, tmp / runs.CONFIG)
    return output
