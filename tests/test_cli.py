"""`lmtune` driven end to end, in-process, through the flags a user types."""

import json
import re

import pytest
import yaml
from conftest import read_json, write_paragraphs

from lmtune import data

SUMMARY_KEYS = {
    "steps", "train_tokens", "train_seconds", "tokens_per_second", "eval_loss", "eval_perplexity",
    "base_eval_loss", "base_eval_perplexity",
}  # fmt: skip


def test_help_lists_every_command(cli):
    r = cli("--help")
    assert r.code == 0
    for command in ("finetune", "generate", "eval", "recipes"):
        assert command in r.out


def test_help_and_no_arguments_keep_their_exit_codes(cli):
    r = cli("finetune", "--help")
    assert r.code == 0 and "--lr" in r.out
    r = cli()  # no command: the help, as a usage error
    assert r.code == 2 and "Usage" in r.out and "finetune" in r.out
    r = cli("recipes")
    assert r.code == 2 and "list" in r.out


@pytest.mark.parametrize(
    "args, message",
    [
        (["finetune", "--lrr", "1"], "No such option: --lrr"),
        (["generate", "hi", "--max-new-tokens", "many"], "Invalid value for '--max-new-tokens'"),
        (["merge"], "Missing argument 'run'"),
        (["fintune"], "No such command 'fintune'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(args, message, cli):
    r = cli(*args)
    assert r.code == 2
    assert r.err.startswith(f"error: {message}") and r.err.count("\n") == 1, r.err
    command = " ".join(["lmtune", *args[:1]]) if args[0] != "fintune" else "lmtune"
    assert f"see {command} --help" in r.err


def test_ctrl_c_exits_130(cli, monkeypatch):
    from lmtune import config

    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(config, "list_recipes", interrupt)
    r = cli("recipes", "list")
    assert r.code == 130 and r.err == "interrupted\n"


def test_finetune_writes_a_complete_run_folder(finetuned, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("model.safetensors", "config.json", "tokenizer.json", "config.yaml", "metrics.jsonl", "summary.json"):
        assert (finetuned / name).is_file(), name
    summary = read_json(finetuned / "summary.json")
    assert set(summary) >= SUMMARY_KEYS
    assert summary["steps"] == 6
    assert summary["train_tokens"] == 6 * 4 * 32  # steps x batch x block
    assert summary["eval_loss"] < summary["base_eval_loss"]
    # Plain transformers loads the run folder, no lmtune involved.
    model = AutoModelForCausalLM.from_pretrained(finetuned)
    tok = AutoTokenizer.from_pretrained(finetuned)
    assert model.config.n_layer == 2 and tok.eos_token == "<|endoftext|>"
    # One JSON object per logged step and per evaluation: base, step 3, final.
    events = [json.loads(line) for line in (finetuned / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "train"] == [2, 4, 6]
    assert [e["step"] for e in events if e["event"] == "eval"] == [0, 3, 6]
    assert events[-1]["eval_loss"] == pytest.approx(summary["eval_loss"])


def test_config_yaml_repeats_the_run(finetuned, cli, tmp_path):
    saved = yaml.safe_load((finetuned / "config.yaml").read_text())
    assert saved["lr"] == 1e-3 and saved["block_size"] == 32 and "output" not in saved
    again = tmp_path / "again"
    r = cli("finetune", "--recipe", finetuned / "config.yaml", "--output", again)
    assert r.code == 0, r.err
    first, second = read_json(finetuned / "summary.json"), read_json(again / "summary.json")
    assert second["eval_loss"] == pytest.approx(first["eval_loss"], rel=1e-6)  # same seed, same run


def test_generate_and_eval_use_the_latest_run(finetuned, cli):
    a = cli("generate", "the cat", "--greedy", "--max-new-tokens", "12")
    b = cli("generate", "the cat", "--greedy", "--max-new-tokens", "12")
    assert a.code == 0, a.err
    assert a.out == b.out and a.out.startswith("the cat")  # greedy decoding is deterministic
    r = cli("eval", "--json")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    summary = read_json(finetuned / "summary.json")
    # The eval command and the training run score the same tokens the same way.
    assert result["tokens"] == summary["eval_tokens"]
    assert result["loss"] == pytest.approx(summary["eval_loss"], rel=1e-5)
    assert result["context"] == result["stride"] == 32


def test_sampling_is_seeded(finetuned, cli):
    a = cli("generate", "the", "--seed", "3", "--max-new-tokens", "10", "--model", finetuned)
    b = cli("generate", "the", "--seed", "3", "--max-new-tokens", "10", "--model", finetuned)
    assert a.code == 0 and a.out == b.out


def test_generate_many_prompts_as_jsonl(finetuned, cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the cat\nthe big blue river ran\n")
    r = cli("generate", "--prompts", prompts, "--greedy", "-n", "1", "--max-new-tokens", "5")
    assert r.code == 0, r.err
    rows = [json.loads(line) for line in r.out.splitlines()]
    assert [row["prompt"] for row in rows] == ["the cat", "the big blue river ran"]
    # Batched (left-padded) greedy generation equals generating each prompt alone.
    alone = cli("generate", "the cat", "--greedy", "--max-new-tokens", "5")
    assert alone.out.strip() == "the cat" + rows[0]["completions"][0]


def test_generate_compare_shows_both_models(finetuned, tiny_model, cli):
    r = cli("generate", "the cat", "--greedy", "--compare", tiny_model, "--max-new-tokens", "5")
    assert r.code == 0, r.err
    assert str(tiny_model.name) in r.out and "the cat" in r.out


def test_eval_compares_models_and_supports_stride(finetuned, tiny_model, corpus, cli):
    r = cli("eval", finetuned, tiny_model, "--data", corpus / "valid.txt", "--json", "--stride", "16")
    assert r.code == 0, r.err
    fine, base = json.loads(r.out)
    assert fine["tokens"] == base["tokens"]
    assert fine["perplexity"] < base["perplexity"]
    assert "stride 16" in fine["perplexity_kind"]
    table = cli("eval", finetuned, tiny_model, "--data", corpus / "valid.txt")
    assert "perplexity" in table.out and "bits/byte" in table.out


def test_dry_run_plans_and_writes_nothing_but_the_token_cache(cli, tiny_model, corpus, tmp_path, lmtune_home):
    out = tmp_path / "planned"
    r = cli("finetune", tiny_model, "--data", corpus / "train.txt", "--output", out, "--block-size", "32", "--dry-run")
    assert r.code == 0, r.err
    for word in ("documents", "blocks", "tokens dropped", "steps", "tokens per step", "estimated time"):
        assert word in r.out
    # The memory the timed passes took, measured (on a CPU: the process's peak RSS, here well under 2 GiB).
    assert re.search(r"peak memory +[01]\.\d\d GiB \(this process", r.out), r.out
    # It says what it did: the token cache is written (the real run reuses it), no run folder is.
    said = " ".join(r.out.split())
    assert "Dry run: nothing was trained and no run folder was made (tokenized data is cached for the real run)" in said
    assert not out.exists() and not (tmp_path / "runs").exists()
    assert any((lmtune_home / "tokens").iterdir())


def test_existing_run_is_never_overwritten_silently(finetuned, tiny_model, corpus, cli):
    before = (finetuned / "model.safetensors").read_bytes()
    args = [
        "finetune",
        tiny_model,
        "--data",
        corpus / "train.txt",
        "--output",
        finetuned,
        "--max-steps",
        "1",
        "--block-size",
        "32",
    ]
    r = cli(*args)
    assert r.code == 1 and "already exists" in r.err and "--overwrite" in r.err
    assert (finetuned / "model.safetensors").read_bytes() == before
    r = cli(*args, "--overwrite")
    assert r.code == 0, r.err
    assert read_json(finetuned / "summary.json")["steps"] == 1


def test_from_scratch_trains_a_tokenizer_and_a_model(cli, corpus, tmp_path):
    out = tmp_path / "scratch"
    r = cli(
        "finetune", "--from-scratch", "--data", corpus / "train.txt", "--output", out,
        "n_layer=1", "n_head=2", "n_embd=16", "n_positions=32", "vocab_size=300", "--max-steps", "3", "--dtype", "auto",
    )  # fmt: skip
    assert r.code == 0, r.err
    summary = read_json(out / "summary.json")
    assert summary["block_size"] == 32  # the model's context
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(out).n_embd == 16
    assert len(AutoTokenizer.from_pretrained(out)) <= 300


def test_recipes_list_show_copy(cli, tmp_path, monkeypatch):
    r = cli("recipes", "list")
    assert r.code == 0 and "gpt2-wikitext2" in r.out and "tiny-cpu" in r.out
    r = cli("recipes", "show", "tiny-cpu")
    assert r.out.startswith("#") and "block_size" in r.out
    monkeypatch.chdir(tmp_path)
    assert cli("recipes", "copy", "tiny-cpu").code == 0
    assert (tmp_path / "tiny-cpu.yaml").read_text() == r.out
    again = cli("recipes", "copy", "tiny-cpu")
    assert again.code == 1 and "already exists" in again.err
    r = cli("recipes", "show", "tiny-cpo")
    assert r.code == 1 and "did you mean `tiny-cpu`" in r.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["finetune", "{model}", "--data", "missing.txt"], "no such file: missing.txt"),
        (["finetune", "{model}", "--data", "{empty}"], "holds no text"),
        (
            ["finetune", "no-such-org/no-such-model", "--data", "{train}"],
            "cannot find model `no-such-org/no-such-model` on the hub",
        ),
        (["finetune", "./no/such/folder", "--data", "{train}"], "no such model folder: ./no/such/folder"),
        (["finetune", "{model}", "--data", "{train}", "lrr=1"], "unknown config key `lrr`; did you mean `lr`?"),
        (["finetune", "{model}", "--data", "{train}", "--lr", "-1"], "lr: Input should be greater than 0"),
        (["finetune", "{model}", "--data", "{train}", "--block-size", "4096"], "longer than the model's context of 64"),
        (["finetune", "{model}", "--data", "{short}"], "fewer than one block"),
        (["finetune", "{model}"], "no training data"),
        (["finetune", "{model}", "other-model", "--data", "{train}"], "expected one MODEL"),
        (["finetune", "--data", "{train}"], "no model"),
        (["finetune", "{model}", "--data", "{train}", "--recipe", "nope"], "no recipe named `nope`"),
        (["generate", "hello"], "no run yet"),
        (["eval"], "no run yet"),
        (["generate", "hi", "--model", "{notokenizer}"], "has no tokenizer files"),
        (["finetune", "{corpusdir}", "--data", "{train}"], "is not a model folder (no config.json)"),
        (["eval", "{corpusdir}", "--data", "{train}"], "is not a model folder (no config.json)"),
        (["finetune", "{model}", "--data", "{nodata}"], "no .txt, .jsonl"),
        (["finetune", "{model}", "--data", "{badjsonl}"], "line 2"),
        (["finetune", "{model}", "--data", "{othercolumn}"], "has no column `text`; it has body"),
        (["finetune", "{model}", "--data", "{numbers}"], "not text"),
        (
            ["finetune", "{model}", "--data", "{train}", "--batch-size", "0"],
            "batch_size: Input should be greater than 0",
        ),
        (["finetune", "{model}", "--data", "{train}", "--recipe", "{evilrecipe}"], "could not be read safely"),
        (["finetune", "{remotecode}", "--data", "{train}"], "pass --trust-remote-code if you trust its author"),
        (["generate", "hi", "--model", "{remotecode}"], "pass --trust-remote-code if you trust its author"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(args, message, cli, tiny_model, corpus, tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "short.txt").write_text("the cat")
    notok = tmp_path / "notok"
    notok.mkdir()
    (notok / "config.json").write_text((tiny_model / "config.json").read_text())
    (tmp_path / "nodata").mkdir()
    (tmp_path / "nodata" / "weights.bin").write_bytes(b"\0" * 10)
    (tmp_path / "bad.jsonl").write_text('{"text": "a cat"}\n{"text": "a dog"\n')
    (tmp_path / "other.jsonl").write_text('{"body": "a cat"}\n')
    (tmp_path / "numbers.jsonl").write_text('{"text": 5}\n{"text": 6}\n')
    # A recipe that would run a shell command if YAML were loaded unsafely.
    (tmp_path / "evil.yaml").write_text(f'lr: !!python/object/apply:os.system ["touch {tmp_path}/pwned"]\n')
    remote = remote_code_model(tiny_model, tmp_path / "remote")
    paths = {
        "model": tiny_model, "train": corpus / "train.txt", "empty": tmp_path / "empty.txt",
        "short": tmp_path / "short.txt", "notokenizer": notok, "corpusdir": corpus, "nodata": tmp_path / "nodata",
        "badjsonl": tmp_path / "bad.jsonl", "othercolumn": tmp_path / "other.jsonl",
        "numbers": tmp_path / "numbers.jsonl", "evilrecipe": tmp_path / "evil.yaml", "remotecode": remote,
    }  # fmt: skip
    r = cli(*[a.format(**paths) for a in args])
    assert r.code == 1
    assert message in r.err
    assert "Traceback" not in r.err + r.out
    lines = r.err.strip().splitlines()  # progress lines may come first; the error is one line, the last
    assert lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1
    assert not list(tmp_path.glob("runs/*"))
    assert not (tmp_path / "pwned").exists()


def remote_code_model(tiny_model, folder):
    """A model folder whose architecture exists only as Python shipped beside it (a hub 'remote code' model)."""
    import shutil

    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="lmtune-test-custom",
        auto_map={"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"},
    )
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text("raise SystemExit('remote code ran')\n")
    return folder


def test_output_inside_the_model_folder_is_refused(cli, tiny_model, corpus):
    r = cli("finetune", tiny_model, "--data", corpus / "train.txt", "--output", tiny_model / "run")
    assert r.code == 1 and "inside the model folder" in r.err


def test_a_folder_of_jsonl_with_its_own_column(quick, tmp_path):
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for i in range(3):
        rows = [{"content": f"the cat {i} sat on the mat number {j} in the warm sun"} for j in range(40)]
        (folder / f"part{i}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run = quick("--text-column", "content", "--max-steps", "2", data=folder)
    docs = [f"the cat {i} sat on the mat number {j} in the warm sun" for i in range(3) for j in range(40)]
    held = sum(data.held_out(docs, 5))  # 5% held out by a hash of each document: about 6
    assert read_json(run / "summary.json")["documents"] == 120 - held and 1 <= held <= 15


def test_model_can_be_given_as_a_flag(cli, tiny_model, corpus, tmp_path):
    out = tmp_path / "out"
    r = cli(
        "finetune",
        "--model",
        tiny_model,
        "--data",
        corpus / "train.txt",
        "--output",
        out,
        "--max-steps",
        "1",
        "--block-size",
        "32",
    )
    assert r.code == 0, r.err
    assert read_json(out / "summary.json")["model"] == str(tiny_model)


def test_validation_percent_is_used_without_validation_data(quick, tmp_path):
    path = write_paragraphs(tmp_path / "d.txt", 100, seed=5)
    summary = read_json(quick("--validation-percent", "10", "--max-steps", "1", data=path) / "summary.json")
    held = sum(data.held_out(data.split_txt(path.read_text(), "paragraph"), 10))  # about 10, by hash
    assert summary["validation_documents"] == held and "10% of the documents" in summary["validation"]


def test_error_text_is_printed_literally(cli, tiny_model):
    r = cli("finetune", tiny_model, "--data", "data[bold]x.txt")
    assert r.code == 1 and "no such file: data[bold]x.txt" in r.err
