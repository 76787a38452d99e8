"""Accelerate config files, FSDP and several machines, with real CPU processes on one machine.

What runs here: a multi-CPU and an FSDP config file through `accelerate launch --config_file`, FSDP 2
really sharding over gloo (through tests/fsdp_on_cpu.py: Accelerate itself keeps FSDP off on CPU),
and two `accelerate launch --num_machines 2` commands on localhost standing for two machines.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import read_json

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
FSDP_ON_CPU = str(Path(__file__).with_name("fsdp_on_cpu.py"))
TEARDOWN_PROBE = str(Path(__file__).with_name("teardown_probe.py"))
# Blocks of 31 tokens make an odd number of validation windows: one process scores one more than the
# other, which under FSDP (a collective in every forward) would hang if it ran one more batch.
ARGS = ["--block-size", "31", "--batch-size", "4", "--mixed-precision", "no", "--lr", "1e-3", "--log-every", "1"]

CONFIGS = {
    # what `accelerate config` writes for "multi-CPU", 2 processes
    "multi-cpu": "distributed_type: MULTI_CPU\nuse_cpu: true\nnum_machines: 1\nnum_processes: 2\n",
    # the FSDP example of docs/training.md
    "fsdp": (
        "distributed_type: FSDP\nuse_cpu: true\nnum_machines: 1\nnum_processes: 2\nfsdp_config:\n"
        "  fsdp_version: 2\n  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
        "  fsdp_reshard_after_forward: true\n  fsdp_cpu_ram_efficient_loading: false\n"
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "LMTUNE_HOME": str(home)}
    return subprocess.run([ACCELERATE, "launch", *map(str, args)], env=env, capture_output=True, text=True, timeout=300)


def finetune_args(model, corpus, output, *extra) -> list:
    data = ["--data", corpus / "train.txt", "--validation-data", corpus / "valid.txt"]
    return ["finetune", model, *data, *ARGS, "--output", output, *extra]


@pytest.fixture(scope="module")
def single(tiny_model, corpus, tmp_path_factory) -> dict:
    """The summary of the same 4 steps in one process."""
    out = tmp_path_factory.mktemp("single") / "run"
    cmd = [sys.executable, "-m", "lmtune", *map(str, finetune_args(tiny_model, corpus, out, "--max-steps", "4"))]
    env = {**os.environ, "LMTUNE_HOME": str(out.parent / "home")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_json(out / "summary.json")


def same_figures(run: dict, single: dict) -> None:
    """Two processes: twice the tokens per step; evaluation split between them sums to the single run's."""
    assert run["processes"] == 2
    assert run["tokens_per_step"] == 2 * single["tokens_per_step"]
    assert run["eval_tokens"] == single["eval_tokens"]
    assert run["base_eval_loss"] == pytest.approx(single["base_eval_loss"], rel=1e-6)
    assert run["eval_loss"] < run["base_eval_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_a_config_file_starts_two_cpu_processes(name, tiny_model, corpus, tmp_path, lmtune_home, single):
    config = tmp_path / f"{name}.yaml"
    config.write_text(CONFIGS[name])
    out = tmp_path / "run"
    args = finetune_args(tiny_model, corpus, out, "--max-steps", "4")
    proc = launch("--config_file", config, "--main_process_port", free_port(), "-m", "lmtune", *args, home=lmtune_home)
    assert proc.returncode == 0, proc.stderr[-3000:]
    same_figures(read_json(out / "summary.json"), single)
    # Accelerate keeps FSDP off on CPU and trains with plain data parallelism; lmtune says so.
    said = "FSDP asked for, but Accelerate does not shard on CPU" in proc.stderr
    assert said == (name == "fsdp")


@pytest.mark.slow
def test_ddp_is_freed_before_the_process_group(tiny_model, corpus, tmp_path, lmtune_home):
    """A finished CPU run once hung at exit: DDP's reducer, freed after the gloo group was destroyed, was
    the group's last holder and freed it with the GIL held, while a gloo worker waited for the GIL."""
    # torchrun, as lmtune itself starts CPU processes, with the probe in place of `-m lmtune`
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}"]
    args = finetune_args(tiny_model, corpus, tmp_path / "run", "--max-steps", "2")
    env = {**os.environ, "LMTUNE_HOME": str(lmtune_home), "CUDA_VISIBLE_DEVICES": ""}
    cmd = [*torchrun, TEARDOWN_PROBE, *map(str, args)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    probes = sorted(line for line in proc.stderr.splitlines() if line.startswith("teardown probe"))
    assert probes == [f"teardown probe: rank {rank}: 0 DDP alive" for rank in (0, 1)], proc.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_shards_on_cpu_saves_the_whole_model_and_resumes_exactly(
    cli, tiny_model, corpus, tmp_path, lmtune_home, single
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    config = tmp_path / "fsdp.yaml"
    config.write_text(CONFIGS["fsdp"])
    steps = ["--max-steps", "6", "--save-every", "2", "--eval-every", "3", "--keep-checkpoints", "5"]

    def run(output: Path, *extra: str) -> subprocess.CompletedProcess:
        args = finetune_args(tiny_model, corpus, output, *steps, *extra)
        return launch("--config_file", config, "--main_process_port", free_port(), FSDP_ON_CPU, *args, home=lmtune_home)

    ref = tmp_path / "ref"
    proc = run(ref)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = read_json(ref / "summary.json")
    assert summary["processes"] == 2
    assert summary["eval_tokens"] == single["eval_tokens"]
    assert summary["base_eval_loss"] == pytest.approx(single["base_eval_loss"], rel=1e-6)
    assert summary["eval_loss"] < summary["base_eval_loss"]

    # The run folder holds the whole model, not one process's shard: transformers loads it as it is.
    base, tuned = AutoModelForCausalLM.from_pretrained(tiny_model), AutoModelForCausalLM.from_pretrained(ref)
    assert {k: v.shape for k, v in tuned.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    saved, original = load_file(ref / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in original.items()}  # tied: once
    assert not torch.equal(tuned.transformer.h[0].mlp.c_fc.weight, base.transformer.h[0].mlp.c_fc.weight)

    # A checkpoint holds the whole optimizer state, gathered from both processes.
    newest = ref / "checkpoints" / "step-0000004"
    assert read_json(newest / "state.json")["fsdp"] is True
    moments = torch.load(newest / "training_state.pt", weights_only=True)["optimizer"]["state"]
    assert moments["transformer.wte.weight"]["exp_avg"].shape == base.transformer.wte.weight.shape

    # Stopped after step 2 (its checkpoint, config and metrics kept), resumed: the same run.
    stopped = tmp_path / "stopped"
    (stopped / "checkpoints").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        shutil.copy(ref / name, stopped / name)
    shutil.copytree(ref / "checkpoints" / "step-0000002", stopped / "checkpoints" / "step-0000002")
    proc = run(stopped, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]

    def records(folder: Path) -> list[dict]:
        timing = ("tokens_per_second", "elapsed")
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]

    assert records(stopped) == records(ref)
    resumed = AutoModelForCausalLM.from_pretrained(stopped).state_dict()
    assert all(torch.equal(v, resumed[k]) for k, v in tuned.state_dict().items())

    # Its optimizer state is kept by parameter name: a run without FSDP cannot take it.
    (stopped / "summary.json").unlink()
    r = cli(*finetune_args(tiny_model, corpus, stopped, *steps), "--resume")
    assert r.code == 1 and "written with FSDP" in r.err


@pytest.mark.slow
def test_two_machines_on_localhost_train_one_model(tiny_model, corpus, tmp_path, lmtune_home, single):
    out = tmp_path / "run"
    port = free_port()
    args = finetune_args(tiny_model, corpus, out, "--max-steps", "4")
    env = {**os.environ, "LMTUNE_HOME": str(lmtune_home)}

    def machine(rank: int) -> subprocess.Popen:
        """The same command on each machine but for --machine_rank; --num_processes counts all machines'."""
        where = ["--main_process_ip", "127.0.0.1", "--main_process_port", str(port)]
        cmd = [ACCELERATE, "launch", "--num_machines", "2", "--machine_rank", str(rank), *where]
        cmd += ["--num_processes", "2", "--cpu", "-m", "lmtune", *map(str, args)]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    for m in [machine(0), machine(1)]:
        _, err = m.communicate(timeout=300)
        assert m.returncode == 0, err[-3000:]
    same_figures(read_json(out / "summary.json"), single)
