"""Runs that look after themselves: --resume auto, --keep-best, --early-stopping, refused resumes, damaged
checkpoints, file modes and the lock file (issue 20)."""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys

import pytest
import torch
from conftest import read_json, write_paragraphs

from lmtune import checkpoint, runs


def run_args(model, data, out, *extra):
    return [
        "finetune", model, "--data", data, "--output", out, "--block-size", "32", "--max-steps", "6",
        "--save-every", "1", "--log-every", "1", "--mixed-precision", "no", *extra,
    ]  # fmt: skip


def stop_after_two_checkpoints(cli, args, monkeypatch):
    """Run `args` with the disk full from the third checkpoint on: a run stopped with two checkpoints."""
    real, calls = torch.save, []

    def save(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.torch, "save", save)
        assert cli(*args).code == 1


def test_resume_auto_starts_resumes_and_leaves_a_finished_run_alone(cli, tiny_model, corpus, tmp_path, monkeypatch):
    new = tmp_path / "new"
    r = cli(*run_args(tiny_model, corpus / "train.txt", new, "--resume", "auto"))  # nothing there: a new run
    assert r.code == 0, r.err
    assert "new run" in r.out and read_json(new / "summary.json")["resumed_from"] is None
    metrics = (new / "metrics.jsonl").read_text()
    again = cli(*run_args(tiny_model, corpus / "train.txt", new, "--resume", "auto"))  # finished: nothing to do
    assert again.code == 0, again.err
    assert "already finished (6 steps); nothing to train" in again.out
    assert (new / "metrics.jsonl").read_text() == metrics

    stopped = tmp_path / "stopped"
    stop_after_two_checkpoints(cli, run_args(tiny_model, corpus / "train.txt", stopped), monkeypatch)
    r = cli(*run_args(tiny_model, corpus / "train.txt", stopped, "--resume", "auto"))
    assert r.code == 0, r.err
    assert "resumed from checkpoints/step-0000002" in r.out
    assert read_json(stopped / "summary.json")["resumed_from"].endswith("step-0000002")

    # Killed before its first checkpoint was complete: --resume auto starts it over (plain --resume cannot).
    early = tmp_path / "early"
    (early / "checkpoints" / ".step-0000001.tmp").mkdir(parents=True)
    (early / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    (early / "config.yaml").write_text("{}\n")
    r = cli(*run_args(tiny_model, corpus / "train.txt", early, "--resume", "auto"))
    assert r.code == 0, r.err
    assert "started over (--resume auto)" in r.out and read_json(early / "summary.json")["steps"] == 6

    # Starting over never deletes the run's own data.
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.yaml").write_text("{}\n")
    data = shutil.copy(corpus / "train.txt", own / "train.txt")
    r = cli(*run_args(tiny_model, data, own, "--resume", "auto"))
    assert r.code == 1 and "--resume auto (starting over) would delete" in r.err and data.is_file(), r.err

    # A folder holding something else is never taken.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = cli(*run_args(tiny_model, corpus / "train.txt", other, "--resume", "auto"))
    assert r.code == 1 and "already exists" in r.err and (other / "notes.txt").is_file()


def test_resume_refuses_a_target_below_the_checkpoints_step(cli, tiny_model, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    stop_after_two_checkpoints(cli, run_args(tiny_model, corpus / "train.txt", out), monkeypatch)
    r = cli(*run_args(tiny_model, corpus / "train.txt", out, "--resume", "--max-steps", "1"))
    assert r.code == 1, r.err
    last = r.err.strip().splitlines()[-1]
    assert "target of 1 steps: its checkpoint is at step 2" in last and "--max-steps 3 or more" in last, last
    assert not (out / "summary.json").exists()


def test_resume_refuses_data_that_changed_naming_the_file(cli, tiny_model, corpus, tmp_path, monkeypatch):
    data = shutil.copy(corpus / "train.txt", tmp_path / "train.txt")
    out = tmp_path / "run"
    stop_after_two_checkpoints(cli, run_args(tiny_model, data, out), monkeypatch)
    with open(data, "a") as f:  # the file grew after the stop
        f.write("\n\n" + (corpus / "train.txt").read_text())
    r = cli(*run_args(tiny_model, data, out, "--resume"))
    assert r.code == 1, r.err
    last = r.err.strip().splitlines()[-1]
    assert f"the data changed since its checkpoint: {data} (changed size)" in last and "--force" in last, last
    assert not (out / "summary.json").exists()
    forced = cli(*run_args(tiny_model, data, out, "--resume", "--force"))
    assert forced.code == 0, forced.err


def overfit_args(model, data, valid, out, *extra):
    """Six documents, a high learning rate: the evaluation loss falls, then rises (steps 15 and 21 here)."""
    return [
        "finetune", model, "--data", data, "--validation-data", valid, "--output", out, "--block-size", "32",
        "--batch-size", "2", "--max-steps", "60", "--lr", "1e-2", "--eval-every", "3", "--save-every", "3",
        "--keep-checkpoints", "1", "--mixed-precision", "no", "--dropout", "0", "--log-every", "3", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("lora", [False, True])
def test_keep_best_and_early_stopping(lora, cli, tiny_model, corpus, tmp_path):
    small = write_paragraphs(tmp_path / "small.txt", 6, seed=7)
    out = tmp_path / "run"
    extra = ["--lora", "--lr", "5e-2"] if lora else []
    r = cli(*overfit_args(tiny_model, small, corpus / "valid.txt", out, "--keep-best", "--early-stopping", "2", *extra))
    assert r.code == 0, r.err
    summary = read_json(out / "summary.json")
    evals = {e["step"]: e["eval_loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if e["event"] == "eval"}  # fmt: skip
    best = min((s for s in evals if s), key=evals.get)
    assert summary["stopped_early_at"] == summary["steps"] < 60, summary
    assert summary["best_step"] == best < summary["steps"] and summary["best_eval_loss"] == evals[best]
    assert summary["eval_loss"] == evals[summary["steps"]]  # the last step's figures beside the best
    assert f"stopped early at step {summary['steps']}" in r.out
    stopped = [
        e for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if e["event"] == "stopped_early"
    ]
    assert stopped and stopped[0]["best_step"] == best
    # The run folder's model is the best checkpoint's, kept out of the rotation (--keep-checkpoints 1).
    assert (out / "checkpoints" / checkpoint.folder_name(best) / "COMPLETE").is_file()
    e = cli("eval", out, "--json")
    assert e.code == 0, e.err
    assert json.loads(e.out)["loss"] == pytest.approx(evals[best], rel=1e-5)


def test_keep_best_and_early_stopping_survive_a_resume(cli, tiny_model, corpus, tmp_path, monkeypatch):
    small = write_paragraphs(tmp_path / "small.txt", 6, seed=7)
    flags = ["--keep-best", "--early-stopping", "2", "--save-every", "1"]
    whole = tmp_path / "whole"
    assert cli(*overfit_args(tiny_model, small, corpus / "valid.txt", whole, *flags)).code == 0
    expected = read_json(whole / "summary.json")

    # Stopped after the checkpoint of step 18: the best (15) is behind it and one evaluation did not improve.
    out = tmp_path / "stopped"
    real, calls = torch.save, []

    def full_after_18(obj, path, *a, **kw):
        calls.append(path)
        if len(calls) > 18:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(checkpoint.torch, "save", full_after_18)
        assert cli(*overfit_args(tiny_model, small, corpus / "valid.txt", out, *flags)).code == 1
    state = read_json(checkpoint.complete(out / "checkpoints")[-1] / "state.json")
    assert (state["step"], state["best_step"], state["evals_since_best"]) == (18, 15, 1), state
    r = cli(*overfit_args(tiny_model, small, corpus / "valid.txt", out, *flags, "--resume"))
    assert r.code == 0, r.err
    got = read_json(out / "summary.json")
    for key in ("steps", "stopped_early_at", "best_step", "best_eval_loss", "eval_loss"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key


def test_a_damaged_checkpoint_is_named_with_the_previous_one(cli, tiny_model, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    stop_after_two_checkpoints(cli, run_args(tiny_model, corpus / "train.txt", out), monkeypatch)
    newest, previous = out / "checkpoints" / "step-0000002", out / "checkpoints" / "step-0000001"
    tensors = (newest / "training_state.pt").read_bytes()
    for name, damage in (("training_state.pt", tensors[: len(tensors) // 2]), ("state.json", b"{bad")):
        original = (newest / name).read_bytes()
        (newest / name).write_bytes(damage)
        r = cli(*run_args(tiny_model, corpus / "train.txt", out, "--resume"))
        last = r.err.strip().splitlines()[-1]
        assert r.code == 1 and "Traceback" not in r.err, r.err
        assert f"checkpoint {newest} is damaged: {name} cannot be read" in last, last
        assert f"the previous checkpoint, {previous}, move {newest} away" in last, last
        (newest / name).write_bytes(original)


def test_a_full_disk_in_torch_save_is_one_line(cli, tiny_model, corpus, tmp_path, monkeypatch):
    real, calls = torch.save, []

    def enforce_fail(obj, path, *a, **kw):  # what torch.save raises when the disk fills while it writes
        calls.append(path)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 320 vs 256")
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(checkpoint.torch, "save", enforce_fail)
    out = tmp_path / "run"
    r = cli(*run_args(tiny_model, corpus / "train.txt", out))
    last = r.err.strip().splitlines()[-1]
    assert r.code == 1 and "could not save the checkpoint of step 2" in last and "is the disk full?" in last, last
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]


def test_files_are_written_with_the_umasks_modes(cli, tiny_model, corpus, tmp_path):
    out = tmp_path / "run"
    before = os.umask(0o022)
    try:
        r = cli(*run_args(tiny_model, corpus / "train.txt", out))
    finally:
        os.umask(before)
    assert r.code == 0, r.err
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and "checkpoints/step-0000005/model.safetensors" in modes
    assert {p: oct(m) for p, m in modes.items() if m != 0o644} == {}


def test_the_lock_file_goes_with_the_run_and_a_stale_one_is_taken_over(cli, tiny_model, corpus, tmp_path, caplog):
    out = tmp_path / "run"
    args = [str(a) for a in run_args(tiny_model, corpus / "train.txt", out, "--max-steps", "400", "--save-every", "2")]
    killed = subprocess.Popen([sys.executable, "-m", "lmtune", *args], stderr=subprocess.PIPE, text=True)
    while not (out / "checkpoints" / "step-0000002" / "COMPLETE").is_file() and killed.poll() is None:
        pass
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (out / runs.LOCK).read_text() == str(killed.pid)  # left by the killed run, held by nobody

    r = cli(*run_args(tiny_model, corpus / "train.txt", out, "--resume", "--max-steps", "4"))
    assert r.code == 0, r.err
    assert f"taking over {out / runs.LOCK} of process {killed.pid}" in caplog.text
    assert not (out / runs.LOCK).exists()


# --- messages that misled ---------------------------------------------------------------------------------


def without_privileges(*cmd):
    """`cmd` as root without its capabilities, so that a read-only folder refuses root's writes too."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is missing: root would write into read-only folders")
    return ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--", *map(str, cmd)]


def test_a_weight_decay_that_wrecks_the_weights_is_refused_for_what_it_is(cli, tiny_model, corpus, tmp_path):
    r = cli(*run_args(tiny_model, corpus / "train.txt", tmp_path / "run", "--weight-decay", "1e30"))
    last = r.err.strip().splitlines()[-1]
    assert r.code == 1 and "weight_decay 1e+30 with lr 5e-05 would zero or flip the weights" in last, last
    assert not (tmp_path / "run").exists()


def test_early_stopping_without_evaluations_is_refused(cli, tiny_model, corpus, tmp_path):
    r = cli(*run_args(tiny_model, corpus / "train.txt", tmp_path / "run", "--early-stopping", "2", "--eval-every", "0"))
    assert r.code == 1 and "--eval-every 0 makes none before the end" in r.err, r.err


def test_merge_of_a_missing_folder_says_it_does_not_exist(cli, tmp_path):
    r = cli("merge", tmp_path / "missing")
    assert r.code == 1 and f"{tmp_path / 'missing'} does not exist" in r.err, r.err


def test_eval_of_an_unfinished_run_says_so_and_how_to_go_on(cli, tiny_model, corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    stop_after_two_checkpoints(cli, run_args(tiny_model, corpus / "train.txt", out), monkeypatch)
    r = cli("eval", out)
    last = r.err.strip().splitlines()[-1]
    assert r.code == 1 and f"{out} is an unfinished run" in last, last
    assert f"lmtune eval {out / 'checkpoints' / 'step-0000002'} --data DATA" in last and "--resume" in last, last


def test_eval_checks_every_model_before_scoring_any(cli, tiny_model, corpus, tmp_path, monkeypatch):
    from lmtune import evaluate

    scored = []
    real = evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda *a, **kw: scored.append(1) or real(*a, **kw))
    r = cli("eval", tiny_model, tmp_path / "missing", "--data", corpus / "valid.txt")
    assert r.code == 1 and "missing" in r.err.strip().splitlines()[-1], r.err
    assert scored == []  # refused before the first model was scored, not after


def test_push_names_the_offline_variable_that_is_set(cli, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text("{}")
    monkeypatch.delenv("HF_HUB_OFFLINE")  # huggingface_hub read it at import; it is offline all the same
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    r = cli("push", run, "me/model")
    assert r.code == 1 and "but TRANSFORMERS_OFFLINE is set" in r.err and "HF_HUB_OFFLINE" not in r.err, r.err


def test_the_notice_about_a_short_context_is_on_a_line_of_its_own(tiny_model):
    cmd = [sys.executable, "-m", "lmtune", "generate", "Once", "--model", tiny_model, "--max-new-tokens", "100"]
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    merged = subprocess.run(list(map(str, [*cmd, "--seed", "0"])), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip
    assert r.returncode == merged.returncode == 0, r.stderr
    assert "the prompt is 3 tokens and the model's context 64: generating at most 61 new tokens" in r.stderr
    assert merged.stdout.splitlines()[0].startswith("the prompt is 3 tokens"), merged.stdout
    assert merged.stdout.splitlines()[1].startswith("Once"), merged.stdout


def test_generate_and_eval_with_a_tokenizer_without_eos(cli, tiny_model, corpus, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "no-eos")
    settings = json.loads((model / "tokenizer_config.json").read_text())
    settings.pop("eos_token"), settings.pop("bos_token")
    (model / "tokenizer_config.json").write_text(json.dumps(settings))
    g = cli("generate", "the cat", "--model", model, "--max-new-tokens", "5", "--seed", "0")
    assert g.code == 0 and g.out.startswith("the cat"), g.err
    e = cli("eval", model, "--data", corpus / "valid.txt")
    last = e.err.strip().splitlines()[-1]
    assert e.code == 1 and "no EOS token; lmtune eval scores documents joined by EOS" in last, last


def test_eval_generate_on_a_read_only_run_folder(tiny_model, corpus, tmp_path, lmtune_home):
    from conftest import write_jsonl

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmtune", *run_args(tiny_model, corpus / "train.txt", out, "--max-steps", "2")]
    env = {**os.environ, "LMTUNE_HOME": str(lmtune_home)}
    assert subprocess.run(list(map(str, cmd)), env=env, capture_output=True).returncode == 0
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "the cat", "response": "sat"}] * 3)
    answers = tmp_path / "answers"
    answers.mkdir()
    out.chmod(0o555)
    try:
        base = [
            sys.executable,
            "-m",
            "lmtune",
            "eval",
            out,
            "--generate",
            "--chat",
            "--data",
            chat,
            "--max-new-tokens",
            "2",
        ]
        refused = subprocess.run(without_privileges(*base), env=env, capture_output=True, text=True)
        assert refused.returncode == 1, refused.stderr
        last = refused.stderr.strip().splitlines()[-1]
        assert f"cannot write the answers of {out} in {out} (Permission denied); pass --predictions" in last, last
        assert "answering" not in refused.stderr  # refused before the work, not after it
        elsewhere = subprocess.run(without_privileges(*base, "--predictions", answers), env=env, capture_output=True,
                                   text=True)  # fmt: skip
        assert elsewhere.returncode == 0, elsewhere.stderr
        assert "exact_match" in elsewhere.stdout and "not added to its model card" in elsewhere.stderr
        assert (answers / "predictions-run.jsonl").is_file()
    finally:
        out.chmod(0o755)
