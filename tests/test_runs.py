"""Run folders: never delete a run's own inputs, one run per folder, `~` in paths, a bad LMTUNE_HOME."""

import shutil
import subprocess
import sys
import time

from conftest import write_paragraphs

from lmtune import runs


def finetune_args(model, data, out, *extra):
    return ["finetune", model, "--data", data, "--output", out, "--block-size", "32", "--max-steps", "2", *extra]


def test_overwrite_never_deletes_the_runs_own_data_or_model(cli, tiny_model, corpus, tmp_path):
    exp = tmp_path / "exp1"
    exp.mkdir()
    data = shutil.copy(corpus / "train.txt", exp / "train.txt")
    r = cli(*finetune_args(tiny_model, data, exp, "--overwrite"))
    assert r.code == 1 and "--overwrite would delete" in r.err and "this run's data" in r.err, r.err
    assert (exp / "train.txt").is_file()

    proj = tmp_path / "proj"
    shutil.copytree(tiny_model, proj / "base")
    r = cli(*finetune_args(proj / "base", corpus / "train.txt", proj, "--overwrite"))
    assert r.code == 1 and "this run's model" in r.err, r.err
    assert (proj / "base" / "model.safetensors").is_file()

    val = shutil.copy(corpus / "valid.txt", exp / "valid.txt")
    r = cli(*finetune_args(tiny_model, corpus / "train.txt", exp, "--validation-data", val, "--overwrite"))
    assert r.code == 1 and "this run's validation data" in r.err, r.err


def test_a_second_run_on_the_same_folder_is_refused_while_the_first_runs(cli, tiny_model, tmp_path):
    data = write_paragraphs(tmp_path / "big.txt", 3000, seed=5)  # not cached yet: tokenizing takes a moment
    out = tmp_path / "run"
    first = subprocess.Popen(
        [sys.executable, "-m", "lmtune", *map(str, finetune_args(tiny_model, data, out, "--max-steps", "30"))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lock = out / runs.LOCK
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    second = cli(*finetune_args(tiny_model, data, out))
    _, err = first.communicate(timeout=600)
    assert second.code == 1, second.err
    assert f"another lmtune run (process {first.pid}) is writing to {out}" in second.err, second.err
    assert first.returncode == 0, err[-2000:]
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(steps) == 3  # steps 10, 20, 30 of the one run, nothing interleaved


def test_tilde_in_output_means_the_home_folder(cli, tiny_model, corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    r = cli(*finetune_args(tiny_model, corpus / "train.txt", "~/runs/x"))
    assert r.code == 0, r.err
    assert (tmp_path / "home" / "runs" / "x" / "summary.json").is_file()
    assert not (tmp_path / "~").exists()
    assert str(tmp_path / "home" / "runs" / "x") in r.out.replace("\n", "")


def test_a_bad_lmtune_home_is_named_before_training(cli, tiny_model, corpus, tmp_path, monkeypatch):
    not_a_folder = tmp_path / "home-file"
    not_a_folder.write_text("")
    out = tmp_path / "run"
    for home, says in ((not_a_folder, "is a file"), (not_a_folder / "sub", "is not writable")):
        monkeypatch.setenv("LMTUNE_HOME", str(home))
        r = cli(*finetune_args(tiny_model, corpus / "train.txt", out))
        assert r.code == 1 and f"lmtune's cache folder {home}" in r.err and says in r.err, r.err
        assert not out.exists()  # refused before anything was made


def test_a_finished_run_is_never_reported_as_failed(cli, tiny_model, corpus, tmp_path, lmtune_home, caplog):
    (lmtune_home / "latest-run" / "in-the-way").mkdir(parents=True)  # remembering the run will fail
    out = tmp_path / "run"
    r = cli(*finetune_args(tiny_model, corpus / "train.txt", out))
    assert r.code == 0, r.err
    assert (out / "summary.json").is_file()
    assert "could not note" in caplog.text and "--model" in caplog.text
