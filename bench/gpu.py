"""`python3 bench/gpu.py`: lmtune's training speed and memory on one CUDA GPU, each speed lever measured alone.

The job: a GPT-2-small-shaped model (12 layers, 12 heads, 768 wide, 1024 context, GPT-2's 50,304-row embedding;
124M parameters, GPT-2 small's count) with random weights: no weights can be downloaded, and random ones cost the
same time and memory. Its tokenizer is a byte-level BPE of 32,768 tokens trained here with lmtune's own
`train_tokenizer` on Tiny Shakespeare and WikiText-2 valid.txt (the embedding rows past it are never an input,
but every one is a logit, as in GPT-2's padded vocabulary). It is fine-tuned for 40 steps of 16 x 1024 tokens on
WikiText-2 valid.txt (cut so every batch is full) and evaluated on the start of test.txt. Each measurement runs
in its own process, one after another, in order of importance, so that a run cut short (--budget) keeps the key
figures: lmtune bf16 (the GPU default), bf16 --compile dropout=0 (recipe gpt2-speed's settings plus --compile), the Trainer
with bf16 (bench/trainer_clm.py), then each lever alone (bf16 dropout=0, bf16 --compile), a profile of a
training step before (bf16) and after (--compile, dropout 0) (bench/profile_step.py), the loss alone
(bench/loss.py, at this job's shape), and last fp32 and LoRA (rank 16, bf16). Prints the tables and writes
bench/out/gpu/results.json after each measurement; the profiles' traces are bench/out/gpu/profile-*/trace.json.gz.

    python3 bench/gpu.py --data ../shared/data     # on a CUDA machine: about 7 minutes on an H100 (estimated)
    python3 bench/gpu.py --data ../shared/data --skip fp32 --skip lora      # the levers only
    python3 bench/gpu.py --tiny --skip lora        # CPU smoke test of the same code path: 2 layers, 64 wide

Figures, for each configuration:
- tokens/s: tokens per step over the median step time, the first WARM steps left out (compilation, kernel
  autotuning, allocator growth). lmtune's step time is its training seconds between two log records (each
  one a host-device sync) over the steps between them; the Trainer's, the time between its step ends.
- run tokens/s: the run's own figure, every step included (for --compile, the compilation too).
- MFU: 6 x parameters x tokens/s over the GPU's dense bf16 peak (PEAK_FLOPS by the device's name, or
  --peak-flops; the fp32 row is held to the same peak), and with attention's FLOPs added (nanoGPT's
  estimate_mfu). LoRA computes no weight gradients for frozen weights, so 6N overstates its work.
- peak allocated: torch.cuda.max_memory_allocated in the training process (summary.json's
  peak_gpu_memory_bytes; the Trainer's from trainer_clm.py). GPU used: the largest memory.used nvidia-smi
  saw while the run went, less what was used before it (so with the CUDA context and the allocator's cache).
- eval loss: the final validation loss from summary.json (under the run's precision); the Trainer's model,
  and lmtune bf16's as a check, scored afterwards by lmtune's own scorer under bf16 autocast. vs eager: a
  compiled run's eval loss against the eager run of the same settings, relative.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # lmtune from this checkout, as the subprocesses get it
PY = sys.executable
# FLOP/s: dense bf16 tensor-core peaks, by a part of torch.cuda.get_device_name(), the first that matches;
# --peak-flops overrides. Another GPU is held to the H100 SXM's, and says so.
PEAK_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM ("NVIDIA H100 80GB HBM3")
    "H200": 989e12,  # the H100 SXM's chip with more and faster memory: the same dense bf16 peak
}
DEFAULT_PEAK_FLOPS = 989e12
LR = 5e-4  # every configuration, the Trainer's too
WEIGHT_DECAY = 0.01  # lmtune's default, given to the Trainer too
WARMUP_RATIO = 0.05  # lmtune's default; the Trainer gets the same number of steps

console = Console(width=160)

# What each figure in results.json means (the module docstring says why).
DEFINITIONS = {
    "tokens_per_second": "tokens per step / median step time of the steps after settings.warm",
    "run_tokens_per_second": "the run's own figure over every step (lmtune: summary.json; Trainer: train_runtime)",
    "mfu": "6 x parameters x tokens_per_second / peak_flops (dense bf16 peak, for the fp32 run too)",
    "vs_trainer": "tokens_per_second / the Trainer's tokens_per_second",
    "mfu_with_attention": "(6 x parameters + 12 x n_layer x n_embd x block) x tokens_per_second / peak_flops",
    "peak_gpu_memory_bytes": "torch.cuda.max_memory_allocated in the training process",
    "gpu_used_bytes": "largest nvidia-smi memory.used during the run less the value before it",
    "eval_loss": "final validation loss, nats per token (Trainer: lmtune's scorer under bf16 autocast)",
    "eval_loss_vs_eager": "a compiled run's eval_loss / the eval_loss of the eager run of the same settings - 1",
    "profiles": "bench/profile_step.py's figures (its own definitions inside each)",
    "loss": "bench/loss.py's figures at this job's shape",
}


@dataclass(frozen=True)
class Job:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int  # asked of the tokenizer trainer
    model_vocab: int | None  # the model's embedding rows; None: the tokenizer's size rounded up to a multiple of 128
    block: int  # tokens per sequence, and the model's context
    batch: int  # sequences per optimizer step
    steps: int  # optimizer steps per run
    log_every: int  # steps between lmtune's log records: each is a timing point and a host-device sync
    warm: int  # first steps left out of the median step time
    eval_batches: int  # validation text: this many full batches of windows (one shape for --compile)
    text_chars: int | None  # characters of each corpus used; None: all of it
    timeout: int  # seconds one configuration may take (--compile: twice this)


# GPT-2 small: its 50,257 tokens padded to 50,304, a multiple of 64, as nanoGPT does for the tensor cores.
FULL = Job(12, 12, 768, 32768, 50304, 1024, 16, 40, 5, 10, 4, None, 150)
TINY = Job(2, 2, 64, 512, None, 64, 4, 4, 1, 1, 2, 60_000, 300)


# --- running one measurement ----------------------------------------------------------------------


class GpuMemory:
    """The GPU's largest memory.used (MiB) while a run goes, from nvidia-smi every 200 ms; None without one."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen[str] | None = None
        self.peak: int | None = None

    def __enter__(self) -> GpuMemory:
        if shutil.which("nvidia-smi"):
            query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            self.proc = subprocess.Popen([*query, "-lms", "200"], stdout=subprocess.PIPE, text=True)
            threading.Thread(target=self.read, daemon=True).start()
        return self

    def read(self) -> None:
        assert self.proc and self.proc.stdout
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.peak = max(self.peak or 0, int(line.strip()))

    def __exit__(self, *exc: object) -> None:
        if self.proc:
            self.proc.terminate()
            self.proc.wait()


