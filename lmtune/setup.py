"""Setting up a run: the inputs checked, then accelerator, tokenizer, data, model, optimizer, scheduler and
loader, held in one record (`Run`) that does not change while the run trains, and the plan they make."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import (
    DistributedType,
    TorchDynamoPlugin,
    is_tensorboard_available,
    is_wandb_available,
    set_seed,
)
from torch.utils.data import DataLoader
from transformers import get_scheduler

from lmtune import batches, checkpoint, data, dpo, hub, lora, loss, memory, mixture, runs
from lmtune.config import Config, absolute_paths
from lmtune.data import plan as data_plan
from lmtune.data import streaming
from lmtune.errors import LmtuneError
from lmtune.events import Report, silent
from lmtune.model import (
    checkpoint_activations,
    load_model,
    load_tokenizer,
    parameter_count,
    quantization,
    require_bitsandbytes,
    resolve_block_size,
)

log = logging.getLogger("lmtune")


@dataclass
class Run:
    """What does not change during a run: set up once by `prepare`, only read after (the teardown drops
    the model)."""

    cfg: Config
    output: Path
    accelerator: Any
    model: Any  # prepared by Accelerate (DDP- or FSDP-wrapped when there are several processes)
    plain: Any  # the same model as transformers (or peft) built it, without DDP's or --compile's wrappers
    optimizer: Any
    scheduler: Any
    loader: Any  # batches of (inputs, labels, real tokens)
    tokenizer: Any
    data_plan: data.DataPlan  # what is trained on and held out, decided once; in the run folder as data_plan.json
    validation: list[data.Split]  # each source's, in the plan's order
    mixed: mixture.Mixed | None  # several sources (not streamed): their rows and how they are interleaved
    block_size: int  # tokens per training row and per evaluation window
    chunked: bool  # lmtune's chunked loss (False: transformers' own, for sharded or unusual models)
    fsdp: bool
    total_steps: int
    epochs: int
    eval_every: int  # optimizer steps; 0: only at the end
    save_every: int  # optimizer steps; 0: never (a signal still saves)
    plan: dict[str, Any]
    resume_from: Path | None
    say: Report  # the user's report on the main process, silent on the others
    dpo: dpo.Preference | None = None  # preference pairs: trained with the DPO loss against a reference

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)


def check_inputs(cfg: Config, dry_run: bool) -> tuple[Config, Path]:
    """The config with local paths made absolute, and the run folder; refused early when it cannot work."""
    if not cfg.data:
        raise LmtuneError("no training data: pass --data with a file, a folder or a hub dataset name")
    if cfg.streaming and not cfg.max_steps:
        raise LmtuneError("--streaming needs --max-steps: a stream has no length to count epochs by")
    if cfg.streaming and "epochs" in cfg.model_fields_set:
        raise LmtuneError(
            "--streaming takes --max-steps steps, reading a stream again when it ends; --epochs does not apply to it"
        )
    if not cfg.model and not cfg.from_scratch:
        raise LmtuneError("no model: pass a hub id or a folder (lmtune finetune gpt2 ...), or --from-scratch")
    runs.check_home()  # caches and the latest run are written there: a bad LMTUNE_HOME fails now, not at the end
    check_tracker(cfg.report_to)
    check_memory_options(cfg)
    if cfg.push_to_hub and not dry_run:  # before training, not after hours of it
        hub.check_push(cfg.push_to_hub)
    cfg = absolute_paths(cfg)
    return cfg, Path(cfg.output).expanduser() if cfg.output else runs.default_output(cfg)


def prepare(cfg: Config, output: Path, resume_from: Path | None, report: Report) -> Run:
    """Accelerator, tokenizer, data, model, optimizer, scheduler and loader, and the plan they make."""
    accelerator = make_accelerator(cfg, output)
    set_seed(cfg.seed)
    say = report if accelerator.is_main_process else silent
    plan = data_plan.decide(cfg)  # what is trained on and held out, decided here once
    # Tokenize on the main process first; the others then read its cache.
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(str(resume_from)) if resume_from else data.tokenizer_for(cfg, plan, say)
        # A stream is read as training goes: only its validation documents are tokenized now.
        corpora = (
            streaming.validation_corpora(plan, tokenizer, say)
            if cfg.streaming
            else data.load_corpora(plan, tokenizer, say)
        )
    formats = {src.data_format for src in plan.sources}
    if len(formats) == 1:  # what auto found, saved in config.yaml
        cfg = cfg.model_copy(update={"data_format": formats.pop()})
    say({"event": "phase", "phase": "loading model"})
    if resume_from and not cfg.lora:
        # The checkpoint's weights, loaded exactly as the base model was (same dtype and dropout).
        model = load_model(cfg.model_copy(update={"model": str(resume_from), "from_scratch": False}), tokenizer)
    else:
        quantize = cfg.quantize != "no"
        quantized = (
            quantization(cfg.quantize, compute_dtype(cfg, accelerator), accelerator.device) if quantize else None
        )
        model = load_model(cfg, tokenizer, quantized)
    if cfg.lora:  # the base stays frozen; a new adapter trains, or the checkpoint's when resuming
        model = lora.add_adapter(model, cfg, resume_from)
    if cfg.gradient_checkpointing:
        checkpoint_activations(model)
    plan = rows_shape(cfg, plan, model, accelerator.is_main_process)
    block_size = plan.block_size or 0
    cfg = cfg.model_copy(update={"packing": plan.packing})  # what was done, saved in config.yaml
    rows, mixed = training_rows(cfg, plan, corpora, tokenizer, block_size)
    for src, corpus in zip(plan.sources, corpora, strict=True):
        if len(corpus.validation.ids) < 2:
            raise LmtuneError(f"the validation data of {src.name} is shorter than 2 tokens; pass more validation data")
    pad = batches.pad_pairs if plan.preference else batches.pad_batch
    collate = partial(pad, pad_id=tokenizer.pad_token_id)
    # On a GPU, batches are built in page-locked memory, so their copy to the GPU (non_blocking, see
    # make_accelerator) runs while the CPU goes on queueing the step's kernels instead of waiting for it.
    pin = accelerator.device.type == "cuda"
    # One source: shuffled by Accelerate's seedable sampler; several: in the mixture's order (shuffled within
    # each source); a stream: in its order.
    sampler = mixture.MixSampler(mixed) if mixed else None
    shuffle = not cfg.streaming and sampler is None
    loader = DataLoader(rows.dataset, cfg.batch_size, shuffle, sampler, collate_fn=collate, pin_memory=pin)
    optimizer = make_optimizer(model, cfg)
    # The chunked loss reads the output weights outside the model's forward, which sharded models
    # (FSDP, DeepSpeed) do not allow; they take transformers' loss.
    sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)
    chunked = loss.supported(model) and accelerator.distributed_type not in sharded
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    plain = checkpoint.plain(accelerator, model)
    if cfg.compile and chunked:
        loss.compile_chunks()

    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    # Default: 4 evaluations during the run and the final one; ceil so the 5th never lands just before the end.
    eval_every = cfg.eval_every if cfg.eval_every is not None else math.ceil(total_steps / 5)
    # Scheduled by hand, once per optimizer step: accelerate's prepared scheduler steps once per process.
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
        optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    validation = [c.validation for c in corpora]
    run = Run(
        cfg, output, accelerator, model, plain, optimizer, scheduler, loader, tokenizer, plan, validation, mixed, block_size,
        chunked, accelerator.distributed_type == DistributedType.FSDP, total_steps,
        math.ceil(total_steps / steps_per_epoch), eval_every, cfg.save_every if cfg.save_every is not None else eval_every,
        {}, resume_from, say,
    )  # fmt: skip
    if plan.preference:
        run.dpo = preference(run, corpora, rows, mixed)
    run.plan = make_plan(run, corpora, rows, steps_per_epoch)
    return run


def preference(run: Run, corpora: list[data.Corpus], rows: batches.Rows, mixed: mixture.Mixed | None) -> dpo.Preference:
    """What DPO needs: beta, the reference, and each source's training and held-out pairs (cut as training cuts)."""
    cfg = run.cfg
    if run.fsdp:
        raise LmtuneError("preference tuning (DPO) does not run under FSDP yet; use DDP or one process")
    if cfg.from_scratch:
        raise LmtuneError("preference tuning (DPO) starts from a trained model: pass MODEL, not --from-scratch")
    train = [p for p in (mixed.parts if mixed else [rows.dataset]) if isinstance(p, batches.Pairs)]
    validation = [batches.Pairs(c.validation, run.block_size) for c in corpora]
    for src, pairs in zip(run.data_plan.sources, validation, strict=True):
        if not len(pairs):
            raise LmtuneError(
                f"no held-out pair of {src.name} keeps a token of both answers; pass more validation data"
            )
    where = cfg.reference or (
        f"{cfg.model} with the LoRA adapter off" if cfg.lora else f"the starting model {cfg.model}"
    )
    return dpo.Preference(cfg.beta, where, train, validation, [c.validation for c in corpora])


