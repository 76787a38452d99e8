"""The Hugging Face Trainer on the benchmark job, done the way transformers' examples/run_clm.py does it.

Text files loaded with `datasets.load_dataset("text")` (one example per line), tokenized with
`datasets.map(batched=True)`, concatenated and cut into blocks (`group_texts`), labels = input ids,
`default_data_collator`, `Trainer.train()`. One deviation, so both tools train on the same token stream:
each non-empty line ends with the EOS token, as lmtune joins documents with it (run_clm joins lines with
nothing). Everything not given on the command line is the Trainer's default (fused AdamW, fp32 unless
--bf16, on a CPU or a GPU). Prints one JSON line of figures (and the peak GPU memory allocated, on a GPU).
"""

from __future__ import annotations

import argparse
import json
import time
from itertools import chain, pairwise


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True, help="a .txt file")
    p.add_argument("--output", required=True)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--schedule", default="cosine")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--seed", type=int, default=42)
    a = p.parse_args()

    import torch
    from datasets import load_dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
        set_seed,
    )

    class StepTimes(TrainerCallback):
        """Measurement only: when each optimizer step ended, for the median step time."""

        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if not self.ends:
                self.ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.ends.append(time.perf_counter())

    set_seed(a.seed)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    raw = load_dataset("text", data_files={"train": a.train})
    eos = tokenizer.eos_token

    def tokenize_function(examples):
        return tokenizer([t + eos if t.strip() else "" for t in examples["text"]], add_special_tokens=False)

    tokenized = raw.map(tokenize_function, batched=True, remove_columns=["text"])

    def group_texts(examples):
        concatenated = {k: list(chain(*examples[k])) for k in examples}
        total = (len(concatenated["input_ids"]) // a.block_size) * a.block_size
        result = {k: [t[i : i + a.block_size] for i in range(0, total, a.block_size)] for k, t in concatenated.items()}
        result["labels"] = result["input_ids"].copy()
        return result

    # run_clm groups in map batches of 1000 examples, dropping each batch's remainder.
    lm = tokenized.map(group_texts, batched=True)
    prepare_seconds = time.perf_counter() - start

    model = AutoModelForCausalLM.from_pretrained(a.model)
    args = TrainingArguments(
        output_dir=a.output,
        per_device_train_batch_size=a.batch_size,
        max_steps=a.max_steps,
        learning_rate=a.lr,
        lr_scheduler_type=a.schedule,
        warmup_steps=a.warmup_steps,
        weight_decay=a.weight_decay,
        bf16=a.bf16,
        use_cpu=not torch.cuda.is_available(),  # said outright, else --bf16 without a GPU is refused
        seed=a.seed,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=lm["train"],
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[times := StepTimes()],
    )
    metrics = trainer.train().metrics
    trainer.save_model(a.output)
    tokens = a.max_steps * a.batch_size * a.block_size
    figures = {
        "blocks": len(lm["train"]),
        "prepare_seconds": prepare_seconds,
        "train_seconds": metrics["train_runtime"],
        "train_tokens": tokens,
        "tokens_per_second": tokens / metrics["train_runtime"],
        "train_loss": metrics["train_loss"],
        "step_seconds": [b - a for a, b in pairwise(times.ends)],
    }
    if torch.cuda.is_available():  # what PyTorch allocated at most, as lmtune's summary.json reports it
        figures["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated()
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
