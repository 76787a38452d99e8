"""Uploading a run folder to the Hugging Face Hub with huggingface_hub.

The token is the one huggingface_hub finds itself (HF_TOKEN, or `hf auth login`): lmtune never reads it
into its config, prints it or writes it anywhere.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from lmtune import runs
from lmtune.errors import LmtuneError, first_line

log = logging.getLogger("lmtune")

# Not uploaded: resumable checkpoints (optimizer state, several times the model), temporary files, and
# eval --generate's answers (they quote the validation data, which may be private).
IGNORE = ["checkpoints/*", ".*", "*.tmp", "predictions*.jsonl"]
# Files that may name local paths (config.yaml, summary.json, the card, a LoRA run's adapter_config.json).
TEXT_SUFFIXES = (".yaml", ".yml", ".json", ".jsonl", ".md", ".txt")


def check_push(repo: str, *, command: Literal["finetune", "push"] = "finetune") -> None:
    """Fail at once, before any training, when an upload to `repo` cannot work: offline, no token, no hub.

    `command` says who asks: `lmtune finetune --push-to-hub` or `lmtune push`, so the advice fits.
    """
    from huggingface_hub import HfApi, constants, get_token

    who = "--push-to-hub" if command == "finetune" else "lmtune push"
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise LmtuneError(f"{who} {repo}: name the repo as user/name or org/name")
    if constants.HF_HUB_OFFLINE:
        # huggingface_hub is offline with either variable set; name the one that is
        hub_offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        which = "HF_HUB_OFFLINE" if hub_offline else "TRANSFORMERS_OFFLINE"
        if command == "push":
            raise LmtuneError(f"lmtune push needs the network, but {which} is set; unset it ({which}=0) and try again")
        raise LmtuneError(
            f"--push-to-hub needs the network, but {which} is set; unset it, or train without "
            "--push-to-hub and upload later with `lmtune push RUN REPO`"
        )
    if get_token() is None:
        raise LmtuneError(f"{who} needs a Hugging Face token: run `hf auth login` or set HF_TOKEN")
    try:
        HfApi().whoami()
    except Exception as err:  # no network, a bad token: all mean "cannot upload" to the user
        raise LmtuneError(f"{who}: cannot reach the hub with your token ({first_line(err)})") from None


def published(run: Path) -> dict[str, Path | bytes]:
    """What `push` uploads, by path in the repo: every file but checkpoints and temporary ones.

    A text file that names a local path (config.yaml, summary.json, ...) goes as bytes, each path cut to
    its name and the home folder to `~`; the run folder itself keeps its absolute paths.
    """
    import yaml
    from huggingface_hub.utils import filter_repo_objects

    from lmtune.card import hide_paths, local_names

    try:
        saved = yaml.safe_load((run / runs.CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        saved = None  # no readable config.yaml: the run folder and the home folder are hidden all the same
    names = {**local_names(saved if isinstance(saved, dict) else {}), str(run.resolve()): run.name}
    files = sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file())
    chosen: dict[str, Path | bytes] = {}
    for name in filter_repo_objects(files, ignore_patterns=IGNORE):
        path = run / name
        if path.suffix not in TEXT_SUFFIXES:
            chosen[name] = path
            continue
        text = path.read_text(errors="surrogateescape")
        shown = hide_paths(text, names)
        chosen[name] = path if shown == text else shown.encode(errors="surrogateescape")
    return chosen


def push(run: Path, repo: str) -> str:
    """Upload the run folder (model or adapter, tokenizer, card, curves, metrics) to `repo`; returns its URL.

    The repo is created private if it does not exist: the data a model was trained on may be private too.
    The files go in one commit, as `published` gives them; the log says which.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    try:
        files = published(run)
        api.create_repo(repo, private=True, exist_ok=True)
        api.create_commit(
            repo_id=repo,
            operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=src) for name, src in files.items()],
            commit_message=f"lmtune run {run.name}",
        )
    except Exception as err:
        raise LmtuneError(
            f"the run is saved in {run}, but uploading it to {repo} failed ({first_line(err)}); "
            f"try again with `lmtune push {run} {repo}`"
        ) from None
    url = f"https://huggingface.co/{repo}"
    log.info("published %d files to %s: %s", len(files), url, ", ".join(files))
    return url
