"""The ceiling: a bare PyTorch forward/backward/step loop on the same model and batch shape, data in memory.

No data loader, no accelerate, no logging: random blocks of a token stream already in memory, the
model's own loss (transformers' `labels=`), fused AdamW, gradient clipping. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True, help="a .txt file")
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3, help="untimed first steps (allocator, caches)")
    a = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    ids = torch.tensor(tokenizer(Path(a.train).read_text())["input_ids"])
    n_blocks = len(ids) // a.block_size
    blocks = ids[: n_blocks * a.block_size].view(n_blocks, a.block_size)  # (N, T), in memory
    model = AutoModelForCausalLM.from_pretrained(a.model)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step() -> None:
        batch = blocks[torch.randint(0, n_blocks, (a.batch_size,))]  # (B, T)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    seconds = time.perf_counter() - start
    tokens = a.steps * a.batch_size * a.block_size
    print(json.dumps({"train_seconds": seconds, "train_tokens": tokens, "tokens_per_second": tokens / seconds}))


if __name__ == "__main__":
    main()
