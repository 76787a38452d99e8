"""What a run's memory holds, measured in the dry run's passes, and what would fit when it does not.

The dry run measures: the weights, gradients and optimizer states by their tensors' sizes, and the
peak of its passes (on a GPU what PyTorch allocated, on a CPU the process's peak resident memory), of
which whatever the three do not explain is counted as activations (and, on a CPU, the allocator's
working memory). The alternatives are computed from those parts, one lever at a time.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from lmtune.config import Config

GIB = 2**30
# bitsandbytes' 8-bit Adam keeps both moments in one byte each (plus a float32 scale per 2,048 values)
# where torch's AdamW keeps them in float32: a quarter of the bytes for tensors of 4,096 elements or more.
EIGHT_BIT_SHARE = 2 / 8
# NF4 with double quantization: 4 bits per weight plus about 0.127 bits of block scales.
NF4_BYTES_PER_WEIGHT = (4 + 0.127) / 8


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes held by `tensors` (nested dicts and lists of them too), each storage counted once."""
    seen: set[int] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        elif isinstance(t, dict):
            for v in t.values():
                add(v)
        elif isinstance(t, list | tuple):
            for v in t:
                add(v)

    for t in tensors:
        add(t)
    return total


def weight_bytes(model: torch.nn.Module) -> int:
    """The model's parameters and buffers as they are held (4-bit weights packed two to a byte)."""
    return tensor_bytes([*model.parameters(), *model.buffers()])


def gradient_bytes(model: torch.nn.Module) -> int:
    return tensor_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: Any) -> int:
    return tensor_bytes(optimizer.state.values())


# --- measuring a peak --------------------------------------------------------------------------------


def status_kib(field: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM); None where there is no /proc."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def start_peak(device: torch.device) -> dict[str, int]:
    """Memory in use now, and the process's peak so far; then the peak counter starts again from now (on
    Linux, writing 5 to /proc/self/clear_refs resets the resident-memory high-water mark)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        in_use = torch.cuda.memory_allocated(device)
        before = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return {"in_use": in_use, "peak_before": before}
    rss, hwm = status_kib("VmRSS"), status_kib("VmHWM")
    if rss is None or hwm is None:
        return {"in_use": 0, "peak_before": process_peak()}
    # Where it cannot be reset, the high-water mark includes what came before: the split is an upper bound.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return {"in_use": rss * 1024, "peak_before": hwm * 1024}


def peak_since_start(device: torch.device) -> int:
    """The peak since `start_peak`: allocated by PyTorch on a GPU, resident on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    hwm = status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else process_peak()


def process_peak() -> int:
    """The process's peak resident memory in bytes (getrusage: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def capacity(device: torch.device, in_use: int) -> int:
    """What the run can have: the GPU's memory, or this process's memory plus what the machine has available."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return in_use + int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


# --- the plan -------------------------------------------------------------------------------------------


def split(
    model: torch.nn.Module, start: dict[str, int], peak: int, gradients: int, states: int, device: torch.device
) -> dict[str, Any]:
    """The measured parts of the passes' peak, and the whole process's peak."""
    weights = weight_bytes(model)
    base = start["in_use"]  # weights, data, libraries (on a CPU) held before the passes
    activations = max(0, peak - base - gradients - states)
    return {
        "device": "gpu" if device.type == "cuda" else "cpu",
        "weights": weights,
        "gradients": gradients,
        "optimizer_states": states,
        "activations": activations,
        "other": max(0, base - weights),  # on a CPU: the libraries, the data, the allocator's pools
        "peak": max(peak, start["peak_before"]),
        "capacity": capacity(device, base),
    }


def linear_weights(model: torch.nn.Module) -> tuple[int, int, int]:
    """(elements, bytes, LoRA rank-1 elements) of the linear layers QLoRA would quantize: every nn.Linear
    and GPT-2 Conv1D but the output head; rank-1 elements: in + out of each, what one rank of LoRA adds."""
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    elements = size = rank1 = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Linear | Conv1D) and module is not head:
            w = module.weight
            elements += w.numel()
            size += w.numel() * w.element_size()
            rank1 += sum(w.shape)
    return elements, size, rank1


def alternatives(cfg: Config, model: Any, parts: dict[str, Any], block_size: int) -> list[dict[str, Any]]:
    """Each lever alone with its estimated peak: the measured parts with that lever's share taken off."""
    from lmtune.model import checkpointing, transformers_model

    peak, acts, states, grads = parts["peak"], parts["activations"], parts["optimizer_states"], parts["gradients"]
    inner = transformers_model(model)
    options = []
    config = inner.config
    layers = getattr(config, "num_hidden_layers", None)
    width = getattr(config, "hidden_size", None)
    if not checkpointing(model) and layers and width:
        # Kept: each layer's input (B, T, E) in float32; recomputed: one layer's activations at a time.
        kept = layers * cfg.batch_size * block_size * width * 4
        after = acts / layers + kept
        if after < acts:
            options.append({"change": "--gradient-checkpointing", "peak": peak - acts + after, "how": "computed"})
    if cfg.batch_size > 1:
        half = cfg.batch_size // 2
        options.append({
            "change": f"--batch-size {half} --gradient-accumulation-steps {cfg.gradient_accumulation_steps * 2}",
            "peak": peak - acts + acts * half / cfg.batch_size, "how": "computed",
        })  # fmt: skip
    if cfg.optimizer in ("adamw", "paged-adamw") and states:
        options.append({"change": "--optimizer adamw-8bit", "peak": peak - states * (1 - EIGHT_BIT_SHARE), "how": "computed"})  # fmt: skip
    if cfg.quantize == "no" and not cfg.from_scratch:
        elements, size, rank1 = linear_weights(inner)
        saved = size - elements * NF4_BYTES_PER_WEIGHT
        if cfg.lora:
            options.append({"change": "--quantize 4bit", "peak": peak - saved, "how": "computed"})
        else:
            adapter = rank1 * cfg.lora_rank * 4  # float32 LoRA weights; their gradients and AdamW states: x 4
            options.append({
                "change": "--lora --quantize 4bit", "peak": peak - saved - grads - states + 4 * adapter, "how": "computed",
            })  # fmt: skip
    for option in options:
        option["fits"] = option["peak"] <= parts["capacity"]
    return options