def gpu_used_mib() -> int | None:
    if not shutil.which("nvidia-smi"):
        return None
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"], capture_output=True, text=True
    ).stdout
    return int(out.split()[0]) if out.split() else None


class Failed(Exception):
    """A measurement that did not finish: its exit, or its time running out, and the end of what it printed."""


def run(name: str, cmd: list[Any], out: Path, timeout: float) -> tuple[str, dict[str, Any]]:
    """Run one measurement in a fresh process group; its stdout, wall seconds, peak RSS and GPU memory seen."""
    console.print(f"[dim]{name}: {' '.join(map(str, cmd))}[/]")
    out.mkdir(parents=True, exist_ok=True)
    before = gpu_used_mib()
    with open(out / "stdout.txt", "w+") as so, open(out / "stderr.txt", "w+") as se, GpuMemory() as gpu:
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=so, stderr=se, start_new_session=True)
        while True:
            # wait4 gives this child's own resource usage, so each peak belongs to one measurement.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() - start > timeout:
                os.killpg(proc.pid, signal.SIGKILL)  # the inductor's compile workers too
                _, status, usage = os.wait4(proc.pid, 0)
                code = None
                break
            time.sleep(0.1)
        wall = time.perf_counter() - start
        so.seek(0), se.seek(0)
        text, errors = so.read(), se.read()
    if code != 0:
        console.print(errors[-3000:], markup=False)
        why = f"exit {code}" if code is not None else f"killed after {timeout:.0f} s"
        # lmtune's one red line, a traceback's last, or the text inside Typer's usage-error box
        lines = [msg for line in errors.splitlines() if (msg := line.strip("│╭╮╰╯─ \t"))]
        raise Failed(f"{why}: {lines[-1][-400:] if lines else 'nothing on stderr'}")
    figures = {
        "wall_seconds": wall,
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # ru_maxrss is in KiB on Linux
        "gpu_used_bytes": (gpu.peak - before) * 2**20 if gpu.peak is not None and before is not None else None,
    }
    return text, figures


