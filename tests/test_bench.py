"""The benchmark's own scripts, run briefly on the tiny model so they cannot rot between `make bench` runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_paragraphs

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


@pytest.mark.slow
def test_step_profile_and_loss_benchmark_report_their_figures(tmp_path):
    """bench/profile_step.py --tiny (eager) and bench/loss.py (eager, compiled, full logits) on CPU, as
    bench/gpu.py runs them on a GPU; the shared corpora stood in for by generated text."""
    data = tmp_path / "data"
    for i, name in enumerate(("tinyshakespeare/input.txt", "wikitext-2/valid.txt", "wikitext-2/test.txt")):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        write_paragraphs(data / name, 300, seed=10 + i)
    p = run_json(BENCH / "profile_step.py", "--tiny", "--data", data, "--out", tmp_path / "profile", "--steps", 2)
    assert p["profiled_steps"] == 2 and p["step_seconds"] > 0 and p["tokens_per_second"] > 0
    assert {"forward", "loss", "backward", "optimizer"} <= set(p["phases"])
    assert 0 < p["loss_share"] < 1
    # On CPU the phases are the self times of every operator in the steps: together, the steps' own time.
    assert sum(p["phases"].values()) == pytest.approx(p["profiled_step_seconds"], rel=0.05)
    assert p["top_ops"] and all(op["seconds"] > 0 and op["calls"] > 0 for op in p["top_ops"])
    assert p["host_device_syncs_per_step"] == p["sync_events_per_step"]["tensor_to_python"] >= 0
    assert (tmp_path / "profile" / "trace.json.gz").stat().st_size > 0
    assert json.loads((tmp_path / "profile" / "profile.json").read_text())["loss_share"] == p["loss_share"]

    loss = run_json(
        BENCH / "loss.py", "--rows", 80, "--width", 32, "--vocab", 512, "--chunk", 32, "--reps", 2,
        "--out", tmp_path / "loss",
    )  # fmt: skip
    got = {(r["variant"], r["precision"]): r for r in loss["results"]}
    assert set(got) == {(v, p) for v in ("eager", "compiled", "full") for p in ("bf16", "fp32")}
    assert all(r["median_ms"] > 0 for r in got.values())
    # Compiling shows in the first call; the numbers stay eager's (bf16: see tests/test_compile.py).
    assert got["compiled", "fp32"]["first_call_seconds"] > got["eager", "fp32"]["first_call_seconds"]
    for variant, precision in got:
        r, tolerance = got[variant, precision], 1e-5 if precision == "fp32" else 2e-2
        assert r["loss_relative_difference"] < tolerance
        assert r["grad_hidden_relative_difference"] < tolerance and r["grad_weight_relative_difference"] < tolerance


@pytest.mark.slow
def test_memory_benchmark_measures_each_configuration_and_its_dry_run(tmp_path):
    """bench/memory.py --tiny on one of its configurations (each is a dry run and a real run, in processes of
    their own): the real run's peak beside its dry run's."""
    done = subprocess.run(
        [sys.executable, BENCH / "memory.py", "--tiny", "--batch", "2", "--block", "32", "--steps", "1",
         "--only", "QLoRA (4-bit base)", "--out", tmp_path],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["name"] for r in results] == ["QLoRA (4-bit base)"]
    for r in results:
        assert "error" not in r, r
        assert r["peak"] > 0 and abs(r["dry_vs_real"]) < 0.15, r
        assert {"weights", "gradients", "optimizer_states", "activations"} <= r["parts"].keys()
    assert "| QLoRA (4-bit base) |" in done.stdout
