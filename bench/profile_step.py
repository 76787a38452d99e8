"""`python3 bench/profile_step.py`: where one training step of lmtune spends its time, from torch.profiler.

The job is bench/gpu.py's (GPT-2-small-shaped model with random weights, 16 x 1024 tokens per step; --tiny: 2
layers, 64 wide, for a CPU smoke test), and the code is lmtune's own: Config, setup.prepare, then train.train,
the loop `lmtune finetune` runs, driven one step at a time through its progress events. After --warm steps
(compilation, autotuning, allocator growth) it times --timed steps without the profiler, synchronising only at
both ends, then profiles --steps steps after one warm-up step of the profiler's own. A script run as
`python3 bench/X.py` has bench/ first on its import path, so this one is not named profile.py: that name would
hide the standard library's `profile`, which torch._dynamo imports (through cProfile).

    python3 bench/profile_step.py --data ../shared/data                      # eager bf16, on a CUDA GPU
    python3 bench/profile_step.py --data ../shared/data --compile --dropout 0   # gpt2-speed's settings
    python3 bench/profile_step.py --tiny                                      # CPU smoke test

Prints and writes OUT/profile.json (one line of it last on stdout) and OUT/trace.json.gz (open it in
https://ui.perfetto.dev or chrome://tracing):
- step_seconds: mean wall time of the timed steps (CUDA synchronised before and after them), and tokens/s.
- top_kernels (CUDA): the GPU kernels by their time per step; top_ops: the operators by self device time per
  step (the kernels they launched themselves) on CUDA, by self CPU time on CPU.
- phases: each step's device time (CUDA: kernel time, by the phase whose code launched the kernel) or CPU time
  (CPU) split into data, forward (the model's forward, up to its last hidden states), loss
  (lmtune.loss.linear_cross_entropy: the chunked loss makes its gradients in the forward pass, and its
  backward node only scales them), backward (the rest of the backward), clip, optimizer and other;
  loss_share = loss / the step's total.
- host_device_syncs_per_step: the times per step the host waited for the device (CUDA: the runtime's
  synchronize calls and synchronous copies); on CPU, the tensor-to-Python conversions made from Python code
  (.item(), bool(tensor), `x in tensor`, ...), each of which is a sync on a GPU. lmtune's loop makes none
  outside its --log-every points, which the profiled steps leave out; transformers' model code may.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections import Counter, defaultdict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import gpu  # bench/gpu.py: the job, the model and the text (it puts this checkout's lmtune on the path)
from rich.table import Table

console = gpu.console
ROOT = gpu.ROOT

# Profiler ranges that mark a phase of the step: the names lmtune's calls get below (record_function), and
# those torch gives its own; a name ending in '#' is a prefix. Time goes to the innermost range around it.
PHASES = {
    "enumerate(DataLoader)#": "data",
    "lmtune.forward": "forward",
    "lmtune.loss": "loss",
    "autograd::engine::evaluate_function: _LinearCrossEntropyBackward": "loss",
    "lmtune.backward": "backward",
    "lmtune.clip": "clip",
    "Optimizer.step#": "optimizer",
    "Optimizer.zero_grad#": "optimizer",
}
# CUDA runtime calls that make the host wait for the device (cudaMemcpy: the synchronous copy).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
# Operators that turn a tensor into a Python value (aten::item calls aten::_local_scalar_dense, bool() is_nonzero).
CONVERSIONS = ("aten::item", "aten::is_nonzero", "aten::_local_scalar_dense")
TOP = 15  # rows of the top kernels and top operators

DEFINITIONS = {
    "step_seconds": "mean wall time of the timed steps (no profiler; CUDA synchronised before and after them)",
    "tokens_per_second": "tokens per step / step_seconds",
    "profiled_step_seconds": "mean wall time of a profiled step on the host (ProfilerStep#), profiler overhead included",
    "device_seconds": "CUDA: kernel, copy and memset time per profiled step (busy time, gaps not counted)",
    "phases": "seconds per profiled step by phase: CUDA kernel time by the code that launched it; CPU self time",
    "loss_share": "phases.loss / the sum of the phases (device time on CUDA, CPU time on CPU)",
    "host_device_syncs_per_step": "CUDA: synchronize calls and synchronous copies per step; CPU: tensor_to_python",
    "sync_events_per_step": "each kind per step; tensor_to_python: .item(), bool(tensor), ... called from Python",
    "top_kernels": "CUDA kernels by device time per profiled step; share of device_seconds",
    "top_ops": "operators by self device time (CUDA) or self CPU time (CPU) per profiled step; share of the total",
    "host_phases": "CUDA: the phases by the host's CPU self time (all threads; the host queues work ahead of the GPU)",
    "top_host_ops": "CUDA: operators by self CPU time per profiled step (launch and Python overhead)",
}


def labelled(label: str, fn: Any) -> Any:
    """`fn` inside a profiler range named `label`."""
    import torch

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)

    return wrapper


def phase_of(name: str) -> str | None:
    for key, phase in PHASES.items():
        if name == key or (key.endswith("#") and name.startswith(key)):
            return phase
    return None


def analyse(events: Any, cuda: bool) -> dict[str, Any]:
    """Per-step figures of one profiled window of whole steps (the events of torch.profiler's last cycle)."""
    from torch.autograd import DeviceType

    cpu = [e for e in events if e.device_type == DeviceType.CPU and not e.is_async]
    steps = [e for e in cpu if e.name.startswith("ProfilerStep")]
    n = len(steps)
    if not n:
        raise SystemExit("the profiler recorded no step (ProfilerStep#): nothing to report")
    ranges = [(e.time_range.start, e.time_range.end, p) for e in cpu if (p := phase_of(e.name))]

    def innermost(t: float) -> str:
        inside = [(end - start, p) for start, end, p in ranges if start <= t <= end]
        return min(inside)[1] if inside else "other"

    # What a CPU event costs (microseconds): the kernels it launched itself, or its self time on the host.
    def kernel_time(e: Any) -> float:
        return float(sum(k.duration for k in e.kernels))

    def host_time(e: Any) -> float:
        return float(e.self_cpu_time_total)

    def split(cost: Any) -> dict[str, float]:
        """Each event's cost to the phase it is, or else the innermost phase around its start."""
        phases: dict[str, float] = defaultdict(float)
        for e in cpu:
            if c := cost(e):
                phases[phase_of(e.name) or innermost(e.time_range.start)] += c
        return phases

    def top(cost: Any, total: float) -> list[dict[str, Any]]:
        ops: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for e in cpu:
            if not e.name.startswith("ProfilerStep") and (c := cost(e)):
                ops[e.name][0] += c
                ops[e.name][1] += 1
        ranked = sorted(ops.items(), key=lambda kv: -kv[1][0])[:TOP]
        return [{"name": k, "seconds": us / 1e6 / n, "share": us / total, "calls": c / n} for k, (us, c) in ranked]

    def per_step(phases: dict[str, float]) -> dict[str, float]:
        return {p: us / 1e6 / n for p, us in sorted(phases.items(), key=lambda kv: -kv[1])}

    # Kernels, copies and memsets; not the ranges the profiler mirrors on the GPU's timeline.
    device = [
        e
        for e in events
        if e.device_type != DeviceType.CPU and not e.is_user_annotation and e.activity_type != "gpu_user_annotation"
    ]
    device_total = sum(e.time_range.elapsed_us() for e in device)
    phases = split(kernel_time if cuda else host_time)
    if cuda and device_total > sum(phases.values()):  # kernels not linked to a CPU event
        phases["unattributed"] = device_total - sum(phases.values())
    total = sum(phases.values()) or 1.0
    host = split(host_time) if cuda else phases

    names = Counter(e.name for e in events)
    syncs = {name: names[name] / n for name in SYNC_CALLS}
    syncs["Memcpy DtoH"] = sum(c for name, c in names.items() if name.startswith("Memcpy DtoH")) / n
    # Conversions asked for by Python code (.item(), bool(tensor), `x in tensor`, ...): not inside another
    # operator, as the C++ ones are (CPU's fused AdamW reads its step count so, which is no sync on a GPU).
    syncs["tensor_to_python"] = (
        sum(e.name in CONVERSIONS and not (e.cpu_parent and e.cpu_parent.name.startswith("aten::")) for e in cpu) / n
    )

    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in device:
        kernels[e.name][0] += e.time_range.elapsed_us()
        kernels[e.name][1] += 1
    ranked = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:TOP]
    return {
        "profiled_steps": n,
        "profiled_step_seconds": sum(e.time_range.elapsed_us() for e in steps) / 1e6 / n,
        "device_seconds": device_total / 1e6 / n if cuda else None,
        "phases": per_step(phases),
        "loss_seconds": phases["loss"] / 1e6 / n,
        "loss_share": phases["loss"] / total,
        "host_phases": per_step(host) if cuda else None,
        "host_device_syncs_per_step": sum(syncs[s] for s in SYNC_CALLS) if cuda else syncs["tensor_to_python"],
        "sync_events_per_step": syncs,
        "top_kernels": [
            {"name": k, "seconds": us / 1e6 / n, "share": us / (device_total or 1.0), "calls": c / n}
            for k, (us, c) in ranked
        ],
        "top_ops": top(kernel_time if cuda else host_time, total),
        "top_host_ops": top(host_time, sum(host.values()) or 1.0) if cuda else None,
    }