def median_tokens_per_second(tokens_per_step: int, step_seconds: list[float], warm: int) -> float:
    """Tokens per step over the median time of the steps after the first `warm` (all, if that leaves none)."""
    steady = step_seconds[warm:] or step_seconds
    return tokens_per_step / statistics.median(steady)


def lmtune_job(job: Job, out: Path, folder: Path, timeout: float, *extra: Any) -> dict[str, Any]:
    """`lmtune finetune` on the job; figures from the run's summary.json and metrics.jsonl."""
    _, figures = run(
        folder.name,
        [
            PY, "-m", "lmtune", "finetune", out / "base", "--data", out / "train.txt",
            "--validation-data", out / "validation.txt", "--txt-documents", "line", "--block-size", job.block,
            "--batch-size", job.batch, "--max-steps", job.steps, "--lr", LR, "--weight-decay", WEIGHT_DECAY,
            "--warmup-ratio", WARMUP_RATIO, "--eval-every", 0, "--save-every", 0, "--log-every", job.log_every,
            "--output", folder, "--overwrite", *extra,
        ],
        folder.with_name(folder.name + "-logs"),
        timeout,
    )  # fmt: skip
    summary = json.loads((folder / "summary.json").read_text())
    records = [e for e in map(json.loads, (folder / "metrics.jsonl").open()) if e["event"] == "train"]
    # Each step of an interval between two log records gets the interval's mean step time.
    step_seconds: list[float] = []
    for a, b in pairwise([{"step": 0, "elapsed": 0.0}, *records]):
        step_seconds += [(b["elapsed"] - a["elapsed"]) / (b["step"] - a["step"])] * (b["step"] - a["step"])
    return {
        **figures,
        "tokens_per_second": median_tokens_per_second(summary["tokens_per_step"], step_seconds, job.warm),
        "run_tokens_per_second": summary["tokens_per_second"],
        "step_seconds": step_seconds,
        "parameters": summary["parameters"],
        "trainable_parameters": summary.get("trainable_parameters", summary["parameters"]),
        "mixed_precision": summary["mixed_precision"],
        "peak_gpu_memory_bytes": summary.get("peak_gpu_memory_bytes"),  # absent before lmtune reported it
        "blocks": summary["blocks"],
        "train_tokens": summary["train_tokens"],
        "eval_tokens": summary["eval_tokens"],
        "eval_loss": summary["eval_loss"],
        "base_eval_loss": summary["base_eval_loss"],
    }


def trainer_job(job: Job, out: Path, folder: Path, timeout: float, parameters: int) -> dict[str, Any]:
    """The Trainer with bf16 on the same model, file, batch, steps and schedule (bench/trainer_clm.py)."""
    text, figures = run(
        folder.name,
        [
            PY, ROOT / "bench" / "trainer_clm.py", "--model", out / "base", "--train", out / "train.txt",
            "--output", folder, "--block-size", job.block, "--batch-size", job.batch, "--max-steps", job.steps,
            "--lr", LR, "--warmup-steps", round(WARMUP_RATIO * job.steps), "--weight-decay", WEIGHT_DECAY,
            "--schedule", "cosine", "--bf16",
        ],
        folder.with_name(folder.name + "-logs"),
        timeout,
    )  # fmt: skip
    r = json.loads(text.strip().splitlines()[-1])
    return {
        **figures,
        # step_seconds[0] is step 1: its time from its own start, the data loader's first batch included
        "tokens_per_second": median_tokens_per_second(job.batch * job.block, r["step_seconds"], job.warm),
        "run_tokens_per_second": r["tokens_per_second"],
        "step_seconds": r["step_seconds"],
        "parameters": parameters,
        "trainable_parameters": parameters,
        "mixed_precision": "bf16",
        "peak_gpu_memory_bytes": r.get("peak_gpu_memory_bytes"),
        "blocks": r["blocks"],
        "train_tokens": r["train_tokens"],
        "train_loss": r["train_loss"],
    }


