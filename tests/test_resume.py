"""Runs that survive: exact resume after kill -9 and signals, atomic checkpoints, non-finite losses, full disks."""

import errno
import json
import random
import signal

import pytest
import torch
from conftest import kill_self_on_call
from torture import KILL_STEPS, Bench

from lmtune import checkpoint, loss


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """The tiny model, its data and a reference run that was never stopped (shared by this module's tests)."""
    return Bench(tmp_path_factory.mktemp("torture"))


@pytest.mark.slow
def test_kill_9_at_random_steps_then_resume_is_exact(bench):
    for i, step in enumerate(random.sample(KILL_STEPS, 2)):
        r = bench.kill_and_resume(step, f"kill-{i}")
        assert r["killed_exit"] == -signal.SIGKILL and not r["finished_before_kill"], r
        assert r["resume_exit"] == 0, f"kill at step {step}: " + r["resume_stderr"][-2000:]
        # Bit-identical almost always; "close" allows the last-bit noise explained in torture.py.
        assert r["close_records"], f"per-step losses differ after a kill at step {step}: {r['first_difference']}"
        assert r["close_weights"], f"final weights differ by {r['weight_difference']} after a kill at step {step}"


@pytest.mark.slow
def test_kill_9_then_resume_is_exact_with_two_sources_mixed(tmp_path):
    mixed = Bench(tmp_path, mixed=True)
    r = mixed.kill_and_resume(random.choice(KILL_STEPS), "kill")
    assert r["killed_exit"] == -signal.SIGKILL and r["resume_exit"] == 0, r["resume_stderr"][-2000:]
    assert r["close_records"], f"per-step losses differ after a kill at step {r['kill_step']}: {r['first_difference']}"
    assert r["close_weights"], f"final weights differ by {r['weight_difference']}"