def training_rows(
    cfg: Config, plan: data.DataPlan, corpora: list[data.Corpus], tokenizer: Any, block_size: int
) -> tuple[batches.Rows, mixture.Mixed | None]:
    """The rows the run trains on: one source's; several sources' mixed by weight; or a stream's blocks."""
    if cfg.streaming:  # the blocks the run takes, in the streams' order
        wanted = (cfg.max_steps or 0) * cfg.gradient_accumulation_steps * cfg.batch_size
        blocks = streaming.StreamedBlocks(plan, tokenizer, block_size, wanted)
        return batches.Rows(blocks, 0), None
    parts = [
        batches.training_rows(c, block_size, plan.packing or False, src.name)
        for src, c in zip(plan.sources, corpora, strict=True)
    ]
    if len(parts) == 1:
        return parts[0], None
    weights = [s.weight for s in plan.sources]
    mixed = mixture.Mixed(parts, [w for w in weights if w is not None] or None, cfg.seed)
    rows = batches.Rows(
        mixed, sum(p.dropped for p in parts), sum(p.conversations for p in parts),
        sum(p.truncated for p in parts), sum(p.skipped for p in parts),
    )  # fmt: skip
    return rows, mixed


def rows_shape(cfg: Config, plan: data.DataPlan, model: Any, main: bool) -> data.DataPlan:
    """The plan with its block size (--block-size, else the model's context, at most 1024) and whether chat data
    is packed (asked, and the model keeps packed conversations apart). `model`: the model, or for text data
    anything with its config (the block size reads only that)."""
    block_size = resolve_block_size(cfg.block_size, model)
    packing = cfg.packing and plan.chat and packing_works(model, main)
    return data_plan.with_shape(plan, block_size, packing)


