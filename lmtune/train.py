"""`lmtune finetune`: prepare data and model, run one training loop under Accelerate, save a run folder."""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
import json
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmtune import card, checkpoint, data, hub, lora, loss, runs
from lmtune.config import Config
from lmtune.data import Report
from lmtune.errors import LmtuneError
from lmtune.evaluate import Score, score
from lmtune.model import load_model, load_tokenizer, parameter_count, resolve_block_size, train_tokenizer

log = logging.getLogger("lmtune")


def log_report(event: dict[str, Any]) -> None:
    """The report used when no display is attached: metrics as log lines, progress ignored."""
    if event["event"] in ("train", "eval"):
        log.info(json.dumps(event))


class Blocks(Dataset):
    """Packed blocks as a dataset; the (n, T) array stays a memory map until a batch is taken."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.from_numpy(self.blocks[i].astype(np.int64))
        return ids, ids  # (inputs, labels): every token is a target


class Examples(Dataset):
    """Chat examples, one per row, cut to the block size; labels are IGNORE outside the responses."""

    def __init__(self, split: data.Split, block: int):
        assert split.starts is not None and split.mask is not None, "chat splits only"
        self.ids, self.mask = split.ids, split.mask
        whole = list(itertools.pairwise(split.starts.tolist()))
        rows = [(s, min(e, s + block)) for s, e in whole]
        self.truncated = sum(e - s > block for s, e in whole)
        self.dropped = sum(max(0, e - s - block) for s, e in whole)  # tokens cut off
        # A row is kept if a response token is left to predict after the cut (position 0 predicts nothing).
        self.rows = [(s, e) for s, e in rows if self.mask[s + 1 : e].any()]
        self.skipped = len(rows) - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = self.rows[i]
        ids = torch.from_numpy(np.asarray(self.ids[s:e], dtype=np.int64))
        return ids, ids.masked_fill(~torch.from_numpy(np.asarray(self.mask[s:e])), loss.IGNORE)


def pad_batch(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(B, T) inputs and labels right-padded to the longest row, and the real (unpadded) token count.

    Padding is never a target, and in a causal model no earlier position attends to it.
    """
    length = max(len(ids) for ids, _ in rows)
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), loss.IGNORE, dtype=torch.long)
    for r, (ids, lab) in enumerate(rows):
        inputs[r, : len(ids)] = ids
        labels[r, : len(lab)] = lab
    return inputs, labels, sum(len(ids) for ids, _ in rows)


# --- preparation ------------------------------------------------------------------------------------


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