@pytest.mark.slow
def test_kill_9_then_the_same_resume_auto_command_is_exact(bench):
    """A requeued job runs one command every time: `--resume auto` starts the run, and after kill -9 resumes it."""
    r = bench.kill_and_resume(random.choice(KILL_STEPS), "auto", auto=True)
    assert r["killed_exit"] == -signal.SIGKILL and not r["finished_before_kill"], r
    assert r["resume_exit"] == 0, r["resume_stderr"][-2000:]
    assert "resumed from checkpoints/step-" in r["resume_stdout"], r["resume_stdout"][-2000:]
    assert r["close_records"], r["first_difference"]
    assert r["close_weights"], r["weight_difference"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_a_checkpoint_says_how_to_resume_and_exits_non_zero(bench, sig, code):
    r = bench.kill_and_resume(4, f"signal-{sig}", sig)
    assert r["killed_exit"] == code, r["killed_stderr"][-2000:]
    err = r["killed_stderr"].strip().splitlines()[-1]
    assert f"stopped by {signal.Signals(sig).name} after step" in err, r["killed_stderr"][-2000:]
    assert "Resume with: lmtune finetune --recipe" in err and "--resume" in err
    assert r["resume_exit"] == 0, r["resume_stderr"][-2000:]
    assert r["close_records"], r["first_difference"]
    assert r["close_weights"], r["weight_difference"]


def short_run(cli, tiny_model, corpus, out, *extra):
    return cli(
        "finetune", tiny_model, "--data", corpus / "train.txt", "--output", out, "--block-size", "32",
        "--max-steps", "6", "--save-every", "1", "--log-every", "1", "--mixed-precision", "no", *extra,
    )  # fmt: skip


def steps_saved(out):
    return [p.name for p in checkpoint.complete(out / "checkpoints")]


def test_checkpoints_hold_everything_and_only_the_newest_are_kept(cli, tiny_model, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    r = short_run(cli, tiny_model, corpus, out, "--max-steps", "8", "--keep-checkpoints", "3")
    assert r.code == 0, r.err
    assert steps_saved(out) == ["step-0000005", "step-0000006", "step-0000007"]  # the final model is the run itself
    newest = out / "checkpoints" / "step-0000007"
    state = json.loads((newest / "state.json").read_text())
    assert state["step"] == 7 and {"epoch", "batch_in_epoch", "scheduler", "config"} <= state.keys()
    assert set(state["versions"]) == {"lmtune", "torch", "transformers", "accelerate"}
    tensors = torch.load(newest / "training_state.pt", weights_only=True)  # no pickled objects inside
    assert tensors["optimizer"]["state"] and tensors["processes"][0]["rng"]["torch"].dtype == torch.uint8
    AutoModelForCausalLM.from_pretrained(newest)  # a checkpoint is a model folder too
    assert not [p for p in out.rglob("*") if p.suffix in (".pkl", ".bin", ".pickle")]


def test_a_non_finite_loss_stops_the_run_and_keeps_the_good_checkpoint(cli, tiny_model, corpus, tmp_path, monkeypatch):
    real, calls = loss.linear_cross_entropy, []

    def nan_at_third_step(hidden, weight, targets):
        out = real(hidden, weight, targets)
        if torch.is_grad_enabled():  # training, not evaluation
            calls.append(1)
            if len(calls) == 3:
                return out * float("nan")
        return out

    monkeypatch.setattr(loss, "linear_cross_entropy", nan_at_third_step)
    out = tmp_path / "run"
    r = short_run(cli, tiny_model, corpus, out)
    assert r.code == 1
    assert "became nan or inf at step 3" in r.err.strip().splitlines()[-1]
    assert steps_saved(out) == ["step-0000001", "step-0000002"]
    assert not (out / "summary.json").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    "failure, message",
    [(OSError(errno.ENOSPC, "No space left on device"), "No space left on device"), (RuntimeError("boom"), "boom")],
)
def test_a_failed_save_leaves_nothing_partial_and_keeps_the_previous_checkpoint(
    failure, message, cli, tiny_model, corpus, tmp_path, monkeypatch
):
    real, calls = torch.save, []

    def fail_on_third(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise failure
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", fail_on_third)
    out = tmp_path / "run"
    r = short_run(cli, tiny_model, corpus, out)
    assert r.code == 1 and message in r.err and "Traceback" not in r.err
    assert steps_saved(out) == ["step-0000001", "step-0000002"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == steps_saved(out)  # no .tmp left

    monkeypatch.setattr(checkpoint.torch, "save", real)
    r = short_run(cli, tiny_model, corpus, out, "--resume")
    assert r.code == 0, r.err
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step-0000002")


def test_resume_rules(cli, tiny_model, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint.torch, "save", _fail_after(2))
    assert short_run(cli, tiny_model, corpus, out).code == 1  # stopped after two checkpoints
    monkeypatch.undo()

    again = short_run(cli, tiny_model, corpus, out)  # the same command again: told what to do, nothing lost
    assert again.code == 1 and "holds an unfinished run; pass --resume" in again.err
    assert steps_saved(out) == ["step-0000001", "step-0000002"]

    changed = short_run(cli, tiny_model, corpus, out, "--resume", "--batch-size", "4")
    assert changed.code == 1 and "batch_size (8 -> 4)" in changed.err and "--force" in changed.err

    (out / "checkpoints" / "step-0000009").mkdir()  # cut short: no COMPLETE mark
    (out / "checkpoints" / ".step-0000010.tmp").mkdir()
    resumed = short_run(cli, tiny_model, corpus, out, "--resume")
    assert resumed.code == 0, resumed.err
    assert "ignoring incomplete checkpoints: .step-0000010.tmp, step-0000009" in resumed.out
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step-0000002")

    finished = short_run(cli, tiny_model, corpus, out, "--resume")
    assert finished.code == 1 and "already finished" in finished.err
    nothing = short_run(cli, tiny_model, corpus, tmp_path / "never-ran", "--resume")
    assert nothing.code == 1 and "nothing to resume" in nothing.err

    # Killed before its first checkpoint was complete: it can only start over, and is told so.
    early = tmp_path / "early"
    (early / "checkpoints" / ".step-0000001.tmp").mkdir(parents=True)
    (early / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    cut = short_run(cli, tiny_model, corpus, early, "--resume")
    assert cut.code == 1 and "has no complete checkpoint to resume from; start over with --overwrite" in cut.err
    assert (early / "metrics.jsonl").is_file()  # nothing deleted


def test_force_resumes_with_changed_settings(cli, tiny_model, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint.torch, "save", _fail_after(2))
    short_run(cli, tiny_model, corpus, out)
    monkeypatch.undo()
    r = short_run(cli, tiny_model, corpus, out, "--resume", "--force", "--batch-size", "4")
    assert r.code == 0, r.err


def _fail_after(n):
    real, calls = torch.save, []

    def save(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *args, **kwargs)

    return save


def test_the_hub_token_is_never_written_or_printed(cli, tiny_model, corpus, tmp_path, monkeypatch):
    token = "hf_lmtuneFAKEtoken1234567890abcdef"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", token)
    out = tmp_path / "run"
    r = short_run(cli, tiny_model, corpus, out)
    assert r.code == 0, r.err
    g = cli("generate", "the cat", "--model", out, "--max-new-tokens", "5")
    assert token not in r.out + r.err + g.out + g.err
    for path in out.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_a_second_ctrl_c_stops_at_once():
    import os

    from lmtune.stop import StopSignals

    with StopSignals() as stop:
        stop.armed = True  # training has started: there is something to save
        os.kill(os.getpid(), signal.SIGINT)  # the first asks for a checkpoint at the next step
        assert stop.signal == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored afterwards


def finite_weights(folder):
    from safetensors.torch import load_file

    return all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


def test_a_diverging_run_stops_before_its_weights_are_saved(cli, tiny_model, corpus, tmp_path):
    """--lr 1e9: the loss of step 1 is finite, the weights after it are not; nothing non-finite is saved."""
    out = tmp_path / "run"
    r = short_run(cli, tiny_model, corpus, out, "--lr", "1e9", "--eval-every", "1")
    assert r.code == 1
    last = r.err.strip().splitlines()[-1]
    assert "at step 1" in last and "no checkpoint had been saved" in last and "--overwrite" in last, last
    assert steps_saved(out) == [] and not (out / "model.safetensors").exists()


def test_resuming_a_diverged_run_with_a_lower_lr_goes_on_from_a_good_checkpoint(
    cli, tiny_model, corpus, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint.torch, "save", _fail_after(2))
    assert short_run(cli, tiny_model, corpus, out, "--lr", "1e-3").code == 1  # stopped after two checkpoints
    monkeypatch.undo()

    diverged = short_run(cli, tiny_model, corpus, out, "--resume", "--lr", "1e9", "--eval-every", "1")
    last = diverged.err.strip().splitlines()[-1]
    assert diverged.code == 1 and "step-0000002, is good" in last and "--resume --lr 1e+08" in last, last
    assert steps_saved(out) == ["step-0000001", "step-0000002"]
    assert all(finite_weights(out / "checkpoints" / name) for name in steps_saved(out))

    resumed = short_run(cli, tiny_model, corpus, out, "--resume", "--lr", "1e-4")
    assert resumed.code == 0, resumed.err
    assert "learning rate changed on resume: 0.001 -> 0.0001" in resumed.out
    lrs = [e["lr"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "train"]
    assert max(lrs[2:]) <= 1e-4 < lrs[1], lrs  # steps 3 on ran with the new peak learning rate
    assert finite_weights(out) and json.loads((out / "summary.json").read_text())["eval_loss"] < 10


@pytest.mark.parametrize("where, call", [("train.score", 4), ("checkpoint.save_model", 1)])  # evals: steps 0, 2, 4, 6
def test_ctrl_c_during_the_final_evaluation_or_save_finishes_the_run(
    where, call, cli, tiny_model, corpus, tmp_path, monkeypatch
):
    import importlib

    module, name = where.split(".")
    kill_self_on_call(monkeypatch, importlib.import_module(f"lmtune.{module}"), name, call)
    out = tmp_path / "run"
    r = short_run(cli, tiny_model, corpus, out)
    assert r.code == 0, r.err
    assert "SIGINT came after the last step" in r.out
    assert (out / "summary.json").is_file() and finite_weights(out)
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_ctrl_c_while_tokenizing_stops_at_once_and_leaves_nothing(cli, tiny_model, corpus, tmp_path, monkeypatch):
    from lmtune.data import streams

    kill_self_on_call(monkeypatch, streams, "encode", 1)
    out = tmp_path / "run"
    r = short_run(cli, tiny_model, corpus, out)
    assert r.code == 130 and "before training started; nothing was saved" in r.err, r.err
    assert not out.exists()  # the folder the run had taken is given back


def test_a_full_disk_during_the_final_save_says_what_was_kept_and_how_to_resume(
    cli, tiny_model, corpus, tmp_path, monkeypatch
):
    from safetensors import SafetensorError
    from transformers import modeling_utils

    real = modeling_utils.safe_save_file

    def full_disk_outside_checkpoints(tensors, filename, *args, **kwargs):
        if "checkpoints" not in str(filename):
            raise SafetensorError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
            )
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(modeling_utils, "safe_save_file", full_disk_outside_checkpoints)
    out = tmp_path / "run"
    r = short_run(cli, tiny_model, corpus, out, "--save-every", "2")
    last = r.err.strip().splitlines()[-1]
    assert r.code == 1 and "Traceback" not in r.err
    assert f"could not save the trained model (step 6) in {out}: No space left on device" in last, last
    assert "step-0000004, is kept" in last and "--resume" in last, last
    assert not (out / "summary.json").exists() and not (tmp_path / ".run.tmp").exists()

    monkeypatch.undo()
    resumed = short_run(cli, tiny_model, corpus, out, "--save-every", "2", "--resume")
    assert resumed.code == 0, resumed.err
    assert (out / "summary.json").is_file()


def test_a_run_stopped_by_the_previous_version_resumes(cli, tmp_path):
    """tests/data/old-run was stopped by the code before the run was redesigned: today's code resumes it and
    ends where that code's own uninterrupted run ended."""
    import shutil
    from pathlib import Path

    from conftest import make_tiny_model, write_paragraphs

    old = shutil.copytree(Path(__file__).parent / "data" / "old-run", tmp_path / "old-run")
    model, data = make_tiny_model(tmp_path / "tiny"), write_paragraphs(tmp_path / "train.txt", 120, seed=1)
    valid = write_paragraphs(tmp_path / "valid.txt", 20, seed=2)  # given: the rule for holding out changed since
    args = [
        "finetune", model, "--data", data, "--validation-data", valid, "--output", old, "--block-size", "32", "--batch-size", "4",
        "--max-steps", "12", "--lr", "1e-3", "--log-every", "1", "--eval-every", "4", "--save-every", "1",
        "--keep-checkpoints", "1", "--mixed-precision", "no", "--resume",
    ]  # fmt: skip
    moved = cli(*args)  # the folders it named are elsewhere here; nothing else differs
    assert moved.code == 1 and "model (" in moved.err and "data (" in moved.err, moved.err
    assert "validation_data (" in moved.err, moved.err
    assert "batch_size" not in moved.err and "seed" not in moved.err, moved.err

    r = cli(*args, "--force")
    assert r.code == 0, r.err
    assert json.loads((old / "summary.json").read_text())["resumed_from"].endswith("step-0000006")
    records = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (old / "reference-metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e["step"], e["tokens"]) for e in records] == [
        (e["event"], e["step"], e["tokens"]) for e in reference
    ]
    for mine, theirs in zip(records, reference, strict=True):
        key = "loss" if mine["event"] == "train" else "eval_loss"
        assert mine[key] == pytest.approx(theirs[key], rel=1e-5), (mine, theirs)


def test_a_run_whose_held_out_documents_were_chosen_another_way_is_not_resumed(
    cli, tiny_model, corpus, tmp_path, monkeypatch
):
    """Checkpoints of lmtune before the content-hash split say nothing of it: resuming one whose validation
    was held out of its data would go on with other training documents, so it is refused unless --force."""
    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint.torch, "save", _fail_after(2))
    assert short_run(cli, tiny_model, corpus, out).code == 1  # stopped after two checkpoints, data held out
    monkeypatch.undo()
    for state in (out / "checkpoints").glob("step-*/state.json"):
        saved = json.loads(state.read_text())
        assert saved.pop("held_out") == "content hash"
        state.write_text(json.dumps(saved))  # as an earlier lmtune wrote it
    refused = short_run(cli, tiny_model, corpus, out, "--resume")
    assert refused.code == 1 and "held out other documents" in refused.err and "--force" in refused.err, refused.err
    assert short_run(cli, tiny_model, corpus, out, "--resume", "--force").code == 0