def packing_works(model: Any, main: bool) -> bool:
    """Whether this model keeps packed conversations apart; if not, say that they will be padded instead."""
    if batches.packing_works(model):
        return True
    if main:
        log.warning("this model lets packed conversations attend to each other: one conversation per row instead")
    return False


def make_accelerator(cfg: Config, output: Path) -> Any:
    accelerator = Accelerator(
        # With no GPU, say so: accelerate then joins processes started by torchrun or MPI over gloo
        # instead of letting each train alone.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=resolve_precision(cfg.mixed_precision),
        # Regional compilation: each transformer block is compiled once and the compiled code reused by
        # the others (torchtune does the same), and the code around them (masks, positions) stays eager,
        # where transformers picks sdpa's causal fast path; a whole-model graph also broke at least once.
        # "no" unless --compile, whatever `accelerate config` set.
        dynamo_plugin=TorchDynamoPlugin(backend="inductor" if cfg.compile else "no", use_regional_compilation=True),
        # Micro-batches are accumulated by the loop itself, each weighted by its share of the step's tokens.
        gradient_accumulation_steps=1,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(output),
        # The data order depends only on the seed and the epoch.
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg.seed, non_blocking=torch.cuda.is_available()
        ),
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Its gradient clipping returns a float and its optimizer state is split in its own format;
        # neither the loop nor the checkpoints handle them, and it runs only on GPUs, untested so far.
        raise LmtuneError("DeepSpeed is not supported; use FSDP (accelerate config: distributed_type FSDP)")
    fsdp_asked = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    if accelerator.is_main_process and fsdp_asked and accelerator.distributed_type != DistributedType.FSDP:
        # accelerate 1.15 turns FSDP on only for GPUs and other accelerators, silently
        log.warning("FSDP asked for, but Accelerate does not shard on CPU: each process keeps the whole model")
    return accelerator


