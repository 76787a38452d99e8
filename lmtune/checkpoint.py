"""Checkpoints a run continues from exactly: written beside their final place, marked complete last, renamed.

A checkpoint folder `checkpoints/step-NNNNNNN/` is a model folder (`from_pretrained` loads it) plus:
- `training_state.pt`: optimizer state (under FSDP gathered whole, keyed by parameter name) and each
  process's RNG states, tensors and plain values only,
  read back with `torch.load(weights_only=True)` (no pickled objects);
- `state.json`: step counters, the data position, the scheduler, the config and the library versions;
- `COMPLETE`, written last. A folder without it, or a `.step-*.tmp` folder, was cut short and is ignored.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune.errors import LmtuneError, first_line

COMPLETE = "COMPLETE"
STATE = "state.json"
TENSORS = "training_state.pt"

# Keys that decide the model or the order of the data: a resumed run with any of them changed would
# not be a continuation, so it is refused unless forced.
SAME_RUN_KEYS = (
    "model", "from_scratch", "tokenizer", "vocab_size", "n_layer", "n_head", "n_embd", "n_positions", "dtype",
    "dropout", "data", "text_column", "data_format", "validation_data", "validation_percent", "txt_documents", "block_size",
    "batch_size", "gradient_accumulation_steps", "seed", "lora", "lora_rank", "lora_alpha", "lora_dropout",
    "lora_targets",
)  # fmt: skip


def rng_state() -> dict[str, Any]:
    """This process's random number generators: torch (CPU and CUDA), numpy and Python's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": [version, list(internal), python_gauss],
    }  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def versions() -> dict[str, str]:
    import accelerate
    import transformers

    import lmtune

    return {
        "lmtune": lmtune.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def folder_name(step: int) -> str:
    return f"step-{step:07d}"


def begin(root: Path, step: int) -> Path:
    """A fresh temporary folder for the checkpoint of `step` (main process only)."""
    tmp = root / f".{folder_name(step)}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write(
    tmp: Path,
    model: Any,
    weights: dict[str, Any],
    tokenizer: Any,
    optimizer_state: dict[str, Any],
    processes: list[dict[str, Any]],
    state: dict[str, Any],
) -> None:
    """Everything but the completion mark (main process only). weights, optimizer_state: whole state
    dicts, gathered by every process under FSDP; processes: each one's RNG states and loss sum."""
    model.save_pretrained(tmp, state_dict=weights)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer_state, "processes": processes}, tmp / TENSORS)
    (tmp / STATE).write_text(json.dumps({**state, "versions": versions()}, indent=2) + "\n")


def optimizer_state(model: Any, optimizer: Any, fsdp: bool) -> dict[str, Any]:
    """The optimizer's whole state. Under FSDP each process holds a shard of it: every process must call
    this, torch gathers the state (keyed by parameter name) and the main process gets it, the others {}."""
    if not fsdp:
        return dict(optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dict(get_optimizer_state_dict(model, optimizer.optimizer, options=options))


def load_optimizer_state(model: Any, optimizer: Any, state: dict[str, Any], fsdp: bool) -> None:
    """Restore what `optimizer_state` returned; under FSDP each process keeps its own shard of it."""
    if not fsdp:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer.optimizer, state, options=StateDictOptions(full_state_dict=True))


def commit(tmp: Path, root: Path, step: int, keep: int) -> Path:
    """Mark complete, move into place, then delete all but the newest `keep` complete checkpoints."""
    (tmp / COMPLETE).write_text("")
    final = root / folder_name(step)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in complete(root)[:-keep]:
        (old / COMPLETE).unlink()  # first, so a deletion cut short never looks complete
        shutil.rmtree(old, ignore_errors=True)
    return final


def abandon(tmp: Path, step: int, err: BaseException) -> LmtuneError | None:
    """Remove a checkpoint cut short by `err`; a full disk or other I/O failure becomes a clear error."""
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(err, OSError) or "os error" in str(err):
        return LmtuneError(
            f"could not save the checkpoint of step {step} in {tmp.parent}: {reason(err)}; "
            "nothing partial was left and earlier checkpoints are kept"
        )
    return None


def reason(err: BaseException) -> str:
    """Why a write failed, in words: an OSError's own, or the OS's words inside a library's error
    (safetensors reports a full disk as `... { code: 28, ..., message: "No space left on device" }`)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    found = re.search(r'message: "([^"]+)"', str(err))
    return found.group(1) if found else first_line(err)


def complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / COMPLETE).is_file())


def incomplete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not (p / COMPLETE).is_file())


def load(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, training_state.pt) of a complete checkpoint."""
    state = json.loads((folder / STATE).read_text())
    tensors = torch.load(folder / TENSORS, weights_only=True, map_location="cpu")
    return state, tensors


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The SAME_RUN_KEYS whose values differ between the checkpoint's config and this one."""
    return [f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in SAME_RUN_KEYS if saved.get(k) != now.get(k)]
