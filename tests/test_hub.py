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

    def commit(self, repo_id, operations, **kwargs):
        uploaded = {}
        for op in operations:  # what would reach the hub: each file's path in the repo and its bytes
            with op.as_file() as f:
                uploaded[op.path_in_repo] = f.read()
        calls.append(("upload", {"repo_id": repo_id, "files": uploaded, **kwargs}))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", commit)
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
    assert args["repo_id"] == "me/model" and (out / "checkpoints").is_dir()
    assert {"README.md", "config.yaml", "model.safetensors", "summary.json", "tokenizer.json"} <= set(args["files"])
    assert not [f for f in args["files"] if f.startswith("checkpoints/")]
    assert args["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
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

    def refuse(self, *args, **kwargs):
        raise ConnectionError(f"connection reset (Authorization: Bearer {TOKEN[:3]}...)")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", refuse)
    out = tmp_path / "run"
    r = cli(*run_args(tiny_model, corpus, out), "--push-to-hub", "me/model")
    assert r.code == 1 and f"the run is saved in {out}" in r.err and f"lmtune push {out} me/model" in r.err
    assert read_json(out / "summary.json")["steps"] == 3  # complete on disk
    assert TOKEN not in r.out + r.err


def test_offline_lmtune_push_advises_what_fits_the_command():
    from lmtune import hub
    from lmtune.errors import LmtuneError

    # the tests run with HF_HUB_OFFLINE=1
    with pytest.raises(LmtuneError) as err:
        hub.check_push("me/model", command="push")
    assert str(err.value) == (
        "lmtune push needs the network, but HF_HUB_OFFLINE is set; unset it (HF_HUB_OFFLINE=0) and try again"
    )
    with pytest.raises(LmtuneError, match="train without --push-to-hub and upload later with `lmtune push RUN REPO`"):
        hub.check_push("me/model")  # --push-to-hub, as finetune calls it


def test_offline_lmtune_push_command_says_so(cli, tmp_path):
    (tmp_path / "summary.json").write_text("{}")  # a finished run, as far as push looks
    r = cli("push", tmp_path, "me/model")
    assert r.code == 1 and r.err.startswith("error: lmtune push needs the network"), r.err
    assert "lmtune push RUN REPO" not in r.err


@pytest.mark.parametrize("lora", [False, True])
def test_what_is_published_names_no_local_path(cli, quick, tiny_model, corpus, tmp_path_factory, online, caplog, lora):
    import logging

    import yaml

    out = quick("--max-steps", "2", "--mixed-precision", "no", "--validation-data", corpus / "valid.txt",
                *(["--lora"] if lora else []))  # fmt: skip
    local = str(tmp_path_factory.getbasetemp())  # where the model, the data and the run folder lie
    assert local in (out / "config.yaml").read_text()  # the run folder keeps its absolute paths
    (out / "predictions.jsonl").write_text('{"prompt": "a private question"}\n')  # what eval --generate writes
    with caplog.at_level(logging.INFO, logger="lmtune"):
        r = cli("push", out, "me/model")
    assert r.code == 0, r.err
    files = online[-1][1]["files"]
    assert "predictions.jsonl" not in files  # it quotes the validation data
    for name, content in files.items():
        assert local.encode() not in content, name
    published = yaml.safe_load(files["config.yaml"])
    assert published["model"] == tiny_model.name and published["data"] == "train.txt"
    assert published["validation_data"] == "valid.txt" and published["lr"] is None
    assert local in (out / "config.yaml").read_text() and local in (out / "summary.json").read_text()
    assert f"published {len(files)} files to https://huggingface.co/me/model: {', '.join(files)}" in caplog.text