def make_plan(run: Run, corpora: list[data.Corpus], rows: batches.Rows, steps_per_epoch: int) -> dict[str, Any]:
    """What the run will do, shown before it starts (and by --dry-run) and kept in summary.json."""
    cfg, acc = run.cfg, run.accelerator
    n_parameters, n_trainable = parameter_count(run.plain), lora.trainable_parameters(run.model)
    streamed = cfg.streaming  # a stream's documents and tokens are not known before it is read
    return {
        "output": str(run.output),
        "model": cfg.model or "new GPT-2 shaped model",
        "parameters": n_parameters,
        "trainable_parameters": n_trainable,
        # Gradient + AdamW state (float32), estimated, and what full fine-tuning would need (peaks: bench/).
        "training_state_bytes": n_trainable * lora.STATE_BYTES_PER_PARAMETER,
        "full_training_state_bytes": n_parameters * lora.STATE_BYTES_PER_PARAMETER,
        "mixed_precision": acc.mixed_precision,
        "compile": cfg.compile,
        "quantize": cfg.quantize,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "optimizer": cfg.optimizer,
        "processes": acc.num_processes,
        "streaming": streamed,
        "documents": None if streamed else sum(documents(c.train, c.format) for c in corpora),
        "empty_documents": sum(c.empty_documents for c in corpora),
        "train_tokens_available": None if streamed else sum(len(c.train.ids) for c in corpora),
        "data_format": "+".join(sorted({c.format for c in corpora})),
        "block_size": run.block_size,
        "blocks": None if streamed else len(rows.dataset),  # chat: rows of one conversation, or of several when packed
        "conversations": rows.conversations,
        "packing": run.cfg.packing,
        "tokens_dropped": rows.dropped,  # chat: cut from conversations longer than the block size
        "examples_truncated": rows.truncated,
        "examples_skipped": rows.skipped,  # chat: no response token left within the block
        "validation": "; ".join(c.validation_source for c in corpora),
        "validation_documents": sum(documents(c.validation, c.format) for c in corpora),
        "validation_tokens": sum(len(c.validation.ids) for c in corpora),
        "sources": source_rows(run, corpora),
        "steps_per_epoch": steps_per_epoch,
        "epochs": run.epochs,
        "total_steps": run.total_steps,
        "tokens_per_step": cfg.batch_size * run.block_size * cfg.gradient_accumulation_steps * acc.num_processes,
        "data_from_cache": all(c.cached for c in corpora),
        # preference pairs: trained with the DPO loss, against this reference
        "objective": "dpo" if run.dpo else "next-token",
        "beta": cfg.beta if run.dpo else None,
        "reference": run.dpo.reference if run.dpo else None,
    }


def documents(split: data.Split, fmt: str) -> int:
    """Documents of a split as a person counts them: a preference pair is one (two sequences in the stream)."""
    return split.documents // 2 if fmt == "preference" else split.documents


def source_rows(run: Run, corpora: list[data.Corpus]) -> list[dict[str, Any]]:
    """Each source in the plan: its share of the training tokens, its tokens per epoch and how many times an epoch
    sees it, and its validation."""
    n = len(corpora)
    given = [s.weight or 1.0 for s in run.data_plan.sources]  # streams without weights are refused by the plan
    shares = list(run.mixed.shares) if run.mixed else [w / sum(given) for w in given]
    epoch_tokens = (
        run.mixed.epoch_tokens() if run.mixed else [None if run.cfg.streaming else len(c.train.ids) for c in corpora]
    )
    seen = run.mixed.times_seen() if run.mixed else [1.0] * n
    return [
        {
            "data": src.data, "name": src.name, "form": src.form, "format": src.data_format,
            "weight": src.weight, "share": float(share), "epoch_tokens": tokens, "times_seen": float(times),
            "validation": corpus.validation_source, "validation_kind": src.validation,
            "validation_tokens": len(corpus.validation.ids),
        }
        for src, corpus, share, tokens, times in zip(run.data_plan.sources, corpora, shares, epoch_tokens, seen, strict=True)
    ]  # fmt: skip


def resolve_precision(choice: str) -> str:
    """The mixed precision to use: bf16 where the hardware computes it fast, else full precision."""
    if choice == "fp16" and not torch.cuda.is_available():
        raise LmtuneError("--mixed-precision fp16 needs a CUDA GPU; use bf16 or no")
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "no"