def profile_job(job: Job, out: Path, folder: Path, timeout: float, tiny: bool, *extra: Any) -> dict[str, Any]:
    """bench/profile_step.py on the job's model and text (out/base, out/train.txt): a profile of a training step."""
    text, figures = run(
        folder.name,
        [
            PY, ROOT / "bench" / "profile_step.py", "--built", out, "--out", folder, "--batch-size", job.batch,
            "--block-size", job.block, *(["--tiny"] if tiny else []), *extra,
        ],
        folder.with_name(folder.name + "-logs"),
        timeout,
    )  # fmt: skip
    return {**figures, **json.loads(text.strip().splitlines()[-1])}


def loss_job(job: Job, model_vocab: int, folder: Path, timeout: float, tiny: bool) -> dict[str, Any]:
    """bench/loss.py at the job's shape: a step's rows (each row predicts block - 1 tokens), width and vocabulary."""
    shape = ["--rows", job.batch * (job.block - 1), "--width", job.n_embd, "--vocab", model_vocab]
    # Tiny: chunks of 64 rows, so that several full chunks and a ragged last one are compiled, as on a GPU.
    text, figures = run(
        folder.name,
        [PY, ROOT / "bench" / "loss.py", "--out", folder, *shape, *(["--chunk", 64] if tiny else [])],
        folder.with_name(folder.name + "-logs"),
        timeout,
    )
    return {**figures, **json.loads(text.strip().splitlines()[-1])}


# --- the model and the text ----------------------------------------------------------------------


def lines_of(path: Path, job: Job) -> list[str]:
    """The file's lines (ends kept), the first job.text_chars characters' worth in a tiny job."""
    text = path.read_text(encoding="utf-8")
    return (text[: job.text_chars] if job.text_chars else text).splitlines(keepends=True)


def stream_lengths(lines: list[str], tokenizer: Any) -> list[int]:
    """For each k, the tokens lmtune's stream of the first k lines holds (--txt-documents line): each
    non-blank line's tokens and an EOS; blank lines are skipped. Index 0: no lines."""
    from lmtune import data

    kept = [i for i, line in enumerate(lines) if line.strip()]
    ids = data.tokenize([lines[i].rstrip("\r\n") for i in kept], tokenizer, lambda e: None, "lines")
    added = [0] * len(lines)
    for i, x in zip(kept, ids, strict=True):
        added[i] = len(x) + 1
    return [0, *accumulate(added)]


