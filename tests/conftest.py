"""Offline, tiny and real: every test builds its own tokenizer, model and data in temporary folders."""

import os
import tempfile

# Before anything imports huggingface_hub or datasets: nothing may reach the network, and the
# datasets cache must not grow in the user's home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="lmtune-test-datasets-"))
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.pop("LMTUNE_DEBUG", None)

import json
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

WORDS = [
    "the",
    "cat",
    "dog",
    "bird",
    "sat",
    "ran",
    "on",
    "under",
    "over",
    "a",
    "mat",
    "log",
    "tree",
    "red",
    "blue",
    "green",
    "big",
    "small",
    "happy",
    "sad",
    "morning",
    "evening",
    "rain",
    "sun",
    "wind",
    "cold",
    "warm",
    "river",
    "hill",
    "house",
    "road",
]


def sentences(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return [" ".join(r.choice(WORDS) for _ in range(r.randint(6, 14))).capitalize() + "." for _ in range(n)]


def write_paragraphs(path: Path, n: int, seed: int) -> Path:
    """A .txt file of n documents (paragraphs of 1-3 sentences) separated by blank lines."""
    r = random.Random(seed)
    docs = [" ".join(sentences(r.randint(1, 3), seed * 1000 + i)) for i in range(n)]
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def make_tiny_model(folder: Path, n_positions: int = 64) -> Path:
    """A byte-level BPE tokenizer and a 2-layer GPT-2 saved in a folder, as a user's base model would be."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(sentences(500, seed=0), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    tok.save_pretrained(folder)  # like GPT-2: no pad token
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=n_positions, vocab_size=len(tok), bos_token_id=0, eos_token_id=0
    )
    import torch

    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    write_paragraphs(folder / "train.txt", 120, seed=1)
    write_paragraphs(folder / "valid.txt", 20, seed=2)
    return folder


@pytest.fixture(autouse=True)
def lmtune_home(tmp_path):
    """Each test gets its own cache and its own 'latest run'. Its own MonkeyPatch: a test's
    `monkeypatch.undo()` must not send lmtune to the user's real cache."""
    home = tmp_path / "lmtune-home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMTUNE_HOME", str(home))
        mp.delenv("RANK", raising=False)
        yield home


@pytest.fixture(autouse=True)
def ctrl_c_reaches_python():
    """Ctrl-C as in a terminal: a shell without job control starts background jobs (`make check &`) with
    SIGINT ignored, and Python keeps it so, which would silence the tests' Ctrl-Cs."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(capsys):
    """Run `lmtune ARGS` in this process, exactly as the console script does, and capture what it prints."""
    from accelerate.state import AcceleratorState, GradientState

    from lmtune.cli import main

    def run(*args: str) -> Result:
        # accelerate keeps process-wide singletons; a fresh `lmtune` process would start without them.
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


@pytest.fixture
def quick(cli, tiny_model, corpus, tmp_path):
    """Fine-tune the tiny model briefly (blocks of 32 tokens) with extra flags; returns the run folder."""

    def run(*extra, data: Path | None = None, name: str = "run") -> Path:
        out = tmp_path / name
        r = cli(
            "finetune",
            tiny_model,
            "--data",
            data or corpus / "train.txt",
            "--output",
            out,
            "--block-size",
            "32",
            *extra,
        )
        assert r.code == 0, r.err
        return out

    return run


@pytest.fixture
def finetuned(cli, tiny_model, corpus, tmp_path) -> Path:
    """A short fine-tuning run of the tiny model, in fp32 so its numbers are exact."""
    out = tmp_path / "run"
    r = cli(
        "finetune", tiny_model, "--data", corpus / "train.txt", "--validation-data", corpus / "valid.txt",
        "--output", out, "--block-size", "32", "--batch-size", "4", "--max-steps", "6", "--lr", "1e-3",
        "--mixed-precision", "no", "--eval-every", "3", "log_every=2",
    )  # fmt: skip
    assert r.code == 0, r.err
    return out


def read_json(path: Path):
    return json.loads(path.read_text())


def two_cpu_processes(args, home, port: int):
    """`accelerate launch --num_processes 2 --cpu -m lmtune ARGS`, as a user starts two CPU processes."""
    import subprocess
    import sys

    accelerate = str(Path(sys.executable).with_name("accelerate"))
    cmd = [accelerate, "launch", "--num_processes", "2", "--cpu", "-m", "lmtune", *map(str, args)]
    env = {**os.environ, "LMTUNE_HOME": str(home), "MASTER_PORT": str(port)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def kill_self_on_call(monkeypatch, module, name, call, times=1):
    """Replace module.name by a wrapper that sends this process SIGINT (Ctrl-C) on its `call`-th call."""
    import signal

    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def learnt_chat_run(cli, model, folder: Path, pairs: dict[str, str]) -> tuple[Path, Path]:
    """A chat run of `model` that learns `pairs` (prompt: answer) by heart, through the shipped chat recipe
    with short settings in place of GPT-2's; returns the run folder and its validation file."""
    rows = [{"prompt": k, "response": v} for k, v in pairs.items()] * 30
    train = write_jsonl(folder / "train.jsonl", rows)
    valid = write_jsonl(folder / "valid.jsonl", rows[: len(pairs)])
    out = folder / "chat-run"
    r = cli(
        "finetune", model, "--recipe", "gpt2-chat-lora", "--data", train, "--validation-data", valid,
        "--output", out, "--no-lora", "--block-size", "64", "--batch-size", "16", "--max-steps", "200",
        "--lr", "5e-3", "--mixed-precision", "no", "--dropout", "0",
    )  # fmt: skip
    assert r.code == 0, r.err
    return out, valid


def run_summary(**changes):
    """A finished run's summary.json figures, for model-card tests."""
    summary = {
        "steps": 10, "train_tokens": 1000, "parameters": 124_000_000, "validation": "the validation split",
        "eval_tokens": 500, "block_size": 1024, "base_eval_loss": 3.3, "base_eval_perplexity": 27.1,
        "base_eval_bits_per_byte": 1.2, "eval_loss": 3.0, "eval_perplexity": 20.1, "eval_bits_per_byte": 1.1,
        "mixed_precision": "bf16", "processes": 1, "tokens_per_second": 5000.0, "train_seconds": 0.2,
    }  # fmt: skip
    return {**summary, **changes}
