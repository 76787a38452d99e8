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
from accelerate.utils import DistributedType

from lmtune import atomic, runs
from lmtune.config import RESUME_MUST_MATCH, Config
from lmtune.errors import LmtuneError, first_line
from lmtune.events import Report
from lmtune.runs import COMPLETE, complete, incomplete  # where a run folder's layout is defined

STATE = "state.json"
TENSORS = "training_state.pt"


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


def save(
    root: Path,
    step: int,
    keep: int,
    model: Any,
    weights: dict[str, Any],
    tokenizer: Any,
    optimizer_state: dict[str, Any],
    processes: list[dict[str, Any]],
    state: dict[str, Any],
    best: Path | None = None,
) -> Path:
    """Write the checkpoint of `step` under `root` (main process only), then delete all but the newest `keep`
    and the `best` one (--keep-best).

    weights, optimizer_state: whole state dicts (gathered by every process under FSDP); processes: each
    one's RNG states and loss sums; state: the shared progress and settings. A failure leaves nothing
    partial; a full disk or other I/O failure becomes a clear error.
    """
    final = root / folder_name(step)
    try:
        with atomic.written_beside(final, folder=True) as tmp:
            model.save_pretrained(tmp, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            torch.save({"optimizer": optimizer_state, "processes": processes}, tmp / TENSORS)
            (tmp / STATE).write_text(json.dumps({**state, "versions": versions()}, indent=2) + "\n")
            (tmp / COMPLETE).write_text("")  # last: a folder without it was cut short
    except Exception as err:  # torch's own words for a full disk: "[enforce fail at inline_container.cc:672]"
        raise LmtuneError(
            f"could not save the checkpoint of step {step} in {root}: {reason(err)}; "
            "nothing partial was left and earlier checkpoints are kept"
        ) from None
    for old in [c for c in complete(root) if c != best][:-keep]:
        (old / COMPLETE).unlink()  # first, so a deletion cut short never looks complete
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_model(model: Any, weights: dict[str, Any], tokenizer: Any, folder: Path) -> None:
    """The final model (safetensors) with `weights` (its whole state dict) and tokenizer, into the run
    folder: written beside it first, so no half-written model is ever seen there."""
    with atomic.written_beside(folder, into=True) as tmp:
        model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)


def copy_model(checkpoint: Path, folder: Path) -> None:
    """The model (or adapter) and tokenizer of a checkpoint, copied into the run folder as save_model would
    write them: everything but the checkpoint's training state."""
    with atomic.written_beside(folder, into=True) as tmp:
        for f in checkpoint.iterdir():
            if f.name not in (TENSORS, STATE, COMPLETE):
                shutil.copy(f, tmp / f.name)


