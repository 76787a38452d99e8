"""Kill -9 a fine-tuning run at random steps, resume it, and check it ends exactly as a run never stopped.

`make torture` runs this at 10 random points; tests/test_resume.py runs it at two. Each point: a child
`lmtune finetune` (tiny GPT-2 with dropout, gradient accumulation, several epochs, a checkpoint every
step) is killed with SIGKILL once its metrics show step K, then `--resume` runs it to the end. Exact
means the same per-step losses and evaluations as the reference run, and bit-identical final weights.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_model, write_paragraphs

STEPS = 24


def command(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "lmtune", "finetune", str(model), "--data", str(data), "--output", str(output),
        "--block-size", "32", "--batch-size", "4", "--gradient-accumulation-steps", "2", "--max-steps", str(STEPS),
        "--lr", "1e-3", "--log-every", "1", "--eval-every", "5", "--save-every", "1", "--mixed-precision", "no",
        *extra,
    ]  # fmt: skip


def last_step(run: Path) -> int:
    """The newest training step in a run's metrics.jsonl (0 before the first)."""
    steps = [0]
    path = run / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if event["event"] == "train":
                steps.append(event["step"])
    return max(steps)


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def kill_at(cmd: list[str], run: Path, step: int, env: dict[str, str], sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Start `cmd`, send `sig` once the run has logged `step`, wait for it to end: (exit code, stderr)."""
    proc = start(cmd, env)
    deadline = time.time() + 300
    while last_step(run) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=300)
    return proc.returncode, err


def records(run: Path) -> list[tuple]:
    """Each logged step's loss and each evaluation, without timings (those differ run to run)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        out.append((e["event"], e["step"], e.get("loss"), e.get("eval_loss"), e.get("tokens")))
    return out


def same_weights(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


class Bench:
    """A folder with the tiny model, its data, and the reference run that was never stopped."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.model = make_tiny_model(folder / "model")
        self.data = write_paragraphs(folder / "train.txt", 120, seed=1)
        self.env = {**os.environ, "LMTUNE_HOME": str(folder / "home"), "HF_HUB_OFFLINE": "1"}
        self.reference = folder / "reference"
        done = subprocess.run(
            command(self.model, self.data, self.reference), capture_output=True, text=True, env=self.env
        )
        assert done.returncode == 0, done.stderr[-2000:]

    def kill_and_resume(self, step: int, name: str, sig: int = signal.SIGKILL) -> dict:
        """Stop a run with `sig` at `step`, resume it, and compare it with the reference."""
        run = self.folder / name
        killed_exit, killed_stderr = kill_at(command(self.model, self.data, run), run, step, self.env, sig)
        stopped_at = last_step(run)
        resumed = subprocess.run(
            command(self.model, self.data, run, "--resume"), capture_output=True, text=True, env=self.env
        )
        return {
            "kill_step": step,
            "stopped_after": stopped_at,
            "killed_exit": killed_exit,
            "killed_stderr": killed_stderr,
            "finished_before_kill": stopped_at >= STEPS,
            "resume_exit": resumed.returncode,
            "resume_stderr": resumed.stderr,
            "same_records": resumed.returncode == 0 and records(run) == records(self.reference),
            "same_weights": resumed.returncode == 0 and same_weights(run, self.reference),
        }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--points", type=int, default=10)
    p.add_argument("--seed", type=int, default=None, help="seed of the random kill steps (default: random)")
    a = p.parse_args()
    seed = a.seed if a.seed is not None else random.randrange(1 << 30)
    steps = sorted(random.Random(seed).sample(range(1, STEPS), a.points))
    with tempfile.TemporaryDirectory(prefix="lmtune-torture-") as tmp:
        bench = Bench(Path(tmp))
        exact = 0
        for i, step in enumerate(steps):
            r = bench.kill_and_resume(step, f"run-{i}")
            ok = r["same_records"] and r["same_weights"] and not r["finished_before_kill"]
            exact += ok
            verdict = "exact" if ok else f"NOT exact ({r['resume_stderr'].strip().splitlines()[-1:]})"
            print(f"kill -9 at step {step:2d} (stopped after {r['stopped_after']:2d}), resumed: {verdict}", flush=True)
    print(f"{exact} of {len(steps)} resumed exactly (kill steps drawn with seed {seed})")
    sys.exit(0 if exact == len(steps) else 1)


if __name__ == "__main__":
    main()
