"""`lmtune generate`: continue prompts with a trained model, streaming text as it is made."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import TextStreamer

from lmtune import lora, runs
from lmtune.config import build, validate
from lmtune.data import ensure_chat_template
from lmtune.errors import LmtuneError
from lmtune.model import context_length, load_pretrained, load_tokenizer
from lmtune.options import Sampling

log = logging.getLogger("lmtune")


def trained_on_chat(model: str) -> bool:
    """Whether a run folder (or checkpoint, or merged model) was trained on chat data, as its data plan says
    (any of its sources; chat mixed with text too), or its config for runs written before plans."""
    folder = Path(model).expanduser()
    if (folder / "data_plan.json").is_file():
        return any(s["data_format"] == "chat" for s in json.loads((folder / "data_plan.json").read_text())["sources"])
    if (folder / runs.CONFIG).is_file():
        return build(str(folder / runs.CONFIG)).data_format == "chat"
    if (folder / "state.json").is_file():  # a checkpoint
        values = json.loads((folder / "state.json").read_text())["config"]
        return validate(values, source=str(folder / "state.json")).data_format == "chat"
    return False


def as_chat(tokenizer: Any, prompt: str) -> str:
    """The prompt as a user turn in the chat template training used (saved with the tokenizer), ready for the answer."""
    ensure_chat_template(tokenizer)
    text: str = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return text


def load(model: str, dtype: str = "float32", trust_remote_code: bool = False) -> tuple[Any, Any]:
    """A model folder (a run, a checkpoint) or hub id, with its tokenizer, ready to generate."""
    tok = load_tokenizer(model, trust_remote_code, what="model", needs_eos=False)  # then it stops at the length
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    if lora.is_adapter(model):  # a LoRA run: its base model with the adapter merged in (or beside it, quantized)
        net = lora.load_adapted(model, torch_dtype, trust_remote_code)
    else:
        net = load_pretrained(model, torch_dtype, trust_remote_code)
    net.eval()
    return net, tok


class _Stream(TextStreamer):
    """transformers' streamer, sending finished words to a function instead of print()."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.on_text(text)


def fit_context(prompt: int, max_new_tokens: int, context: int) -> tuple[int, int]:
    """(prompt tokens to keep, new tokens to make) so that the two fit the model's context.

    The new tokens are as many as asked while there is room; when the prompt needs the room, they still
    get up to half the context and the prompt keeps its last tokens (the ones the continuation follows).
    """
    new = max(1, min(max_new_tokens, max(context - prompt, context // 2)))
    return min(prompt, context - new), new


@torch.no_grad()
def generate(
    model: Any, tokenizer: Any, prompts: list[str], s: Sampling, on_text: Callable[[str], None] | None = None
) -> list[list[str]]:
    """Continuations (without the prompt) of each prompt: s.num_return_sequences each. Stops at EOS.

    `on_text` streams the text of a single prompt and sequence as it is made.
    """
    if s.seed is not None:
        torch.manual_seed(s.seed)
    greedy = s.temperature == 0
    enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    if enc["input_ids"].shape[1] == 0:
        # An empty prompt: start from EOS, which is how the model saw every document begin.
        enc = tokenizer(
            [tokenizer.eos_token or tokenizer.pad_token] * len(prompts), return_tensors="pt", add_special_tokens=False
        ).to(model.device)
    context = context_length(model)
    length = enc["input_ids"].shape[1]  # the longest prompt: the others are left-padded to it
    new = s.max_new_tokens
    if context is not None and length + new > context:
        # Past its context a model has no position for the next token (GPT-2 fails with IndexError).
        keep, new = fit_context(length, new, context)
        enc = {k: v[:, length - keep :] for k, v in enc.items()}
        log.warning(context_note(len(prompts), length, keep, new, s.max_new_tokens, context))
    stream = _Stream(tokenizer, on_text) if on_text and len(prompts) == 1 and s.num_return_sequences == 1 else None
    out = model.generate(
        **enc,
        max_new_tokens=new,
        do_sample=not greedy,
        temperature=None if greedy else s.temperature,
        top_k=None if greedy else s.top_k,
        top_p=None if greedy else s.top_p,
        num_return_sequences=s.num_return_sequences,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=stream,
    )  # (len(prompts) * n, prompt + new tokens); prompts are left-padded, so new tokens start at one column
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    n = s.num_return_sequences
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]


def context_note(prompts: int, length: int, keep: int, new: int, asked: int, context: int) -> str:
    """One line saying how the prompts and the new tokens were made to fit the context."""
    which = "the prompt" if prompts == 1 else "the longest prompt"
    said = f"{which} is {length} token{'s' if length != 1 else ''} and the model's context {context}: "
    kept = f"keeping its last {keep} tokens" if prompts == 1 else f"keeping the last {keep} tokens of each prompt"
    if keep == length:
        return said + f"generating at most {new} new tokens, not {asked}"
    if new == asked:
        return said + f"{kept}, to leave room for {new} new ones"
    return said + f"{kept} and generating at most {new} new ones, not {asked}"


def read_prompts(path: Path) -> list[str]:
    """The prompts in a file: one per line; JSONL with a `prompt` field; or a JSON list of them."""
    if not path.is_file():
        raise LmtuneError(f"no such prompts file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LmtuneError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from None
    if path.suffix == ".json":
        prompts = json_prompts(path, text)
    elif path.suffix == ".jsonl":
        prompts = [jsonl_prompt(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    else:
        prompts = [line for line in text.splitlines() if line.strip()]
    if not prompts:
        raise LmtuneError(f"prompts file {path} holds no prompts")
    return prompts


def jsonl_prompt(path: Path, n: int, line: str) -> str:
    try:
        row = json.loads(line)
        prompt = row["prompt"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise LmtuneError(f"{path} line {n}: expected a JSON object with a `prompt` field") from None
    if not isinstance(prompt, str):
        raise LmtuneError(f"{path} line {n}: `prompt` must be text, not {json_kind(prompt)}")
    return prompt


def json_prompts(path: Path, text: str) -> list[str]:
    expected = 'expected a JSON list of strings or of {"prompt": "..."} objects'
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise LmtuneError(f"{path} is not valid JSON (line {err.lineno}: {err.msg}); {expected}") from None
    if not isinstance(items, list):
        raise LmtuneError(f"{path} holds {json_kind(items)}; {expected}")
    prompts = []
    for i, item in enumerate(items, 1):
        prompt = item.get("prompt") if isinstance(item, dict) else item
        if not isinstance(prompt, str):
            raise LmtuneError(f"{path} item {i}: expected a string or an object with a `prompt` string")
        prompts.append(prompt)
    return [p for p in prompts if p.strip()]


def json_kind(value: Any) -> str:
    """What a JSON value is, in words, for error messages."""
    kinds = {type(None): "null", bool: "true/false", list: "a list", dict: "an object", str: "a string"}
    return kinds.get(type(value), "a number")