def cpu_has_bf16() -> bool:
    """True on CPUs with bf16 matrix units. Without them PyTorch emulates bf16 and it is slower than fp32
    (measured: a 1024x1024 bf16 matmul 5x slower than fp32 on an AVX-512 Xeon lacking avx512_bf16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_memory_options(cfg: Config) -> None:
    """Fail before any work when --quantize or --optimizer cannot run here."""
    if cfg.optimizer.startswith("paged") and not torch.cuda.is_available():
        raise LmtuneError(
            f"--optimizer {cfg.optimizer} pages its state between GPU and CPU memory, which needs a CUDA GPU; "
            "use adamw-8bit"
        )
    if cfg.quantize != "no":
        require_bitsandbytes(f"--quantize {cfg.quantize}")
    if cfg.optimizer != "adamw":
        require_bitsandbytes(f"--optimizer {cfg.optimizer}")


def compute_dtype(cfg: Config, accelerator: Any) -> torch.dtype:
    """The dtype quantized layers multiply in: the run's mixed precision, else its --dtype."""
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}
    fallback = torch.float32 if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
    return precision.get(accelerator.mixed_precision, fallback)


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only: torch's, or bitsandbytes' with 8-bit or paged states."""
    groups = weight_decay_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # fused: one kernel updates every tensor (CPU and CUDA) instead of a dozen ops per parameter
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=True)
    import bitsandbytes as bnb

    # The same betas (0.9, 0.999) and eps (1e-8) as torch's. The 8-bit ones keep float32 states for tensors
    # under 4,096 elements (biases, norms), where 8 bits would save nothing worth the rounding.
    kind = {
        "adamw-8bit": bnb.optim.AdamW8bit,
        "paged-adamw": bnb.optim.PagedAdamW,
        "paged-adamw-8bit": bnb.optim.PagedAdamW8bit,
    }
    optimizer: torch.optim.Optimizer = kind[cfg.optimizer](groups, lr=cfg.learning_rate)
    return optimizer


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices only: decaying biases and norm gains just pulls them towards zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def check_tracker(name: str) -> None:
    """Fail before training, not after, when the tracker's package is missing."""
    available = {"none": True, "tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if not available[name]:
        raise LmtuneError(f"--report-to {name} needs the {name} package: pip install 'lmtune[{name}]'")


def timed_passes(run: Run) -> dict[str, Any]:
    """Time a few forward/backward passes, scale them to the run, and measure the memory a training step
    takes, split into weights, gradients, optimizer states and activations, with what would fit if it does
    not (lmtune.memory). One optimizer step is taken, as the real run's first: its states are part of the
    peak. The dry run's weights are thrown away after."""
    device = run.accelerator.device
    # As the loop trains: dropout on (its masks are memory and time too) and activation checkpointing, which
    # transformers applies in training mode only; a loaded model starts in eval mode.
    run.model.train()
    start = memory.start_peak(device)
    inputs, labels, positions, _ = next(iter(run.loader))
    timings, gradients = [], 0
    for i in range(3):
        if i == 1:  # the optimizer's states exist from the first step on, through every later one
            run.optimizer.step()
        if i and run.cfg.gradient_accumulation_steps == 1:
            # Each pass as a step's only micro-batch: its gradients made anew while its activations are freed.
            # Accumulating, a later micro-batch finds the gradients there: the peak holds both, and so here.
            run.optimizer.zero_grad(set_to_none=True)
        begin = time.perf_counter()
        if run.dpo:  # both sides of each pair, as a DPO step takes them (the reference is scored once, before)
            logps, count = dpo.side_logps(run.model, run.plain, inputs, labels, run.chunked, run.accelerator.autocast)
            run.accelerator.backward(logps.sum() / count.sum())
        else:
            nll, count = loss.next_token_loss(
                run.model, run.plain, inputs, labels, run.chunked, run.accelerator, positions
            )
            run.accelerator.backward(nll / count)
        timings.append(time.perf_counter() - begin)
        gradients = memory.gradient_bytes(run.model)
    parts = memory.split(
        run.model, start, memory.peak_since_start(device), gradients, memory.optimizer_bytes(run.optimizer), device
    )
    run.model.zero_grad(set_to_none=True)
    # The first pass warms caches and allocators, so it is left out.
    seconds = min(timings[1:]) * run.cfg.gradient_accumulation_steps * run.total_steps
    memory_plan = {**parts, "alternatives": memory.alternatives(run.cfg, run.model, parts, run.block_size)}
    return {"estimated_seconds": seconds, **peak_memory(device), "memory": memory_plan}


def peak_memory(device: torch.device) -> dict[str, int]:
    """This process's peak memory: on a GPU what PyTorch allocated there, else the process's peak RSS."""
    if device.type == "cuda":
        return {"peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device)}
    return {"peak_rss_bytes": memory.process_peak()}
