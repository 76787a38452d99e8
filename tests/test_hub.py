"""--push-to-hub and `lmtune push`: fail at once when offline or without a token, keep the run when the
upload fails, upload the run folder without checkpoints, and never show or store the token."""

import pytest
from conftest import read_json

TOKEN = "hf_lmtuneFAKEtoken1234567890abcdef"


@pytest.fixture
def online(monkeypatch):
    """The hub as if reachable with a token; uploads recorded instead of sent."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", lambda self, *a, **k: {"name": "me"})
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo, **k: calls.append(("create", repo, k)))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k)))
    return calls


def run_args(tiny_model, corpus, out):
    return ["finetune", tiny_model, "--data", corpus / "train.txt", "--output", out, "--block-size", "32",
            "--max-steps", "3", "--mixed-precision", "no"]  # fmt: skip


def test_offline_push_fails_at_once_and_starts_nothing(cli, tiny_model, corpus, tmp_path):
    out = tmp_path / "run"  # the tests run with HF_HUB_OFFLINE=1
    r = cli(*run_args(tiny_model, corpus, out), "--push-to-hub", "me/model")
    assert r.code == 1 and "--push-to-hub needs the network, but HF_HUB_OFFLINE is set" in r.err
    assert not out.exists()


def test_no_token_or_a_bad_repo_name_fails_at_once(cli, tiny_model, corpus, tmp_path, monkeypatch, online):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no HF_TOKEN, no stored login
    r = cli(*run_args(tiny_model, corpus, tmp_path / "a"), "--push-to-hub", "me/model")
    assert r.code == 1 and "needs a Hugging Face token" in r.err
    r = cli(*run_args(tiny_model, corpus, tmp_path / "b"), "--push-to-hub", "model-without-owner")
    assert r.code == 1 and "name the repo as user/name" in r.err
    assert online == []


def test_the_run_folder_is_uploaded_without_checkpoints(cli, tiny_model, corpus, tmp_path, online):
    out = tmp_path / "run"
    r = cli(*run_args(tiny_model, corpus, out), "--push-to-hub", "me/model", "--save-every", "1")
    assert r.code == 0, r.err
    assert "uploaded to https://huggingface.co/me/model" in r.out
    (create, repo, options), (upload, args) = online
    assert (create, upload) == ("create", "upload")
    assert repo == "me/model" and options["private"] is True
    assert args["folder_path"] == str(out) and args["repo_id"] == "me/model"
    assert "checkpoints/*" in args["ignore_patterns"]
    assert TOKEN not in r.out + r.err
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path

    online.clear()
    again = cli("push", out, "other/name")
    assert again.code == 0 and online[1][1]["repo_id"] == "other/name"


def test_a_failed_upload_keeps_the_finished_run_and_says_how_to_retry(
    cli, tiny_model, corpus, tmp_path, monkeypatch, online
):
    import huggingface_hub

    def refuse(self, **kwargs):
        raise ConnectionError(f"connection reset (Authorization: Bearer {TOKEN[:3]}...)")

    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", refuse)
    out = tmp_path / "run"
    r = cli(*run_args(tiny_model, corpus, out), "--push-to-hub", "me/model")
    assert r.code == 1 and f"the run is saved in {out}" in r.err and f"lmtune push {out} me/model" in r.err
    assert read_json(out / "summary.json")["steps"] == 3  # complete on disk
    assert TOKEN not in r.out + r.err
