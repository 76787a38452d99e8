"""Instruction and chat data: the template, loss on responses only, EOS, and generate using the same template."""

import json

import numpy as np
import pytest
from conftest import learnt_chat_run, read_json, write_jsonl

from lmtune import data
from lmtune.config import Config
from lmtune.model import load_tokenizer

PAIRS = {"sky": "blue", "grass": "green", "cat": "meow", "dog": "woof"}


def responses(enc, i, tok):
    return tok.decode(enc.ids[i][enc.masks[i]])


def test_simple_template_scores_only_the_responses_and_ends_each_with_eos(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    assert not tok.chat_template  # GPT-2-like: lmtune's template is used
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat on a mat"},
        {"role": "user", "content": "the dog"},
        {"role": "assistant", "content": "ran"},
    ]
    enc = data.encode([conv], tok, lambda e: None, "test")
    eos = tok.eos_token
    assert tok.decode(enc.ids[0]) == (
        f"Be brief.\n\n### Instruction:\nthe cat\n\n### Response:\nsat on a mat{eos}"
        f"### Instruction:\nthe dog\n\n### Response:\nran{eos}"
    )
    assert responses(enc, 0, tok) == f"sat on a mat{eos}ran{eos}"
    assert enc.nbytes[0] == len(f"sat on a mat{eos}ran{eos}".encode())


def test_the_tokenizers_own_chat_template_is_used_and_eos_appended(tiny_model):
    tok = load_tokenizer(str(tiny_model))
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    conv = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat"}]
    enc = data.encode([conv], tok, lambda e: None, "test")
    assert tok.decode(enc.ids[0]) == f"<user>the cat\n<assistant>sat\n{tok.eos_token}"
    # the template's own end of turn belongs to the response; EOS is added so the model learns to stop
    assert responses(enc, 0, tok) == f"sat\n{tok.eos_token}"


def test_prompt_response_and_messages_files_read_as_the_same_conversations(tmp_path):
    pr = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "a", "response": "b"}])
    msgs = write_jsonl(
        tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}]
    )
    cfg = Config()
    assert data.read_documents(str(pr), cfg) == data.read_documents(str(msgs), cfg)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "plain", "prompt": "x"}])
    assert data.read_documents(str(text), cfg) == {"train": ["plain"]}  # no response column: text


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "robot", "content": "hi"}]}, "row 2: each message needs a role"),
        ({"messages": "hi"}, "row 2: `messages` must be a non-empty list"),
    ],
)
def test_bad_conversations_name_their_row(cli, tmp_path, tiny_model, row, message):
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    r = cli("finetune", tiny_model, "--data", path, "--dry-run")
    assert r.code == 1 and message in r.err and "Traceback" not in r.err


def test_chat_format_on_plain_text_is_refused(cli, tiny_model, corpus):
    r = cli("finetune", tiny_model, "--data", corpus / "train.txt", "--data-format", "chat", "--dry-run")
    assert r.code == 1 and "chat data is JSONL" in r.err


@pytest.fixture
def chat_run(cli, tiny_model, tmp_path):
    # the shipped recipe, with the tiny model and short settings in place of GPT-2's
    return learnt_chat_run(cli, tiny_model, tmp_path, {f"the {k}": v for k, v in PAIRS.items()})[0]


@pytest.mark.slow
def test_a_chat_run_learns_the_answers_and_generate_uses_its_template(cli, chat_run, tiny_model):
    s = read_json(chat_run / "summary.json")
    assert s["data_format"] == "chat" and s["blocks"] == 4 * 30
    # Only responses are scored: each validation answer is one word plus EOS.
    tok = load_tokenizer(str(tiny_model))
    answers = [len(tok(v, add_special_tokens=False)["input_ids"]) + 1 for v in PAIRS.values()]
    assert s["eval_tokens"] == sum(answers)
    assert s["eval_loss"] < s["base_eval_loss"] / 10
    assert (chat_run / "chat_template.jinja").is_file()  # the template travels with the run

    for prompt, answer in PAIRS.items():
        r = cli("generate", f"the {prompt}", "--model", chat_run, "--greedy", "--max-new-tokens", "10")
        assert r.code == 0, r.err
        assert r.out.strip() == answer  # the answer alone, stopped by EOS
    r = cli("eval", chat_run, "--json")
    assert json.loads(r.out)["loss"] == pytest.approx(s["eval_loss"], rel=1e-5)


def test_chat_examples_are_cut_to_the_block_and_skipped_when_no_response_is_left(tiny_model):
    from lmtune.batches import Examples, pad_batch

    tok = load_tokenizer(str(tiny_model))
    long_prompt = [{"role": "user", "content": "the cat " * 80}, {"role": "assistant", "content": "ran"}]
    short = [{"role": "user", "content": "the dog"}, {"role": "assistant", "content": "sat on the mat"}]
    split = data.encode([long_prompt, short], tok, lambda e: None, "t").split([0, 1], tok.eos_token_id, np.uint16)
    ex = Examples(split, block_size=48)
    assert (len(ex), ex.skipped, ex.truncated) == (1, 1, 1)
    inputs, labels, positions, real = pad_batch([ex[0]], tok.pad_token_id)
    assert positions is None  # one conversation per row: positions 0, 1, 2, ...
    assert real == inputs.shape[1] <= 48
    scored = labels[labels != -100]
    assert tok.decode(scored) == "sat on the mat" + tok.eos_token