class Stepper:
    """lmtune's report: at each step's end (its progress event) times the timed steps and steps the profiler."""

    def __init__(self, warm: int, timed: int, cuda: bool):
        self.warm, self.timed, self.cuda = warm, timed, cuda
        self.prof: Any = None
        self.marks: dict[str, float] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] != "progress":
            return
        step = event["step"]
        if step in (self.warm, self.warm + self.timed):
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.marks["start" if step == self.warm else "end"] = time.perf_counter()
        if self.prof is not None:
            self.prof.step()


def profile(a: argparse.Namespace, job: gpu.Job, built: Path, out: Path) -> dict[str, Any]:
    import torch

    from lmtune import loss, train
    from lmtune.config import Config
    from lmtune.setup import check_inputs, prepare
    from lmtune.stop import StopSignals

    cuda = torch.cuda.is_available()
    total_steps = a.warm + a.timed + 1 + a.steps  # the profiler's own warm-up step between timed and profiled
    cfg = Config(
        model=str(built / "base"), data=str(built / "train.txt"), validation_data=str(built / "validation.txt"),
        txt_documents="line", block_size=job.block, batch_size=job.batch, max_steps=total_steps, lr=gpu.LR,
        weight_decay=gpu.WEIGHT_DECAY, warmup_ratio=gpu.WARMUP_RATIO, eval_every=0, save_every=0,
        # The one log point (a host-device sync) is the last step's, after the profiled window has closed.
        log_every=total_steps, mixed_precision=a.mixed_precision, compile=a.compile, dropout=a.dropout,
        output=str(out / "run"),
    )  # fmt: skip
    cfg, output = check_inputs(cfg, dry_run=False)
    stepper = Stepper(a.warm, a.timed, cuda)
    run = prepare(cfg, output, None, stepper)
    output.mkdir(parents=True, exist_ok=True)  # train() writes metrics.jsonl at its log point
    # Named ranges around lmtune's calls; the module attributes are looked up at each call, so train() gets these.
    loss.next_token_nll = labelled("lmtune.forward", loss.next_token_nll)
    loss.linear_cross_entropy = labelled("lmtune.loss", loss.linear_cross_entropy)
    run.accelerator.backward = labelled("lmtune.backward", run.accelerator.backward)
    run.accelerator.clip_grad_norm_ = labelled("lmtune.clip", run.accelerator.clip_grad_norm_)

    found: dict[str, Any] = {}

    def ready(prof: Any) -> None:
        found.update(analyse(prof.events(), cuda))
        prof.export_chrome_trace(str(out / "trace.json.gz"))

    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    schedule = torch.profiler.schedule(skip_first=a.warm + a.timed, wait=0, warmup=1, active=a.steps, repeat=1)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=ready) as prof:
        stepper.prof = prof
        # base=None: it goes only into checkpoints, and save_every=0 makes none.
        train.train(run, train.Progress().to(run.accelerator.device), None, StopSignals())
    step_seconds = (stepper.marks["end"] - stepper.marks["start"]) / a.timed
    tokens = job.batch * job.block
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "settings": {
            **asdict(job),
            "mixed_precision": run.accelerator.mixed_precision,
            "compile": a.compile,
            "dropout": a.dropout,
            "warm_steps": a.warm,
            "timed_steps": a.timed,
        },
        "parameters": run.plan["parameters"],
        "tokens_per_step": tokens,
        "step_seconds": step_seconds,
        "tokens_per_second": tokens / step_seconds,
        **found,
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "trace": str(out / "trace.json.gz"),
        "definitions": DEFINITIONS,
    }


