"""The benchmark plots of docs/benchmarks.md: `make docs-plots` draws docs/img/bench-*.png.

The figures are the ones the page's tables give (each measured by the command named there); a test
(tests/test_docs.py) checks that every figure below appears on the page, so the plots cannot drift from it.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

IMG = Path(__file__).resolve().parent / "img"

# name -> (title, unit, {bar: figure as the page writes it}); bars of other tools (OTHERS) are drawn grey.
OTHERS = ("Trainer", "datasets.map", "one conversation")
PLOTS = {
    "bench-cpu": (
        "make bench, 2 CPU cores (AVX-512 BF16), after 55f9f1f",
        "tokens/s (median step)",
        {
            "Trainer (fp32)": "3,325",
            "Trainer --bf16": "5,200",
            "lmtune fp32": "3,812",
            "lmtune (bf16)": "6,679",
            "lmtune --dropout 0": "9,355",
        },
    ),
    "bench-gpu": (
        "bench/gpu.py on one H100, 111M model (an earlier version)",
        "tokens/s (median step)",
        {
            "Trainer --bf16": "141,380",
            "lmtune bf16": "246,801",
            "lmtune fp32": "55,217",
            "lmtune --compile": "247,563",
            "lmtune LoRA": "179,437",
        },
    ),
    "bench-data": (
        "make bench-data: preparing 1 GB of text",
        "seconds",
        {"datasets.map + group_texts": "291.0", "lmtune prepare": "179.0"},
    ),
    "bench-data-memory": (
        "make bench-data: peak RSS preparing 1 GB of text",
        "MB",
        {"datasets.map + group_texts": "2,233", "lmtune prepare": "395"},
    ),
    "bench-memory": (
        "make bench-memory: GPT-2-small shape, batch 4 x 256, CPU",
        "peak RSS, MB",
        {
            "full fine-tune": "3,813",
            "+ checkpointing": "2,764",
            "adamw-8bit": "3,072",
            "LoRA": "2,930",
            "QLoRA": "2,975",
        },
    ),
    "bench-packing": (
        "make bench-packing: chat data, 2 CPU cores",
        "real tokens/s",
        {"one conversation per row": "690", "packed": "3,418"},
    ),
}


def number(figure: str) -> float:
    return float(figure.replace(",", ""))


def main() -> None:
    IMG.mkdir(exist_ok=True)
    for name, (title, unit, bars) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.55 * len(bars)))
        labels, values = list(bars), [number(v) for v in bars.values()]
        colors = ["#9e9e9e" if label.startswith(OTHERS) else "#1f77b4" for label in labels]
        ax.barh(labels[::-1], values[::-1], color=colors[::-1])
        for y, (v, text) in enumerate(zip(values[::-1], list(bars.values())[::-1], strict=True)):
            ax.text(v, y, f" {text}", va="center", fontsize=9)
        ax.set_xlim(0, max(values) * 1.18)
        ax.set_xlabel(unit)
        ax.set_title(title, fontsize=10)
        ax.spines[["top", "right"]].set_visible(False)
        fig.tight_layout()
        fig.savefig(IMG / f"{name}.png", dpi=100)
        plt.close(fig)
        print(f"wrote {IMG / name}.png")


if __name__ == "__main__":
    main()
