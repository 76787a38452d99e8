"""--report-to: the metrics also go to a tracker through Accelerate; TensorBoard's event file is read back."""

import json

import pytest


def test_tensorboard_event_file_holds_the_runs_losses(quick, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = quick("--max-steps", "6", "--log-every", "2", "--eval-every", "3", "--report-to", "tensorboard")
    logs = run / "lmtune"
    assert list(logs.glob("events.out.tfevents.*")), list(logs.iterdir())
    events = EventAccumulator(str(logs)).Reload()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {e["step"]: e["loss"] for e in metrics if e["event"] == "train"}
    evals = {e["step"]: e["eval_loss"] for e in metrics if e["event"] == "eval"}
    # the same figures as metrics.jsonl, at the same steps (float32 in the event file)
    assert {s.step: s.value for s in events.Scalars("loss")} == pytest.approx(train, rel=1e-6)
    assert {s.step: s.value for s in events.Scalars("eval_loss")} == pytest.approx(evals, rel=1e-6)
    assert sorted(train) == [2, 4, 6] and sorted(evals) == [0, 3, 6]


def test_a_missing_tracker_package_fails_before_training(cli, tiny_model, corpus, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    out = tmp_path / "run"
    r = cli("finetune", tiny_model, "--data", corpus / "train.txt", "--output", out, "--report-to", "wandb")
    assert r.code == 1 and "--report-to wandb needs the wandb package" in r.err
    assert not out.exists()  # nothing was started


def test_tensorboard_has_a_curve_per_source(cli, tiny_model, corpus, tmp_path):
    from conftest import write_paragraphs
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    other = write_paragraphs(tmp_path / "other.txt", 60, seed=7)
    mix = ("--data", corpus / "train.txt", "--data", other, "--data-weights", "1,1")
    run = tmp_path / "run"
    r = cli(
        "finetune",
        tiny_model,
        *mix,
        "--output",
        run,
        "--block-size",
        "32",
        "--max-steps",
        "4",
        "--eval-every",
        "2",
        "--report-to",
        "tensorboard",
    )
    assert r.code == 0, r.err
    events = EventAccumulator(str(run / "lmtune")).Reload()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for name in ("train.txt", "other.txt"):
        by_step = {
            e["step"]: s["eval_loss"]
            for e in metrics
            if e["event"] == "eval"
            for s in e["sources"]
            if s["name"] == name
        }
        assert {s.step: s.value for s in events.Scalars(f"eval_loss/{name}")} == pytest.approx(by_step, rel=1e-6)
        assert sorted(by_step) == [0, 2, 4]
