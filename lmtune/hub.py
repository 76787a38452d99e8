"""Uploading a run folder to the Hugging Face Hub with huggingface_hub.

The token is the one huggingface_hub finds itself (HF_TOKEN, or `hf auth login`): lmtune never reads it
into its config, prints it or writes it anywhere.
"""

from __future__ import annotations

from pathlib import Path

from lmtune.errors import LmtuneError, first_line

# Not uploaded: resumable checkpoints (optimizer state, several times the model) and temporary files.
IGNORE = ["checkpoints/*", ".*", "*.tmp"]


def check_push(repo: str) -> None:
    """Fail at once, before any training, when an upload to `repo` cannot work: offline, no token, no hub."""
    from huggingface_hub import HfApi, constants, get_token

    if repo.count("/") != 1 or not all(repo.split("/")):
        raise LmtuneError(f"--push-to-hub {repo}: name the repo as user/name or org/name")
    if constants.HF_HUB_OFFLINE:
        raise LmtuneError(
            "--push-to-hub needs the network, but HF_HUB_OFFLINE is set; unset it, or train without "
            "--push-to-hub and upload later with `lmtune push RUN REPO`"
        )
    if get_token() is None:
        raise LmtuneError("--push-to-hub needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    try:
        HfApi().whoami()
    except Exception as err:  # no network, a bad token: all mean "cannot upload" to the user
        raise LmtuneError(f"--push-to-hub: cannot reach the hub with your token ({first_line(err)})") from None


def push(run: Path, repo: str) -> str:
    """Upload the run folder (model or adapter, tokenizer, card, curves, metrics) to `repo`; returns its URL.

    The repo is created private if it does not exist: the data a model was trained on may be private too.
    """
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo, private=True, exist_ok=True)
        api.upload_folder(
            folder_path=str(run), repo_id=repo, ignore_patterns=IGNORE, commit_message=f"lmtune run {run.name}"
        )
    except Exception as err:
        raise LmtuneError(
            f"the run is saved in {run}, but uploading it to {repo} failed ({first_line(err)}); "
            f"try again with `lmtune push {run} {repo}`"
        ) from None
    return f"https://huggingface.co/{repo}"
