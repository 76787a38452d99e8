"""The benchmark's own scripts, run briefly on the tiny model so they cannot rot between `make bench` runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_json(*args) -> dict:
    done = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_trainer_script_trains_and_saves(tiny_model, corpus, tmp_path):
    out = tmp_path / "trainer"
    r = run_json(
        BENCH / "trainer_clm.py", "--model", tiny_model, "--train", corpus / "train.txt", "--output", out,
        "--block-size", 32, "--batch-size", 4, "--max-steps", 3, "--lr", 1e-3,
    )  # fmt: skip
    assert r["train_tokens"] == 3 * 4 * 32 and len(r["step_seconds"]) == 3
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_bare_loop_and_parts_run(tiny_model, corpus):
    bare = run_json(
        BENCH / "bare_loop.py", "--model", tiny_model, "--train", corpus / "train.txt",
        "--block-size", 32, "--batch-size", 4, "--steps", 2, "--warmup", 1,
    )  # fmt: skip
    assert bare["tokens_per_second"] > 0
    prep = run_json(
        BENCH / "parts.py", "data", "--model", tiny_model, "--train", corpus / "train.txt",
        "--validation", corpus / "valid.txt", "--block-size", 32,
    )  # fmt: skip
    assert prep["tokens"] == prep["datasets_tokens"]  # both paths make the same token stream
    gen = run_json(BENCH / "parts.py", "generate", "--model", tiny_model, "--new-tokens", 4)
    assert gen["batch8_cache_tokens_per_second"] > 0