def write_texts(job: Job, data_dir: Path, out: Path, tokenizer: Any) -> dict[str, int]:
    """train.txt: the most lines of WikiText-2 valid.txt whose blocks fill whole batches (no short last batch
    to recompile for); validation.txt: the fewest lines of test.txt that give job.eval_batches full batches
    of evaluation windows. Returns their sizes."""
    from lmtune.evaluate import windows

    lines = lines_of(data_dir / "wikitext-2" / "valid.txt", job)
    n = stream_lengths(lines, tokenizer)
    k = max(k for k in range(len(n)) if n[k] // job.block and (n[k] // job.block) % job.batch == 0)
    (out / "train.txt").write_text("".join(lines[:k]))
    train = {"train_lines": k, "train_tokens": n[k], "train_blocks": n[k] // job.block}

    lines = lines_of(data_dir / "wikitext-2" / "test.txt", job)
    n = stream_lengths(lines, tokenizer)
    want = job.eval_batches * job.batch
    count = [len(windows(x, job.block, job.block)) for x in n]
    k = min(k for k in range(len(n)) if count[k] >= want and count[k] % job.batch == 0)
    (out / "validation.txt").write_text("".join(lines[:k]))
    return {**train, "validation_lines": k, "validation_tokens": n[k], "validation_windows": count[k]}


def build_base(job: Job, data_dir: Path, out: Path) -> dict[str, Any]:
    """The tokenizer (lmtune's train_tokenizer) and a GPT-2 shaped model with random weights, saved in out/base."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config

    from lmtune.model import load_tokenizer, parameter_count, train_tokenizer

    start = time.perf_counter()
    texts = [
        line for f in ("tinyshakespeare/input.txt", "wikitext-2/valid.txt") for line in lines_of(data_dir / f, job)
    ]
    tok = train_tokenizer((t.rstrip("\r\n") for t in texts), job.vocab_size)
    tokenizer_seconds = time.perf_counter() - start
    # Rounded up to a multiple of 128: tensor cores want multiples of 64 (nanoGPT pads GPT-2's 50,257 to 50,304).
    vocab = max(job.model_vocab or 0, -(-len(tok) // 128) * 128)
    config = GPT2Config(
        n_layer=job.n_layer, n_head=job.n_head, n_embd=job.n_embd, n_positions=job.block, vocab_size=vocab,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    sizes = write_texts(job, data_dir, out, load_tokenizer(str(out / "base")))
    return {
        "parameters": parameter_count(model),
        "tokenizer_tokens": len(tok),
        "model_vocab": vocab,
        "tokenizer_seconds": tokenizer_seconds,
        "build_seconds": time.perf_counter() - start,
        **sizes,
    }


def score_models(folders: list[str], job: Job, out: Path) -> None:
    """(`--score`, in its own process) Each model's loss on validation.txt by lmtune's scorer under bf16
    autocast, as lmtune's final evaluation of a bf16 run computes it. Prints one JSON line."""
    import torch

    from lmtune import data
    from lmtune.config import Config
    from lmtune.evaluate import score
    from lmtune.generate import load

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for folder in folders:
        net, tok = load(folder)
        split = data.eval_split(str(out / "validation.txt"), Config(txt_documents="line"), tok, lambda e: None)
        s = score(
            net.to(device), split, job.block, job.block, job.batch,
            autocast=lambda: torch.autocast(device.type, dtype=torch.bfloat16),
        )  # fmt: skip
        results[Path(folder).name] = {"eval_loss": s.loss, "eval_tokens": s.tokens}
    print(json.dumps(results))


# --- the benchmark -------------------------------------------------------------------------------


def versions() -> dict[str, str | None]:
    """Versions of what the runs use; a library that will not import is named before any time is spent."""
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "accelerate", "datasets", "pyarrow", "huggingface_hub", "pydantic", "peft"):
        try:
            found[name] = importlib.import_module(name).__version__
        except Exception as err:  # any failure to import means the same here
            found[name] = None
            console.print(f"[red]cannot import {name}: {type(err).__name__}: {err}[/]")
    return found


def gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    return subprocess.run(query, capture_output=True, text=True).stdout.strip() or None


def peak_flops(device_name: str | None, given: float | None) -> float:
    """The peak MFU is held to: --peak-flops, else PEAK_FLOPS by the device's name, else the H100 SXM's."""
    if given:
        return given
    for part, peak in PEAK_FLOPS.items():
        if device_name and part in device_name:
            return peak
    if device_name:
        console.print(
            f"[yellow]no peak FLOP/s known for {device_name}: MFU is against the H100 SXM's "
            f"{DEFAULT_PEAK_FLOPS / 1e12:.0f} TFLOP/s; pass --peak-flops[/]"
        )
    return DEFAULT_PEAK_FLOPS


def mfu(r: dict[str, Any], job: Job, peak: float) -> None:
    """Model FLOPs utilisation of a finished run, two ways, added to its figures."""
    n = r["parameters"]
    r["mfu"] = 6 * n * r["tokens_per_second"] / peak
    # nanoGPT's estimate_mfu (PaLM, appendix B) adds attention's 12 x layers x width x context per token.
    r["mfu_with_attention"] = (6 * n + 12 * job.n_layer * job.n_embd * job.block) * r["tokens_per_second"] / peak


# The measurements in order of importance, so that a run cut short by --budget keeps the key figures: the GPU
# default, gpt2-speed's settings with --compile, and the Trainer; each lever alone; a step's profile before and after; the loss
# alone; then fp32 and LoRA. Each with the group --skip also takes.
STEPS = {
    "bf16": "bf16",
    "bf16_compile_dropout0": "compile",
    "trainer_bf16": "trainer",
    "bf16_dropout0": "dropout",
    "bf16_compile": "compile",
    "profile_eager": "profile",
    "profile_compile_dropout0": "profile",
    "loss": "loss",
    "fp32": "fp32",
    "lora": "lora",
}
EAGER_OF = {"bf16_compile": "bf16", "bf16_compile_dropout0": "bf16_dropout0"}  # the same settings, not compiled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = os.environ.get("LMTUNE_SHARED_DATA", ROOT.parent / "shared" / "data")
    p.add_argument("--data", type=Path, default=Path(shared), help="folder with wikitext-2/ and tinyshakespeare/")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 layers, 64 wide, block 64, 4 steps")
    p.add_argument(
        "--skip", action="append", default=[], choices=sorted({*STEPS, *STEPS.values()}),
        help="leave a measurement out, by its name or its group (repeatable)",
    )  # fmt: skip
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 40; tiny 4)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 16; tiny 4)")
    p.add_argument("--peak-flops", type=float, help="the GPU's dense bf16 peak FLOP/s for MFU (default: by its name)")
    p.add_argument("--budget", type=float, default=450, help="seconds: measurements that would start later are skipped")
    p.add_argument("--score", nargs="+", metavar="MODEL", help=argparse.SUPPRESS)  # internal: score_models
    a = p.parse_args()

    job = TINY if a.tiny else FULL
    overrides = {"steps": a.steps, "batch": a.batch_size}
    job = Job(**{**asdict(job), **{k: v for k, v in overrides.items() if v}})
    out = ROOT / "bench" / "out" / ("gpu-tiny" if a.tiny else "gpu")
    if a.score:
        score_models(a.score, job, out)
        return

    started = time.perf_counter()
    # Every run's caches inside out/; offline; lmtune importable from this checkout in every process.
    os.environ.update({
        "LMTUNE_HOME": str(out / "home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(out / "datasets-cache"), "MPLBACKEND": "Agg",
        "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
    })  # fmt: skip
    import torch

    if not a.tiny and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; for a CPU smoke test of the same code path pass --tiny")
    if not (a.data / "wikitext-2" / "valid.txt").is_file():
        raise SystemExit(f"no wikitext-2/valid.txt under {a.data}; pass --data with the shared data folder")
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    peak = peak_flops(device_name, a.peak_flops)
    results: dict[str, Any] = {
        "settings": asdict(job), "device_name": device_name, "gpu": gpu_name(), "peak_flops": peak,
    }  # fmt: skip
    results["definitions"] = DEFINITIONS
    results["versions"] = versions()
    if not (results["versions"]["datasets"] and results["versions"]["pydantic"]):
        raise SystemExit("lmtune needs datasets and pydantic; install them first (see the device command)")
    console.print(f"GPU: {results['gpu']}; peak {peak / 1e12:.0f} TFLOP/s; versions: {results['versions']}")

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    def save() -> None:
        compare(results)
        results["total_seconds"] = time.perf_counter() - started
        (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    results["base"] = build_base(job, a.data, out)
    save()
    console.print(f"base model and text: {results['base']}")

    # Each measurement: where its figures go, how many times job.timeout it may take, and how it runs.
    bf16 = ("--mixed-precision", "bf16")
    n, vocab = results["base"]["parameters"], results["base"]["model_vocab"]
    measures: dict[str, tuple[str, int, Any]] = {
        "bf16": ("runs", 1, lambda f, t: lmtune_job(job, out, f, t, *bf16)),
        "bf16_compile_dropout0": ("runs", 2, lambda f, t: lmtune_job(job, out, f, t, *bf16, "--compile", "dropout=0")),
        "trainer_bf16": ("runs", 1, lambda f, t: trainer_job(job, out, f, t, n)),
        "bf16_dropout0": ("runs", 1, lambda f, t: lmtune_job(job, out, f, t, *bf16, "dropout=0")),
        "bf16_compile": ("runs", 2, lambda f, t: lmtune_job(job, out, f, t, *bf16, "--compile")),
        "profile_eager": ("profiles", 1, lambda f, t: profile_job(job, out, f, t, a.tiny)),
        "profile_compile_dropout0": (
            "profiles", 2, lambda f, t: profile_job(job, out, f, t, a.tiny, "--compile", "--dropout", 0),
        ),
        "loss": ("loss", 2, lambda f, t: loss_job(job, vocab, f, t, a.tiny)),
        "fp32": ("runs", 1, lambda f, t: lmtune_job(job, out, f, t, "--mixed-precision", "no")),
        "lora": ("runs", 1, lambda f, t: lmtune_job(job, out, f, t, *bf16, "--lora", "--lora-rank", 16)),
    }  # fmt: skip
    results.update({"runs": {}, "profiles": {}, "loss": None})
    for name, group in STEPS.items():
        if name in a.skip or group in a.skip:
            continue
        section, factor, measure = measures[name]
        left = a.budget - (time.perf_counter() - started)
        timeout = min(job.timeout * factor, left)
        if timeout < 30:
            r = {"status": f"skipped: {left:.0f} s of the --budget left"}
        else:
            try:
                r = {"status": "ok", **measure(out / name.replace("_", "-"), timeout)}
                if "tokens_per_second" in r:
                    mfu(r, job, peak)
            except Exception as err:  # one measurement's failure must not cost the others their figures
                r = {"status": f"failed: {err}" if isinstance(err, Failed) else f"failed: {type(err).__name__}: {err}"}
        if section == "loss":
            results["loss"] = r
        else:
            results[section][name] = r
        save()
        if name == "trainer_bf16" and r["status"] == "ok":
            score_trainer(results, job, out, a, a.budget - (time.perf_counter() - started))
            save()

    console.print(table(results, job))
    if results["profiles"]:
        console.print(profile_table(results["profiles"]))
    if results["loss"] and results["loss"]["status"] == "ok":
        console.print(loss_table(results["loss"]))
    for section in ("runs", "profiles"):
        for name, x in results[section].items():
            if x["status"] != "ok":
                console.print(f"{name}: {x['status']}", markup=False)
    if results["loss"] and results["loss"]["status"] != "ok":
        console.print(f"loss: {results['loss']['status']}", markup=False)
    console.print(f"figures: {out / 'results.json'}; {results['total_seconds']:.0f} s in all")


def compare(results: dict[str, Any]) -> None:
    """Each run's speed against the Trainer's, and each compiled run's eval loss against its eager twin's."""
    runs = results.get("runs", {})
    trainer = runs.get("trainer_bf16", {}).get("tokens_per_second")
    for name, r in runs.items():
        if r["status"] != "ok":
            continue
        r["vs_trainer"] = r["tokens_per_second"] / trainer if trainer else None
        eager = runs.get(EAGER_OF.get(name, ""), {})
        if "eval_loss" in eager and "eval_loss" in r:
            r["eval_loss_vs_eager"] = r["eval_loss"] / eager["eval_loss"] - 1


def score_trainer(results: dict[str, Any], job: Job, out: Path, a: argparse.Namespace, left: float) -> None:
    """The Trainer's final model (and lmtune bf16's, as a check on the scorer) scored by lmtune's scorer.
    `left`: seconds of the budget left."""
    folders = [out / name for name in ("trainer-bf16", "bf16") if (out / name / "config.json").is_file()]
    cmd = [PY, Path(__file__).resolve(), "--score", *folders, *(["--tiny"] if a.tiny else [])]
    cmd += [f"--{k}={v}" for k, v in (("steps", a.steps), ("batch-size", a.batch_size)) if v]
    try:
        text, _ = run("score", cmd, out / "score-logs", min(job.timeout, max(left, 30.0)))
        results["scored"] = json.loads(text.strip().splitlines()[-1])
    except Exception as err:  # the speed figures stand without it
        results["scored"] = f"failed: {err}"
        return
    results["runs"]["trainer_bf16"]["eval_loss"] = results["scored"]["trainer-bf16"]["eval_loss"]


def gib(x: float | None) -> str:
    return f"{x / 2**30:.1f}" if x is not None else "-"


def table(r: dict[str, Any], job: Job) -> Table:
    """One table: each configuration's speed, utilisation, memory and loss, with the Trainer as the yardstick."""
    b = r["base"]
    t = Table(
        title=f"lmtune on {r['device_name'] or 'CPU'}: {b['parameters']:,} parameters, {job.steps} steps of "
        f"{job.batch} x {job.block} tokens; MFU against {r['peak_flops'] / 1e12:.0f} TFLOP/s",
        title_justify="left",
    )
    columns = ("configuration", "tokens/s", "run tokens/s", "vs Trainer", "MFU", "MFU+attn", "peak GiB", "used GiB")
    for col in (*columns, "eval loss", "vs eager", "wall s"):
        t.add_column(col, justify="left" if col == "configuration" else "right")
    for name, x in r.get("runs", {}).items():
        if x["status"] != "ok":
            t.add_row(name, x["status"].split(":")[0], *[""] * 9)
            continue
        t.add_row(
            name,
            f"{x['tokens_per_second']:,.0f}",
            f"{x['run_tokens_per_second']:,.0f}",
            f"{x['vs_trainer']:.2f}x" if x.get("vs_trainer") else "-",
            f"{x['mfu'] * 100:.1f}%",
            f"{x['mfu_with_attention'] * 100:.1f}%",
            gib(x["peak_gpu_memory_bytes"]),
            gib(x["gpu_used_bytes"]),
            f"{x['eval_loss']:.4f}" if "eval_loss" in x else "-",
            f"{x['eval_loss_vs_eager'] * 100:+.2f}%" if "eval_loss_vs_eager" in x else "-",
            f"{x['wall_seconds']:.0f}",
        )
    return t


def profile_table(profiles: dict[str, Any]) -> Table:
    """The profiles side by side: a step's time, its phases, its syncs, and its top kernels (or CPU ops)."""
    ok = {name: x for name, x in profiles.items() if x["status"] == "ok"}
    t = Table(title="a training step, profiled (bench/profile_step.py; ms per step)", title_justify="left")
    t.add_column("")
    for name in ok:
        t.add_column(name, justify="right")

    def row(label: str, fmt: Any) -> None:
        t.add_row(label, *[fmt(x) for x in ok.values()])

    row("step (wall, timed)", lambda x: f"{x['step_seconds'] * 1e3:.1f}")
    row("tokens/s", lambda x: f"{x['tokens_per_second']:,.0f}")
    row("MFU+attn", lambda x: f"{x['mfu_with_attention'] * 100:.1f}%")
    row("step (host, profiled)", lambda x: f"{x['profiled_step_seconds'] * 1e3:.1f}")
    row("kernels", lambda x: f"{x['device_seconds'] * 1e3:.1f}" if x["device_seconds"] is not None else "-")
    phases = dict.fromkeys(p for x in ok.values() for p in x["phases"])
    for p in phases:
        row(f"  {p}", lambda x, p=p: f"{x['phases'].get(p, 0) * 1e3:.2f}")
    row("loss share", lambda x: f"{x['loss_share'] * 100:.1f}%")
    row("host-device syncs/step", lambda x: f"{x['host_device_syncs_per_step']:g}")
    row("peak GiB", lambda x: gib(x["peak_gpu_memory_bytes"]))
    for i in range(8):
        row(f"top {i + 1}", lambda x, i=i: top(x, i))
    return t


def top(x: dict[str, Any], i: int) -> str:
    """The i-th kernel (CUDA) or CPU op by time: its name cut short, ms per step and share."""
    rows = x["top_kernels"] or x["top_ops"]
    if i >= len(rows):
        return ""
    k = rows[i]
    return f"{k['name'][:48]} {k['seconds'] * 1e3:.2f} ({k['share'] * 100:.0f}%)"


def loss_table(r: dict[str, Any]) -> Table:
    """bench/loss.py's figures: each variant and precision against eager."""
    s = r["shape"]
    t = Table(
        title=f"the loss alone, forward+backward (bench/loss.py): {s['rows']:,} rows x {s['width']} x {s['vocab']:,}",
        title_justify="left",
    )
    for col in ("variant", "precision", "ms", "vs eager", "first call s", "peak GiB", "loss diff", "grad diff"):
        t.add_column(col, justify="left" if col in ("variant", "precision") else "right")
    for x in r["results"]:
        diffs = [
            x[k] for k in ("grad_hidden_relative_difference", "grad_weight_relative_difference") if x[k] is not None
        ]
        t.add_row(
            x["variant"], x["precision"], f"{x['median_ms']:.1f}",
            f"{x['speedup_vs_eager']:.2f}x" if x["speedup_vs_eager"] else "-", f"{x['first_call_seconds']:.1f}",
            gib(x["peak_bytes_above_inputs"]),
            f"{x['loss_relative_difference']:.1e}" if x["loss_relative_difference"] is not None else "-",
            f"{max(diffs):.1e}" if diffs else "-",
        )  # fmt: skip
    return t


if __name__ == "__main__":
    main()