def get_tokenizer(cfg: Config, report: Report) -> Any:
    """The given tokenizer, the model's own, or (from scratch with neither) one trained on the data, cached."""
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, cfg.trust_remote_code)
    if cfg.model:
        return load_tokenizer(cfg.model, cfg.trust_remote_code, what="model")
    key_parts = [data.identity(cfg.data), cfg.text_column, cfg.txt_documents, cfg.vocab_size]
    key = hashlib.sha256(json.dumps(key_parts, default=str).encode()).hexdigest()[:24]
    folder = runs.home() / "tokenizers" / key
    if not folder.is_dir():
        report({"event": "phase", "phase": "training a tokenizer"})
        assert cfg.data, "checked by the caller"
        docs = data.train_split(data.read_documents(cfg.data, cfg), cfg.data)
        texts = [d if isinstance(d, str) else "\n".join(m["content"] for m in d) for d in docs]
        # Trained on the training split; when validation is held out of it later, its documents were
        # seen by the tokenizer (only the vocabulary, never the model), as in most from-scratch recipes.
        tok = train_tokenizer(texts, cfg.vocab_size)
        tmp = folder.with_name(key + ".tmp")
        tok.save_pretrained(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    return load_tokenizer(str(folder))


def weight_decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay weight matrices only: decaying biases and norm gains just pulls them towards zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def save_model(model: Any, weights: dict[str, Any], tokenizer: Any, folder: Path) -> None:
    """Model (safetensors) with `weights` (its whole state dict) and tokenizer into `folder`, written beside
    it first so no half-written model is seen."""
    tmp = folder.parent / f".{folder.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
    except BaseException:  # a full disk, a second Ctrl-C: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    folder.mkdir(parents=True, exist_ok=True)
    for f in tmp.iterdir():
        f.replace(folder / f.name)
    tmp.rmdir()


def whole_weights(accelerator: Any, model: Any) -> dict[str, Any]:
    """The prepared model's full state dict; every process must call it (under FSDP the main process gets
    the weights gathered from all, the others {})."""
    weights = accelerator.get_state_dict(model)
    # Gathered weights are copies, tied ones too (GPT-2's output layer is its input embedding); made one
    # tensor again, save_pretrained writes them once, as without FSDP.
    first: dict[int, str] = {}
    for name, p in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        if name in weights:
            weights[name] = weights[first.setdefault(id(p), name)]
    return dict(weights)


def absolute_paths(cfg: Config) -> Config:
    """Local paths made absolute, so the saved config.yaml (and `lmtune eval`) works from any folder."""
    update = {
        key: str(Path(value).expanduser().resolve())
        for key in ("model", "tokenizer", "data", "validation_data")
        if (value := getattr(cfg, key)) and Path(value).expanduser().exists()
    }
    return cfg.model_copy(update=update)


# --- the run -------------------------------------------------------------------------------------------


def finetune(
    cfg: Config,
    *,
    dry_run: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    force: bool = False,
    report: Report = log_report,
) -> dict[str, Any]:
    """Fine-tune (or train from scratch) as `cfg` says. Returns the summary, or the plan with dry_run.

    resume: continue the run in cfg.output from its newest complete checkpoint; force: even if settings
    that decide the model or the data order changed.
    """
    if not cfg.data:
        raise LmtuneError("no training data: pass --data with a file, a folder or a hub dataset name")
    if not cfg.model and not cfg.from_scratch:
        raise LmtuneError("no model: pass a hub id or a folder (lmtune finetune gpt2 ...), or --from-scratch")
    cfg = absolute_paths(cfg)
    runs.check_home()  # caches and the latest run are written there: a bad LMTUNE_HOME fails now, not at the end
    output = Path(cfg.output).expanduser() if cfg.output else runs.default_output(cfg)
    if cfg.push_to_hub and not dry_run:  # before training, not after hours of it
        hub.check_push(cfg.push_to_hub)
    # The run folder is held from here to the end, so a second run on it is refused before it tokenizes
    # (and before it looks at the folder). By the first process only: accelerate's main process is global
    # rank 0, RANK under torchrun.
    holds_folder = not dry_run and os.environ.get("RANK", "0") == "0"
    with runs.Lock(output) if holds_folder else contextlib.nullcontext(), StopSignals() as stop:
        if not dry_run:
            inputs = {"model": cfg.model, "tokenizer": cfg.tokenizer, "data": cfg.data}
            runs.check_output(output, cfg.model, overwrite, resume, {**inputs, "validation data": cfg.validation_data})
        resume_from = find_resume_checkpoint(output, report) if resume else None
        return run(cfg, output, resume_from, stop, dry_run=dry_run, overwrite=overwrite, force=force, report=report)


def run(
    cfg: Config,
    output: Path,
    resume_from: Path | None,
    stop: StopSignals,
    *,
    dry_run: bool,
    overwrite: bool,
    force: bool,
    report: Report,
) -> dict[str, Any]:
    """The run itself, once its inputs are checked and its folder is held: prepare, train, save."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType, gather_object, set_seed
    from transformers import get_scheduler

    precision = resolve_precision(cfg.mixed_precision)
    check_tracker(cfg.report_to)
    accelerator = Accelerator(
        # With no GPU, say so: accelerate then joins processes started by torchrun or MPI over gloo
        # instead of letting each train alone.
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        mixed_precision=precision,
        dynamo_backend="inductor" if cfg.compile else "no",
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=str(output),
        # The data order depends only on the seed and the epoch.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    say: Report = report if main else (lambda e: None)

    # Tokenize on the main process first; the others then read its cache.
    with accelerator.main_process_first():
        tokenizer = load_tokenizer(str(resume_from)) if resume_from else get_tokenizer(cfg, say)
        corpus = data.load_corpus(cfg, tokenizer, say)
    say({"event": "phase", "phase": "loading model"})
    if resume_from and not cfg.lora:
        # The checkpoint's weights, loaded exactly as the base model was (same dtype and dropout).
        model = load_model(cfg.model_copy(update={"model": str(resume_from), "from_scratch": False}), tokenizer)
    else:
        model = load_model(cfg, tokenizer)
    if cfg.lora:  # the base stays frozen; a new adapter trains, or the checkpoint's when resuming
        model = lora.add_adapter(model, cfg, resume_from)
    block = resolve_block_size(cfg.block_size, model)
    cfg = cfg.model_copy(update={"data_format": corpus.format})  # what auto found, saved in config.yaml
    dataset: Blocks | Examples
    if corpus.format == "chat":
        # One conversation per row, padded per batch: packing several would let one attend to another.
        dataset = Examples(corpus.train, block)
        if len(dataset) == 0:
            raise LmtuneError(f"no training conversation has a response within --block-size {block}; pass a larger one")
        dropped, truncated, skipped = dataset.dropped, dataset.truncated, dataset.skipped
    else:
        blocks, dropped = data.pack(corpus.train.ids, block)
        if len(blocks) == 0:
            raise LmtuneError(
                f"the training data has {len(corpus.train.ids)} tokens, fewer than one block of {block}; "
                "pass a smaller --block-size or more data"
            )
        dataset = Blocks(blocks)
        truncated = skipped = 0
    if len(corpus.validation.ids) < 2:
        raise LmtuneError("the validation data is shorter than 2 tokens; pass more --validation-data")

    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, collate_fn=partial(pad_batch, pad_id=tokenizer.pad_token_id)
    )
    # fused: one kernel updates every tensor (CPU and CUDA) instead of a dozen ops per parameter
    optimizer = torch.optim.AdamW(weight_decay_groups(model, cfg.weight_decay), lr=cfg.learning_rate, fused=True)
    # The chunked loss reads the output weights outside the model's forward, which sharded models
    # (FSDP, DeepSpeed) do not allow; they take transformers' loss.
    sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM, DistributedType.XLA)
    chunked = loss.supported(model) and accelerator.distributed_type not in sharded
    # Under FSDP every process holds a shard of the weights and of the optimizer state: saving gathers them.
    fsdp = accelerator.distributed_type == DistributedType.FSDP
    if main and not fsdp and os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        # accelerate 1.15 turns FSDP on only for GPUs and other accelerators, silently
        log.warning("FSDP asked for, but Accelerate does not shard on CPU: each process keeps the whole model")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # Its gradient clipping returns a float and its optimizer state is split in its own format;
        # neither the loop nor the checkpoints handle them, and it runs only on GPUs, untested so far.
        raise LmtuneError("DeepSpeed is not supported; use FSDP (accelerate config: distributed_type FSDP)")
    head = model.get_output_embeddings()
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    steps_per_epoch = math.ceil(len(loader) / cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    epochs = math.ceil(total_steps / steps_per_epoch)
    # Default: 4 evaluations during the run and the final one; ceil so the 5th never lands just before the end.
    eval_every = cfg.eval_every if cfg.eval_every is not None else math.ceil(total_steps / 5)
    tokens_per_step = cfg.batch_size * block * cfg.gradient_accumulation_steps * accelerator.num_processes
    # Scheduled by hand, once per optimizer step: accelerate's prepared scheduler steps once per process.
    scheduler = get_scheduler(
        "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule,
        optimizer,
        num_warmup_steps=round(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    n_parameters, n_trainable = parameter_count(accelerator.unwrap_model(model)), lora.trainable_parameters(model)
    plan = {
        "output": str(output),
        "model": cfg.model or "new GPT-2 shaped model",
        "parameters": n_parameters,
        "trainable_parameters": n_trainable,
        # Gradient + AdamW state (float32), estimated, and what full fine-tuning would need (peaks: bench/).
        "training_state_bytes": n_trainable * lora.STATE_BYTES_PER_PARAMETER,
        "full_training_state_bytes": n_parameters * lora.STATE_BYTES_PER_PARAMETER,
        "mixed_precision": precision,
        "processes": accelerator.num_processes,
        "documents": corpus.train.documents,
        "empty_documents": corpus.empty_documents,
        "train_tokens_available": len(corpus.train.ids),
        "data_format": corpus.format,
        "block_size": block,
        "blocks": len(dataset),  # chat: conversations, one per row
        "tokens_dropped": dropped,  # chat: cut from conversations longer than the block size
        "examples_truncated": truncated,
        "examples_skipped": skipped,  # chat: no response token left within the block
        "validation": corpus.validation_source,
        "validation_documents": corpus.validation.documents,
        "validation_tokens": len(corpus.validation.ids),
        "steps_per_epoch": steps_per_epoch,
        "epochs": epochs,
        "total_steps": total_steps,
        "tokens_per_step": tokens_per_step,
        "data_from_cache": corpus.cached,
    }

    if dry_run:
        plan["estimated_seconds"] = estimate_seconds(model, head, chunked, loader, accelerator, cfg, total_steps)
        return plan
    say({"event": "plan", **plan})

    # The run folder: config first (a recipe to repeat the run), metrics as they come, summary last.
    saved, tensors = checkpoint.load(resume_from) if resume_from else ({}, {})
    if saved:
        changed = checkpoint.differences(saved["config"], cfg.model_dump(exclude={"output"}))
        if saved["processes"] != accelerator.num_processes:
            changed.append(f"processes ({saved['processes']} -> {accelerator.num_processes})")
        if saved.get("fsdp", False) != fsdp:  # the optimizer state is stored differently
            raise LmtuneError(
                f"cannot resume {output}: its checkpoint was written {'with' if saved.get('fsdp') else 'without'} "
                "FSDP; resume with the same accelerate config"
            )
        if changed and not force:
            raise LmtuneError(
                f"cannot resume {output}: these settings differ from the run's and change the model or the data "
                f"order: {', '.join(changed)}; use the run's settings (--recipe {output / 'config.yaml'}) or pass --force"
            )
    if main:
        output.mkdir(parents=True, exist_ok=True)
        if overwrite:
            runs.clear(output)
        (output / "config.yaml").write_text(cfg.to_yaml())
        if saved:  # what was logged after the checkpoint will be logged again
            keep_metrics_until(output / "metrics.jsonl", saved["step"])
    metrics = (output / "metrics.jsonl").open("a") if main else None
    if cfg.report_to != "none":  # the tracker's run: RUN/lmtune/ for tensorboard, project "lmtune" for wandb
        accelerator.init_trackers(
            "lmtune", config=cfg.model_dump(), init_kwargs={"wandb": {"name": output.name, "dir": str(output)}}
        )

    def record(event: dict[str, Any]) -> None:
        if metrics:
            metrics.write(json.dumps(event) + "\n")
            metrics.flush()
        if cfg.report_to != "none":
            numbers = {k: v for k, v in event.items() if k not in ("event", "step") and isinstance(v, int | float)}
            accelerator.log(numbers, step=event["step"])
        say(event)

    def evaluate(step: int, tokens: int) -> Score:
        """Score the validation data (windows split across processes) and record it. Step 0: before training."""
        # FSDP's wrapper gathers the weights in its forward (FSDP 1 only unwraps to a module of shards).
        s = score(
            model if fsdp else accelerator.unwrap_model(model), corpus.validation, block, block, cfg.batch_size,
            rank=accelerator.process_index, world=accelerator.num_processes,
            autocast=accelerator.autocast, reduce=lambda t: accelerator.reduce(t, "sum"), report=say, chunked=chunked,
        )  # fmt: skip
        if step and not math.isfinite(s.loss):  # the weights went bad: stop before they are saved
            raise non_finite(output, f"the evaluation loss became {s.loss} at step {step}", cfg.learning_rate)
        record({"event": "eval", "step": step, "tokens": tokens, "eval_loss": s.loss, "eval_perplexity": s.perplexity})
        return s

    def check_finite(bad_step: torch.Tensor) -> None:
        """Stop, saving nothing, if any process saw a non-finite loss or gradient norm (one sync)."""
        bad = accelerator.gather(bad_step.reshape(1))
        if (bad > 0).any():
            where = f"the loss or the gradient norm became nan or inf at step {int(bad[bad > 0].min())}"
            raise non_finite(output, where, cfg.learning_rate)

    def check_weights(step: int) -> None:
        """Stop before saving weights that hold nan or inf (an update can make them so with a finite loss)."""
        bad = torch.zeros((), device=accelerator.device)
        for p in model.parameters():  # under FSDP each process checks its own shards
            bad += (~torch.isfinite(p.to_local() if hasattr(p, "to_local") else p.detach())).any()
        if accelerator.reduce(bad, "sum").item():
            raise non_finite(output, f"the weights hold nan or inf after step {step}", cfg.learning_rate)

    def save_checkpoint(state: dict[str, Any]) -> Path | None:
        """Every process's RNG and loss sum plus the shared state, written aside and renamed when complete."""
        mine = {"rng": checkpoint.rng_state(), "loss_sum": loss_sum.item(), "loss_tokens": loss_tokens.item()}
        processes = gather_object([mine])
        # Every process takes part: under FSDP the main process gets the gathered weights and optimizer state.
        weights = whole_weights(accelerator, model)
        optimizer_state = checkpoint.optimizer_state(model, optimizer, fsdp)
        accelerator.wait_for_everyone()
        if not main:
            return None
        root = output / "checkpoints"
        tmp = checkpoint.begin(root, state["step"])
        try:
            unwrapped = accelerator.unwrap_model(model)
            checkpoint.write(tmp, unwrapped, weights, tokenizer, optimizer_state, processes, state)
            return checkpoint.commit(tmp, root, state["step"], cfg.keep_checkpoints)
        except BaseException as err:  # a full disk, a second Ctrl-C: nothing partial stays
            error = checkpoint.abandon(tmp, state["step"], err)
            if error:
                raise error from None
            raise

    # From here a signal asks for a checkpoint at the next step boundary instead of stopping at once.
    stop.armed = True
    base = Score(**saved["base"]) if saved else evaluate(0, 0)
    if stop.requested(accelerator):
        raise stop.error(step=saved.get("step", 0), saved_to=resume_from, output=output)
    save_every = cfg.save_every if cfg.save_every is not None else eval_every

    # --- the training loop ------------------------------------------------------------------------
    step, tokens_seen, train_seconds = 0, 0, 0.0
    start_epoch, skip = 0, 0  # where the data starts: an epoch, and micro-batches already done in it
    loss_sum = torch.zeros((), device=accelerator.device)  # token-weighted, summed on device between logs
    loss_tokens = torch.zeros((), dtype=torch.long, device=accelerator.device)  # the label tokens it sums over
    bad_step = torch.zeros((), dtype=torch.long, device=accelerator.device)  # first non-finite step; 0: none
    rng = None  # a resumed run's random states, restored right before its first step
    if saved:
        checkpoint.load_optimizer_state(model, optimizer, tensors["optimizer"], fsdp)
        scheduler.load_state_dict(saved["scheduler"])
        use_learning_rate(scheduler, cfg.learning_rate, say)
        step, tokens_seen, train_seconds = saved["step"], saved["tokens_seen"], saved["train_seconds"]
        start_epoch, skip = saved["epoch"], saved["batch_in_epoch"]
        mine = tensors["processes"][accelerator.process_index]
        loss_sum.fill_(mine["loss_sum"])
        loss_tokens.fill_(mine["loss_tokens"])
        rng = mine["rng"]
        if skip >= len(loader):
            start_epoch, skip = start_epoch + 1, 0
    model.train()
    tick = time.perf_counter()
    for epoch in range(start_epoch, epochs):
        if step >= total_steps:
            break
        loader.set_epoch(epoch)
        # Resuming: the random state goes back where the stopped run had it, which is before a new
        # epoch's data iterator draws its seed from it, and after, mid-epoch.
        if rng is not None and not skip:
            checkpoint.set_rng_state(rng)
            rng = None
        # Resuming mid-epoch: the same order, `skip` batches in; skipped batches are never loaded.
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        batch_in_epoch, skip = skip, 0
        for inputs, labels, real_tokens in batches:  # (B, T) token ids, (B, T) targets or IGNORE
            if rng is not None:
                checkpoint.set_rng_state(rng)
                rng = None
            # forward and backward; accelerate sums micro-batches and syncs on the last one
            with accelerator.accumulate(model):
                batch_loss, n_labels = next_token_loss(model, head, inputs, labels, chunked, accelerator)
                accelerator.backward(batch_loss)
                finite = torch.isfinite(batch_loss.detach())
                if accelerator.sync_gradients and cfg.max_grad_norm:
                    norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    # FSDP2 returns the norm as a DTensor, which cannot be combined with a plain tensor
                    finite &= torch.isfinite(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            bad_step = torch.where((bad_step == 0) & ~finite, step + 1, bad_step)  # on device: no sync
            batch_in_epoch += 1
            loss_sum += batch_loss.detach() * n_labels
            loss_tokens += n_labels
            # Every process gets as many batches (accelerate's even_batches); of packed text, of the
            # same shape, so this is exact; of chat data, padded per batch, it is this process's share.
            tokens_seen += real_tokens * accelerator.num_processes
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            say({"event": "progress", "step": step, "total_steps": total_steps})

            # log: the only host-device sync of a training step, once every log_every steps
            if step % cfg.log_every == 0 or step == total_steps:
                check_finite(bad_step)
                mean = (accelerator.reduce(loss_sum, "sum") / accelerator.reduce(loss_tokens, "sum")).item()
                train_seconds += time.perf_counter() - tick
                tick = time.perf_counter()
                record({
                    "event": "train", "step": step, "epoch": epoch, "tokens": tokens_seen,
                    "loss": mean, "perplexity": math.exp(min(mean, 700)), "lr": scheduler.get_last_lr()[0],
                    "tokens_per_second": tokens_seen / train_seconds, "elapsed": train_seconds,
                })  # fmt: skip
                loss_sum.zero_()
                loss_tokens.zero_()

            # evaluate and checkpoint (not counted as training time); a signal saves one at once
            stopping = stop.requested(accelerator)
            if eval_every and step % eval_every == 0 and step < total_steps:
                train_seconds += time.perf_counter() - tick
                evaluate(step, tokens_seen)
                tick = time.perf_counter()
            if stopping or (save_every and step % save_every == 0 and step < total_steps):
                check_finite(bad_step)
                check_weights(step)
                train_seconds += time.perf_counter() - tick
                saved_to = save_checkpoint({
                    "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "tokens_seen": tokens_seen,
                    "train_seconds": train_seconds, "scheduler": scheduler.state_dict(),
                    "base": asdict(base), "processes": accelerator.num_processes, "fsdp": fsdp,
                    "config": cfg.model_dump(exclude={"output"}),
                })  # fmt: skip
                tick = time.perf_counter()
                if stopping:
                    raise stop.error(step, saved_to or output, output)
            if step >= total_steps:
                break
        if step >= total_steps:
            break
    train_seconds += time.perf_counter() - tick
    check_finite(bad_step)

    # A signal from here on finishes the run: saving it takes as long as the checkpoint a signal asks for.
    final = evaluate(step, tokens_seen)
    check_weights(step)
    weights = whole_weights(accelerator, model)
    accelerator.wait_for_everyone()
    summary = {
        **plan,
        "steps": step,
        "train_tokens": tokens_seen,
        "train_seconds": train_seconds,
        "tokens_per_second": tokens_seen / train_seconds,
        "eval_tokens": final.tokens,
        "eval_loss": final.loss,
        "eval_perplexity": final.perplexity,
        "eval_bits_per_byte": final.bits_per_byte,
        "base_eval_loss": base.loss,
        "base_eval_perplexity": base.perplexity,
        "base_eval_bits_per_byte": base.bits_per_byte,
        "resumed_from": str(resume_from) if resume_from else None,
        **peak_memory(accelerator.device),
    }
    if main:
        assert metrics is not None
        metrics.close()
        try:
            save_model(accelerator.unwrap_model(model), weights, tokenizer, output)
        except Exception as err:  # a full disk: say what was lost, what was kept and how to go on
            raise final_save_failed(output, step, err) from None
        # What a person reads: the training curves and a model card (README.md, the hub's format).
        card.plot_curves(output, base.perplexity)
        (output / card.CARD).write_text(card.model_card(output, cfg, summary))
        # summary.json last: its presence marks a complete run.
        (output / runs.SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        runs.remember(output)
    # Every process tears down its process group together, after the main one has written the run.
    accelerator.wait_for_everyone()
    # The DDP wrapper goes first. Its reducer holds the process group and, as the last holder, would free
    # it with the GIL held; gloo's destructor then waits for its worker threads, one of which may need the
    # GIL to free the last collective's tensors: a hang seen with torch 2.13 (py-spy --native). Freed here,
    # the group's last holder is destroy_process_group's own reference, which releases the GIL to free it.
    (model,) = accelerator.free_memory(model)  # accelerate's idiom: its references and ours, dropped
    gc.collect()
    accelerator.end_training()
    # Last: the run is complete on disk whatever happens to the upload.
    summary["hub_url"] = hub.push(output, cfg.push_to_hub) if main and cfg.push_to_hub else None
    # Told to the user, not kept in summary.json: a signal that came after the last step.
    summary["finished_despite"] = signal.Signals(stop.signal).name if stop.signal else None
    return summary


class StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to checkpoint and stop at the next step boundary.

    Before training is `armed` (tokenizing, loading) there is nothing to save: a signal stops at once. A
    second Ctrl-C stops at once too (KeyboardInterrupt). Outside the main thread signals cannot be caught,
    and the default behaviour stays.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self.armed = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self.armed:
            raise LmtuneError(f"stopped by {name} before training started; nothing was saved", 128 + signum)
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signal is None:  # said at once: a checkpoint or the end of an evaluation may take a while
            log.warning("%s: stopping at the next step with a checkpoint (Ctrl-C again stops at once, unsaved)", name)
        self.signal = signum

    def requested(self, accelerator: Any) -> bool:
        """Whether any process got a signal (all processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signal is not None
        flag = torch.tensor(int(self.signal is not None), device=accelerator.device)
        return bool(accelerator.reduce(flag, "sum").item())

    def error(self, step: int, saved_to: Path | None, output: Path) -> LmtuneError:
        name = signal.Signals(self.signal or signal.SIGTERM).name
        code = 128 + (self.signal or signal.SIGTERM)
        if saved_to is None:  # before the first step of a new run
            return LmtuneError(f"stopped by {name} before the first step; start over with --overwrite", code)
        return LmtuneError(
            f"stopped by {name} after step {step}; checkpoint saved in {saved_to}. Resume with: "
            f"lmtune finetune --recipe {output / 'config.yaml'} --output {output} --resume",
            exit_code=code,
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


def final_save_failed(output: Path, step: int, err: Exception) -> LmtuneError:
    """The error for a run whose last save failed: nothing partial is left (save_model), checkpoints are kept."""
    kept = checkpoint.complete(output / "checkpoints")
    where = (
        f"the last checkpoint, {kept[-1]}, is kept: free space and resume with: lmtune finetune --recipe "
        f"{output / 'config.yaml'} --output {output} --resume"
        if kept
        else "no checkpoint had been saved (--save-every): free space and start over with --overwrite"
    )
    return LmtuneError(
        f"could not save the trained model (step {step}) in {output}: {checkpoint.reason(err)}; nothing partial "
        f"was left; {where}"
    )


def non_finite(output: Path, what: str, lr: float) -> LmtuneError:
    """The error that stops a run whose numbers went non-finite, naming the last checkpoint (all of them were
    checked finite before they were written) and how to go on from it."""
    kept = checkpoint.complete(output / "checkpoints")
    if not kept:
        return LmtuneError(
            f"{what}; stopped, and no checkpoint had been saved. Start over with --overwrite and a lower --lr "
            f"(this run's was {lr:g}), keep --max-grad-norm on, or use --mixed-precision no"
        )
    return LmtuneError(
        f"{what}; stopped before saving. The last checkpoint, {kept[-1]}, is good: resume from it with a lower "
        f"learning rate: lmtune finetune --recipe {output / 'config.yaml'} --output {output} --resume --lr {lr / 10:g}"
    )


def check_tracker(name: str) -> None:
    """Fail before training, not after, when the tracker's package is missing."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    available = {"none": True, "tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    if not available[name]:
        raise LmtuneError(f"--report-to {name} needs the {name} package: pip install 'lmtune[{name}]'")


def peak_memory(device: torch.device) -> dict[str, int]:
    """This process's peak memory: on a GPU what PyTorch allocated there, else the process's peak RSS."""
    if device.type == "cuda":
        return {"peak_gpu_memory_bytes": torch.cuda.max_memory_allocated(device)}
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_bytes": peak if sys.platform == "darwin" else peak * 1024}  # bytes on macOS, KiB on Linux


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
    root = output / "checkpoints"
    ignored = checkpoint.incomplete(root)
    if ignored:
        names = ", ".join(p.name for p in ignored)
        report({"event": "phase", "phase": f"ignoring incomplete checkpoints: {names}"})
    found = checkpoint.complete(root)
    if not found:
        raise LmtuneError(f"{output} has no complete checkpoint to resume from; start over with --overwrite")
    report({"event": "phase", "phase": f"resuming from {found[-1]}"})
    return found[-1]


def next_token_loss(
    model: Any, head: Any, inputs: torch.Tensor, labels: torch.Tensor, chunked: bool, accelerator: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token NLL over the label tokens of a batch (B, T), and how many there are (on device, no sync).

    Position t predicts labels[t + 1]; IGNORE labels (chat prompts, padding) are not counted.
    """
    targets = labels[:, 1:].flatten()
    count = (targets != loss.IGNORE).sum()
    with accelerator.autocast():
        total = loss.next_token_nll(model, head, inputs, targets, chunked)
    return total / count.clamp(min=1), count


def estimate_seconds(
    model: Any, head: Any, chunked: bool, loader: Any, accelerator: Any, cfg: Config, total_steps: int
) -> float:
    """Time a few forward/backward passes (weights untouched: no optimizer step) and scale to the run."""
    inputs, labels, _ = next(iter(loader))
    timings = []
    for _ in range(3):
        start = time.perf_counter()
        accelerator.backward(next_token_loss(model, head, inputs, labels, chunked, accelerator)[0])
        timings.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    # The first pass warms caches and allocators, so it is left out.
    return min(timings[1:]) * cfg.gradient_accumulation_steps * total_steps