def plain(accelerator: Any, model: Any) -> Any:
    """The prepared model as transformers knows it: without DDP's wrapper and without --compile's compiled
    regions, whose parameter names carry `_orig_mod.` (the same tensors)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def whole_weights(accelerator: Any, model: Any) -> dict[str, Any]:
    """The prepared model's full state dict; every process must call it (under FSDP the main process gets
    the weights gathered from all, the others {})."""
    # FSDP gathers from the wrapped model; otherwise the plain one's names are the ones transformers loads.
    fsdp, unwrapped = accelerator.distributed_type == DistributedType.FSDP, plain(accelerator, model)
    weights = accelerator.get_state_dict(model if fsdp else unwrapped)
    # Gathered weights are copies, tied ones too (GPT-2's output layer is its input embedding); made one
    # tensor again, save_pretrained writes them once, as without FSDP.
    first: dict[int, str] = {}
    for name, p in unwrapped.named_parameters(remove_duplicate=False):
        if name in weights:
            weights[name] = weights[first.setdefault(id(p), name)]
    return dict(weights)


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


def reason(err: BaseException) -> str:
    """Why a write failed, in words: an OSError's own, or the OS's words inside a library's error
    (safetensors reports a full disk as `... { code: 28, ..., message: "No space left on device" }`)."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    found = re.search(r'message: "([^"]+)"', str(err))
    if found:
        return found.group(1)
    if re.search(r"enforce fail at inline_container|file write failed", str(err)):  # torch.save's
        return f"a write failed: is the disk full? (torch: {first_line(err)})"
    return first_line(err)


def load(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state.json, training_state.pt) of a complete checkpoint; a damaged one is named, with the way on."""
    try:
        state = json.loads((folder / STATE).read_text())
        if not isinstance(state, dict) or "step" not in state:
            raise ValueError("not a checkpoint's state")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise damaged(folder / STATE, err) from None
    try:
        tensors = torch.load(folder / TENSORS, weights_only=True, map_location="cpu")
    except Exception as err:  # a truncated file: PytorchStreamReader's RuntimeError, or an unpickling error
        raise damaged(folder / TENSORS, err) from None
    return state, tensors


def damaged(path: Path, err: BaseException) -> LmtuneError:
    """The error for a damaged file of a checkpoint marked complete: which, and the checkpoint before it."""
    folder = path.parent
    earlier = [c for c in complete(folder.parent) if c.name < folder.name]
    way_on = (
        f"to go on from the previous checkpoint, {earlier[-1]}, move {folder} away and resume again"
        if earlier
        else "no earlier checkpoint is kept: start over with --overwrite"
    )
    return LmtuneError(f"checkpoint {folder} is damaged: {path.name} cannot be read ({first_line(err)}); {way_on}")


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The settings that must match on resume and differ between the checkpoint's config and this one."""
    saved = {**WRITTEN_BEFORE_THE_KEY_EXISTED, **saved}
    return [f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in RESUME_MUST_MATCH if saved.get(k) != now.get(k)]


# How validation documents are held out of the training data (data.held_out); kept in each checkpoint, so a
# run whose held-out documents were chosen another way is not resumed on other training data.
HELD_OUT = "content hash"

# How a checkpoint written before a key existed was trained: chat data was not packed, data was not streamed,
# weights not quantized, AdamW.
WRITTEN_BEFORE_THE_KEY_EXISTED = {"packing": False, "streaming": False, "quantize": "no", "optimizer": "adamw"}


# --- resuming ----------------------------------------------------------------------------------------


def check_resumable(
    saved: dict[str, Any], cfg: Config, processes: int, fsdp: bool, held_out: bool, output: Path, force: bool
) -> None:
    """Refuse to resume a checkpoint with settings that would make it another run (unless forced).
    held_out: this run's validation documents are held out of its data."""
    changed = differences(saved["config"], cfg.model_dump(exclude={"output"}))
    if saved["processes"] != processes:
        changed.append(f"processes ({saved['processes']} -> {processes})")
    if saved.get("fsdp", False) != fsdp:  # the optimizer state is stored differently
        raise LmtuneError(
            f"cannot resume {output}: its checkpoint was written {'with' if saved.get('fsdp') else 'without'} "
            "FSDP; resume with the same accelerate config"
        )
    if held_out and saved.get("held_out") != HELD_OUT and not force:
        raise LmtuneError(
            f"cannot resume {output}: it was stopped by an earlier lmtune, which held out other documents of "
            f"{cfg.data_label} for validation (now a hash of each document's text decides); resuming would go on "
            "with other training data. Start over with --overwrite, or pass --force to go on all the same"
        )
    if changed and not force:
        raise LmtuneError(
            f"cannot resume {output}: these settings differ from the run's and change the model or the data "
            f"order: {', '.join(changed)}; use the run's settings (--recipe {output / runs.CONFIG}) or pass --force"
        )


def check_target(step: int, total_steps: int, output: Path) -> None:
    """Refuse a resume whose target (--max-steps, or --epochs' steps) lies before the checkpoint's step."""
    if total_steps < step:
        raise LmtuneError(
            f"cannot resume {output} with a target of {total_steps} steps: its checkpoint is at step {step}, "
            f"so nothing would be trained; pass --max-steps {step + 1} or more"
        )


def check_same_data(saved: dict[str, Any], now: dict[str, Any], output: Path, force: bool) -> None:
    """Refuse to resume on data other than the checkpoint's (unless forced), naming the files that changed.
    Files are compared by path and size, then the documents and tokens they made."""
    before = saved.get("data")
    if before is None or force:  # written before lmtune kept it
        return
    old, new = before["files"], now["files"]
    changed = [f"{f} ({'gone' if f not in new else 'new' if f not in old else 'changed size'})"
               for f in sorted(old.keys() | new.keys()) if old.get(f) != new.get(f)]  # fmt: skip
    counts = [f"{k} {before[k]:,} -> {now[k]:,}" for k in before if k != "files" and before[k] != now.get(k)]
    if changed or counts:
        what = ", ".join(changed) if changed else f"{', '.join(old)} ({'; '.join(counts)})"
        raise LmtuneError(
            f"cannot resume {output}: the data changed since its checkpoint: {what}; resuming would train and "
            "validate on other data. Put the data back as it was, start over with --overwrite, or pass --force"
        )


def use_learning_rate(scheduler: Any, lr: float, report: Report) -> None:
    """A resumed run's peak learning rate is --lr, not the stopped run's (restored with the scheduler's state):
    resuming with a lower --lr is the way on from a run that diverged."""
    if scheduler.base_lrs[0] == lr:
        return
    report({"event": "phase", "phase": f"learning rate changed on resume: {scheduler.base_lrs[0]:g} -> {lr:g}"})
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the records a resumed run will write again (after `step`), and a last line cut short."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event.get("step", 0) <= step:
            kept.append(line)
    path.write_text("".join(k + "\n" for k in kept))


def find_resume_checkpoint(output: Path, report: Report) -> Path:
    """The newest complete checkpoint of the run in `output`, naming any incomplete ones it passes over."""
    root = output / runs.CHECKPOINTS
    ignored = incomplete(root)
    if ignored:
        names = ", ".join(p.name for p in ignored)
        report({"event": "phase", "phase": f"ignoring incomplete checkpoints: {names}"})
    found = complete(root)
    if not found:
        raise LmtuneError(f"{output} has no complete checkpoint to resume from; start over with --overwrite")
    report({"event": "phase", "phase": f"resuming from {found[-1]}"})
    return found[-1]
