"""`lmtune generate` at the edges: prompts longer than the context, and prompts files that hold no text."""

import json
import re

import pytest

from lmtune.generate import fit_context

LONG = "the cat sat on the mat under the big tree " * 12  # about 120 tokens; the tiny model's context is 64


@pytest.mark.parametrize(
    "prompt, max_new, context, expected",
    [
        (10, 50, 256, (10, 50)),  # fits as asked
        (233, 50, 256, (206, 50)),  # the prompt keeps its last tokens; the new ones are as asked
        (20, 400, 256, (20, 236)),  # a short prompt stays whole; generation stops at the context
        (233, 400, 256, (128, 128)),  # both cut: new tokens get at most half the context
        (300, 1, 256, (255, 1)),
    ],
)
def test_fit_context_keeps_prompt_and_new_tokens_within_the_context(prompt, max_new, context, expected):
    keep, new = fit_context(prompt, max_new, context)
    assert (keep, new) == expected
    assert keep + new <= context and keep <= prompt and new <= max_new


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("lmtune")]


def test_a_prompt_longer_than_the_context_keeps_its_last_tokens(cli, tiny_model, caplog):
    r = cli("generate", LONG, "--model", tiny_model, "--greedy")
    assert r.code == 0, r.err
    assert r.out.startswith(LONG)
    assert any(
        "model's context 64: keeping its last 32 tokens and generating at most 32 new ones, not 50" in n
        for n in notes(caplog)
    )


def test_more_new_tokens_than_the_context_stop_at_it(cli, tiny_model, caplog):
    r = cli("generate", "the cat", "--model", tiny_model, "--greedy", "--max-new-tokens", "400")
    assert r.code == 0, r.err
    said = [
        re.search(
            r"the prompt is (\d+) tokens and the model's context 64: generating at most (\d+) new tokens, not 400$", n
        )
        for n in notes(caplog)
    ]
    assert any(m and int(m[1]) + int(m[2]) == 64 for m in said)


def test_long_prompts_in_a_batch_and_in_compare_fit_the_context(cli, tiny_model, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"the cat\n{LONG}\n")
    r = cli("generate", "--prompts", prompts, "--model", tiny_model, "--greedy")
    assert r.code == 0, r.err
    assert [json.loads(line)["prompt"] for line in r.out.splitlines()] == ["the cat", LONG]
    assert any("the longest prompt is" in n and "keeping the last 32 tokens of each prompt" in n for n in notes(caplog))
    r = cli("generate", LONG, "--model", tiny_model, "--compare", tiny_model, "--seed", "0", "-n", "2")
    assert r.code == 0, r.err


def test_greedy_with_several_continuations_is_refused(cli, tiny_model):
    r = cli("generate", "the cat", "--model", tiny_model, "--greedy", "-n", "2")
    assert r.code == 1 and "--greedy gives one continuation" in r.err
    assert r.err.count("\n") == 1 and r.err.startswith("error:")


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.jsonl", '{"prompt": null}\n', "p.jsonl line 1: `prompt` must be text, not null"),
        ("p.jsonl", '{"prompt": "a"}\n\n{"prompt": ["a", "b"]}\n', "p.jsonl line 3: `prompt` must be text, not a list"),
        ("p.jsonl", '{"text": "a"}\n', "p.jsonl line 1: expected a JSON object with a `prompt` field"),
        ("p.json", '{"prompt": "a"}', 'expected a JSON list of strings or of {"prompt": "..."} objects'),
        ("p.json", '["a", 5]', "p.json item 2: expected a string or an object with a `prompt` string"),
        ("p.json", '[{"prompt": null}]', "p.json item 1: expected a string or an object with a `prompt` string"),
        ("p.json", '["a",\n "b"', "p.json is not valid JSON (line 2"),
        ("p.json", "[]", "p.json holds no prompts"),
        ("p.txt", b"the cat \xff\xfe sat\n", "p.txt is not UTF-8 text"),
    ],
)
def test_a_prompts_file_without_text_prompts_is_one_clear_line(name, content, message, cli, tiny_model, tmp_path):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    r = cli("generate", "--prompts", path, "--model", tiny_model)
    assert r.code == 1 and message in r.err, r.err
    assert r.err.count("\n") == 1 and r.err.startswith("error:")


@pytest.mark.parametrize("content", ['["the cat", "a dog"]', '[{"prompt": "the cat"}, {"prompt": "a dog"}]'])
def test_a_json_prompts_file_is_read_as_json(content, cli, tiny_model, tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(content)
    r = cli("generate", "--prompts", path, "--model", tiny_model, "--greedy", "--max-new-tokens", "3")
    assert r.code == 0, r.err
    assert [json.loads(line)["prompt"] for line in r.out.splitlines()] == ["the cat", "a dog"]


def test_an_unknown_dtype_is_one_line_before_loading(cli, tiny_model):
    r = cli("generate", "hi", "--model", tiny_model, "--dtype", "foo")
    assert r.code == 1 and "--dtype foo: choose float32, bfloat16, float16 or auto" in r.err
    assert r.err.count("\n") == 1 and r.err.startswith("error:")
