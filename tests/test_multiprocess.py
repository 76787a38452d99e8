"""`accelerate launch --num_processes 2 --cpu -m lmtune finetune ...`: two real processes, one result."""

import pytest
from conftest import read_json, two_cpu_processes

ARGS = ["--block-size", "32", "--batch-size", "4", "--max-steps", "4", "--mixed-precision", "no", "--lr", "1e-3"]


@pytest.mark.slow
def test_two_cpu_processes_train_one_model_and_gather_metrics(cli, tiny_model, corpus, tmp_path, lmtune_home):
    data = ["--data", str(corpus / "train.txt"), "--validation-data", str(corpus / "valid.txt")]
    single = tmp_path / "single"
    assert cli("finetune", tiny_model, *data, *ARGS, "--output", single).code == 0

    double = tmp_path / "double"
    args = ["finetune", tiny_model, *data, *ARGS, "--output", double]
    proc = two_cpu_processes(args, lmtune_home, port=29517)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = read_json(single / "summary.json"), read_json(double / "summary.json")
    assert two["processes"] == 2
    # Each optimizer step takes a micro-batch from each process: twice the tokens per step.
    assert two["tokens_per_step"] == 2 * one["tokens_per_step"]
    assert two["train_tokens"] == 4 * 2 * 4 * 32
    # Evaluation is split between the processes and summed: the same tokens, the same base loss.
    assert two["eval_tokens"] == one["eval_tokens"]
    assert two["base_eval_loss"] == pytest.approx(one["base_eval_loss"], rel=1e-6)
    assert two["eval_loss"] < two["base_eval_loss"]
    # Only the main process wrote the run folder, and it is complete.
    assert (double / "model.safetensors").is_file()
    assert len((double / "metrics.jsonl").read_text().splitlines()) == len(
        (single / "metrics.jsonl").read_text().splitlines()
    )


@pytest.mark.slow
def test_a_run_folder_made_read_only_stops_every_process_with_one_line(tiny_model, corpus, tmp_path, lmtune_home):
    """The main process cannot write the run folder any more: every process stops within seconds, and the
    cause is said once (the others used to wait at their next collective, or print gloo's words)."""
    import contextlib
    import os
    import shutil
    import subprocess
    import sys
    import time
    from pathlib import Path

    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is missing: root would write into read-only folders")
    out = tmp_path / "run"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    args = ["--data", corpus / "train.txt", *ARGS, "--max-steps", "400", "--save-every", "2", "--log-every", "1"]
    cmd = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", accelerate, "launch", "-q", "--num_processes",
           "2", "--cpu", "-m", "lmtune", "finetune", tiny_model, *args, "--output", out]  # fmt: skip
    env = {**os.environ, "LMTUNE_HOME": str(lmtune_home), "MASTER_PORT": "29519"}
    proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-0000002" / "COMPLETE").is_file() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        for path in [out, *out.rglob("*")]:  # read-only, files and folders
            with contextlib.suppress(FileNotFoundError):  # an old checkpoint the run deleted meanwhile
                path.chmod(path.stat().st_mode & ~0o222)
        made_read_only = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - made_read_only
    finally:
        proc.kill()
        for path in [out, *out.rglob("*")]:
            with contextlib.suppress(FileNotFoundError):
                path.chmod(path.stat().st_mode | 0o200)
    assert proc.returncode == 1, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    # Which write meets the read-only folder first (metrics.jsonl, or a checkpoint being saved) is a race; either
    # way the one line names the folder and the cause.
    assert str(out) in errors[0] and "Permission denied" in errors[0], errors[0]
    assert ("could not write" in errors[0] and "--resume" in errors[0]) or "could not save the checkpoint" in errors[0]
    assert "Traceback" not in err, err[-3000:]
    assert took < 60, took


@pytest.mark.slow
def test_a_process_killed_outright_stops_the_other_with_a_plain_line(tiny_model, corpus, tmp_path, lmtune_home):
    """kill -9 of the second process: the first stops at once, saying so in words, not gloo's, and the
    launcher says which process was killed; no traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    out = tmp_path / "run"
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    args = ["--data", corpus / "train.txt", *ARGS, "--max-steps", "400", "--save-every", "2", "--log-every", "1"]
    cmd = [accelerate, "launch", "-q", "--num_processes", "2", "--cpu", "-m", "lmtune", "finetune", tiny_model, *args,
           "--output", out]  # fmt: skip
    env = {**os.environ, "LMTUNE_HOME": str(lmtune_home), "MASTER_PORT": "29521"}
    proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-0000002" / "COMPLETE").is_file() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        second = next(p for p in psutil.Process(proc.pid).children(recursive=True) if p.environ().get("RANK") == "1")
        second.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        proc.kill()
    assert proc.returncode != 0 and took < 60, (took, err[-3000:])
    assert "Traceback" not in err and "Connection closed by peer [" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert "error: process 1 of the run was killed by SIGKILL; resume the run with --resume" in errors, err[-3000:]
    assert all("gloo:" in e or "killed by SIGKILL" in e for e in errors), errors