def show(r: dict[str, Any]) -> None:
    """The profile's figures as two small tables: the phases of a step, then where the time goes."""
    unit = "device" if r["device_seconds"] is not None else "CPU"
    console.print(
        f"{r['device']}: step {r['step_seconds'] * 1e3:.1f} ms ({r['tokens_per_second']:,.0f} tokens/s); "
        f"profiled step {r['profiled_step_seconds'] * 1e3:.1f} ms on the host"
        + (f", {r['device_seconds'] * 1e3:.1f} ms of kernels" if r["device_seconds"] is not None else "")
        + f"; loss {r['loss_share'] * 100:.1f}% of the {unit} time; "
        f"{r['host_device_syncs_per_step']:g} host-device syncs per step",
        markup=False,
    )
    phases = Table("phase", f"{unit} ms/step", "share", title_justify="left", title="phases of a step")
    total = sum(r["phases"].values())
    for p, s in r["phases"].items():
        phases.add_row(p, f"{s * 1e3:.2f}", f"{s / total * 100:.1f}%")
    console.print(phases)
    for key in ("top_kernels", "top_ops", "top_host_ops"):
        if not r[key]:
            continue
        t = Table(key.replace("_", " "), "ms/step", "share", "calls/step", title_justify="left")
        for x in r[key]:
            t.add_row(x["name"][:90], f"{x['seconds'] * 1e3:.2f}", f"{x['share'] * 100:.1f}%", f"{x['calls']:g}")
        console.print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = os.environ.get("LMTUNE_SHARED_DATA", ROOT.parent / "shared" / "data")
    p.add_argument("--data", type=Path, default=Path(shared), help="folder with wikitext-2/ and tinyshakespeare/")
    p.add_argument("--built", type=Path, help="a folder where bench/gpu.py built base/, train.txt, validation.txt")
    p.add_argument("--out", type=Path, help="where profile.json and trace.json.gz go (default bench/out/profile)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: 2 layers, 64 wide, block 64, batch 4")
    p.add_argument("--compile", action="store_true", help="lmtune's --compile")
    p.add_argument("--dropout", type=float, help="lmtune's dropout (default: the model's, 0.1)")
    p.add_argument("--mixed-precision", default="bf16", choices=["bf16", "no", "auto"], help="default bf16")
    p.add_argument("--batch-size", type=int, help="sequences per step (default 16; tiny 4)")
    p.add_argument("--block-size", type=int, help="tokens per sequence (default 1024; tiny 64)")
    p.add_argument("--steps", type=int, default=3, help="steps profiled (default 3: the trace grows with them)")
    p.add_argument("--warm", type=int, default=3, help="steps first, not measured (compilation)")
    p.add_argument("--timed", type=int, help="steps timed without the profiler (default 10; tiny 3)")
    a = p.parse_args()
    if min(a.steps, a.warm, a.timed or 1) < 1:
        p.error("--steps, --warm and --timed take 1 or more")

    job = gpu.TINY if a.tiny else gpu.FULL
    job = replace(job, **{k: v for k, v in {"batch": a.batch_size, "block": a.block_size}.items() if v})
    a.timed = a.timed or (3 if a.tiny else 10)
    out = (a.out or ROOT / "bench" / "out" / ("profile-tiny" if a.tiny else "profile")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # Offline, and the caches in out/ unless bench/gpu.py set them (then its tokenized data is reused).
    os.environ.setdefault("LMTUNE_HOME", str(out / "home"))
    os.environ.setdefault("HF_DATASETS_CACHE", str(out / "datasets-cache"))
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    if a.built:
        built = a.built.resolve()
    else:
        built = out / "built"
        built.mkdir(exist_ok=True)
        console.print(f"base model and text: {gpu.build_base(job, a.data, built)}", markup=False)
    r = profile(a, job, built, out)
    show(r)
    (out / "profile.json").write_text(json.dumps(r, indent=2) + "\n")
    print(json.dumps(r))


if __name__ == "__main__":
    main()
