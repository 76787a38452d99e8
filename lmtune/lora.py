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
from lmtune.config import Config, build, validate
from lmtune.errors import LmtuneError, first_line
from lmtune.model import load_pretrained, load_tokenizer, quantization

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
        # Quantized, they are bitsandbytes' linear layers, stored (out, in) as usual.
        fan_in_fan_out=model.config.model_type == "gpt2" and cfg.quantize == "no",
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


def trained_config(folder: Path) -> Config | None:
    """The config of the run that trained the adapter in `folder` (a run folder or a checkpoint), if it says."""
    if (folder / runs.CONFIG).is_file():
        return build(str(folder / runs.CONFIG))
    if (folder / "state.json").is_file():  # a checkpoint
        return validate(json.loads((folder / "state.json").read_text())["config"], source=str(folder / "state.json"))
    return None


def load_adapted(folder: str | Path, dtype: Any, trust_remote_code: bool = False) -> Any:
    """A LoRA run ready to generate or score, as it was trained: a quantized run's base quantized the same
    way with the adapter beside it (merging into 4-bit weights would round the update away: peft#2321),
    any other merged (`load_merged`)."""
    folder = Path(folder).expanduser()
    trained = trained_config(folder)
    if trained is None or trained.quantize == "no":
        return load_merged(folder, dtype, trust_remote_code)
    import torch
    from peft import PeftModel

    compute = torch.float32 if dtype == "auto" else dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    weights = trained.dtype if trained.dtype == "auto" else getattr(torch, trained.dtype)
    base = load_base(folder, weights, trust_remote_code, quantization(trained.quantize, compute, device))
    return PeftModel.from_pretrained(base, folder)


def load_base(folder: Path, dtype: Any, trust_remote_code: bool, quantized: dict[str, Any] | None = None) -> Any:
    """The base model the adapter in `folder` names."""
    base_name = base_model_of(folder)
    try:
        return load_pretrained(base_name, dtype, trust_remote_code, quantized=quantized)
    except LmtuneError as err:
        raise LmtuneError(f"the adapter in {folder} needs its base model {base_name}, which failed: {err}") from None


def load_merged(folder: str | Path, dtype: Any, trust_remote_code: bool = False) -> Any:
    """The base model with the adapter in `folder` merged into its weights: a plain transformers model,
    as fast at inference as the base (no separate adapter matmuls). An adapter trained on quantized
    weights is merged into the full-precision ones (as QLoRA's authors do): the merged model differs
    from the trained one by the quantization's rounding only."""
    from peft import LoraConfig, PeftModel

    folder = Path(folder).expanduser()
    base = load_base(folder, dtype, trust_remote_code)
    config = LoraConfig.from_pretrained(str(folder))
    # Quantized, GPT-2's layers were bitsandbytes' linear ones, stored (out, in); here they are Conv1D again.
    config.fan_in_fan_out = base.config.model_type == "gpt2"
    return PeftModel.from_pretrained(base, folder, config=config).merge_and_unload()


def merge(run: str | Path, output: Path | None = None, overwrite: bool = False) -> Path:
    """Write the base model with the adapter of `run` merged in as a plain model folder (no peft needed to load it),
    in `output`: by default RUN-merged, beside the run."""
    import torch

    run = Path(run).expanduser()
    output = output or Path(f"{run.resolve()}-merged")
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
    trained = trained_config(run)
    # A quantized run merges into its base's weights at the run's --dtype, never into the quantized ones.
    dtype = trained.dtype if trained and trained.quantize != "no" else "auto"
    model = load_merged(run, dtype if dtype == "auto" else getattr(torch, dtype))
    # Written beside its final place and renamed, so a cut-short merge leaves nothing that looks complete.
    with atomic.written_beside(output, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name in (runs.CONFIG, "data_plan.json"):  # the recipe and data plan that made it: `generate` reads
            if (run / name).is_file():  # whether it was trained on chat from them
                shutil.copyfile(run / name, tmp / name)
    return output
