"""`python3 bench/loss.py`: lmtune's chunked loss alone, eager against compiled (--compile) and full logits.

Forward and backward of `lmtune.loss.linear_cross_entropy` (the summed next-token NLL of hidden @ weight.T) on
random hidden states (unit scale, as a final layer norm gives) and head weights (GPT-2's 0.02 initialisation)
of one training step's shape: on a GPU 16 x 1023 rows, 768 wide, a vocabulary of 50,304 (GPT-2 small at
16 x 1024 tokens); on a CPU 2,040 x 256 x 8,192 by default. Under bf16 autocast and in fp32. Variants, measured
in this order (compile_chunks is a switch for the whole process, so eager goes first):
- eager: the chunk functions as written (lmtune's default);
- compiled: after `loss.compile_chunks()`, as `lmtune finetune --compile` runs them;
- inplace (--variants ... inplace): the eager chunk function (in-place updates) compiled as it is, the form
  compile_chunks does not use;
- full: F.cross_entropy over the whole float32 logits, transformers' loss (and the Trainer's).

    python3 bench/loss.py                       # the device's default shape
    python3 bench/loss.py --rows 2040 --width 256 --vocab 8192 --precision bf16

Prints a table and one JSON line last, and writes OUT/loss.json: for each variant and precision the median
milliseconds of --reps calls (forward and backward, synchronised), the first call's seconds (compilation),
on CUDA the peak memory above the inputs (max_memory_allocated), and how far its loss and gradients are from
eager's of the same precision (|a - b| / |b| for the loss; max |a - b| / max |b| for each gradient).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # lmtune from this checkout

console = Console(width=160)
GPU_SHAPE = (16 * 1023, 768, 50304)  # rows (16 rows of 1024 tokens predict 1023 each), width, vocabulary
CPU_SHAPE = (2040, 256, 8192)  # 8 x 255 rows of the 4-layer CPU benchmark model's width, a small vocabulary
VARIANTS = ("eager", "inplace", "compiled", "full")  # the order they run in


def relative(a: Any, b: Any) -> float | None:
    """max |a - b| / max |b|: the error against the reference's scale (an elementwise ratio blows up near 0)."""
    if a is None or b is None:
        return None
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, help="hidden states, one per predicted token (GPU 16368, CPU 2040)")
    p.add_argument("--width", type=int, help="hidden size (GPU 768, CPU 256)")
    p.add_argument("--vocab", type=int, help="vocabulary (GPU 50304, CPU 8192)")
    p.add_argument("--chunk", type=int, help="rows per chunk (default lmtune.loss.CHUNK, 1024)")
    p.add_argument("--reps", type=int, help="timed calls after the first (GPU 20, CPU 10)")
    p.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    p.add_argument("--variants", nargs="+", default=["eager", "compiled", "full"], choices=VARIANTS)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "loss", help="where loss.json goes")
    a = p.parse_args()

    import torch
    import torch.nn.functional as F

    from lmtune import loss

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    default = GPU_SHAPE if cuda else CPU_SHAPE
    rows, width, vocab = (x or d for x, d in zip((a.rows, a.width, a.vocab), default, strict=True))
    reps = a.reps or (20 if cuda else 10)
    if a.chunk:
        loss.CHUNK = a.chunk  # read at each call
    torch.manual_seed(0)
    hidden = torch.randn(rows, width, device=device)
    weight = torch.randn(vocab, width, device=device) * 0.02
    targets = torch.randint(0, vocab, (rows,), device=device)
    targets[::50] = loss.IGNORE  # a few positions not scored, as chat prompts and padding are

    def full_logits(h: Any, w: Any, t: Any) -> Any:
        return F.cross_entropy((h @ w.T).float(), t, ignore_index=loss.IGNORE, reduction="sum")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def call(fn: Any, precision: str) -> tuple[Any, Any, Any]:
        """One forward and backward; the loss and the gradients in hidden and weight."""
        h, w = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        )
        with autocast:
            total = fn(h, w, targets)
        total.backward()
        return total.detach(), h.grad, w.grad

    results: list[dict[str, Any]] = []
    eager: dict[str, tuple[Any, Any, Any]] = {}
    for variant in VARIANTS:
        if variant not in a.variants:
            continue
        loss._compiled.clear()  # eager chunks, unless this variant compiles them
        if variant == "compiled":
            loss.compile_chunks()
        elif variant == "inplace":
            loss._compiled["gradients"] = torch.compile(loss._chunk_gradients)  # as compile_chunks compiles
        fn = full_logits if variant == "full" else loss.linear_cross_entropy
        for precision in a.precision:
            sync()
            start = time.perf_counter()
            got = call(fn, precision)
            sync()
            first = time.perf_counter() - start
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() if cuda else 0
            times = []
            for _ in range(reps):
                sync()
                start = time.perf_counter()
                call(fn, precision)
                sync()
                times.append(time.perf_counter() - start)
            if variant == "eager":
                eager[precision] = got
            ref = eager.get(precision)
            results.append({
                "variant": variant, "precision": precision, "median_ms": statistics.median(times) * 1e3,
                "first_call_seconds": first,
                "peak_bytes_above_inputs": torch.cuda.max_memory_allocated() - base if cuda else None,
                "loss": float(got[0]),
                "loss_relative_difference": float((got[0] - ref[0]).abs() / ref[0].abs()) if ref else None,
                "grad_hidden_relative_difference": relative(got[1], ref[1]) if ref else None,
                "grad_weight_relative_difference": relative(got[2], ref[2]) if ref else None,
            })  # fmt: skip
            console.print(f"[dim]{variant} {precision}: {results[-1]['median_ms']:.1f} ms[/]")
    loss._compiled.clear()

    speed = {r["precision"]: r["median_ms"] for r in results if r["variant"] == "eager"}
    for r in results:
        r["speedup_vs_eager"] = speed[r["precision"]] / r["median_ms"] if r["precision"] in speed else None
    report = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "shape": {"rows": rows, "width": width, "vocab": vocab, "chunk": loss.CHUNK},
        "reps": reps,
        "results": results,
    }
    console.print(table(report))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "loss.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))


def table(report: dict[str, Any]) -> Table:
    s = report["shape"]
    t = Table(
        title=f"loss forward+backward on {report['device']}: {s['rows']:,} rows x {s['width']} wide x "
        f"{s['vocab']:,} vocabulary, chunks of {s['chunk']}; median of {report['reps']}",
        title_justify="left",
    )
    for col in ("variant", "precision", "ms", "vs eager", "first call s", "peak MiB", "loss diff", "grad h", "grad W"):
        t.add_column(col, justify="left" if col in ("variant", "precision") else "right")

    def e(x: float | None) -> str:
        return f"{x:.1e}" if x is not None else "-"

    for r in report["results"]:
        peak = r["peak_bytes_above_inputs"]
        t.add_row(
            r["variant"], r["precision"], f"{r['median_ms']:.1f}",
            f"{r['speedup_vs_eager']:.2f}x" if r["speedup_vs_eager"] else "-", f"{r['first_call_seconds']:.1f}",
            f"{peak / 2**20:,.0f}" if peak is not None else "-", e(r["loss_relative_difference"]),
            e(r["grad_hidden_relative_difference"]), e(r["grad_weight_relative_difference"]),
        )  # fmt: skip
    return t


if __name__ == "__main__":
    main()
