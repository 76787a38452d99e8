"""`lmtune eval --generate`: answers generated for validation conversations and scored with `evaluate` metrics:
lmtune's own exact match, ROUGE-L and BLEU (offline), checked by hand; real runs of the tiny model."""

import json
from pathlib import Path

import pytest
from conftest import learnt_chat_run, run_summary, two_cpu_processes, write_jsonl

from lmtune import answers
from lmtune.metrics import FOLDER, SHIPPED

# Answers of four words or more, so that BLEU has 4-grams to count.
PAIRS = {
    "the sky": "the sun is warm in the morning",
    "the grass": "green grass on the big hill",
    "the cat": "the cat sat on the red mat",
    "the dog": "a small dog ran under the tree",
}


@pytest.fixture(scope="session")
def modules_cache(tmp_path_factory):
    """Where evaluate copies the metric scripts it loads (its HF_MODULES_CACHE), kept out of the home folder."""
    return tmp_path_factory.mktemp("evaluate-modules")


@pytest.fixture(autouse=True)
def evaluate_modules_here(modules_cache, monkeypatch):
    import evaluate.config

    monkeypatch.setattr(evaluate.config, "HF_MODULES_CACHE", modules_cache)


def one_line(err: str) -> bool:
    """The error is one line, the last, with no traceback (progress lines such as "reading X ..." may precede it)."""
    lines = err.strip().splitlines()
    return (
        lines[-1].startswith("error:")
        and sum(line.startswith("error:") for line in lines) == 1
        and "Traceback" not in err
    )


def scores(predictions, references):
    return answers.score({name: answers.load_metric(name) for name in SHIPPED}, predictions, references)


def test_the_shipped_metrics_agree_with_hand_computations():
    # Exact match ignores whitespace at the ends only.
    assert scores(["blue", " green\n", "meow"], ["blue", "green", "woof"])["exact_match"] == pytest.approx(2 / 3)

    # ROUGE-L is the F-measure of the longest common subsequence of words, averaged over answers.
    # "the cat sat on the mat" / "the cat is on the mat": LCS "the cat on the mat", 5 of 6 words each way;
    # "blue sky today" / "the sky is blue": LCS of 1 word, precision 1/3, recall 1/4, F = 2/7.
    f = scores(["the cat sat on the mat", "blue sky today"], ["the cat is on the mat", "the sky is blue"])["rouge_l"]
    assert f == pytest.approx((5 / 6 + 2 / 7) / 2)

    # BLEU of "the cat sat on the mat" against "the cat sat on a mat": clipped n-gram precisions 5/6 ("the"
    # counts once), 3/5, 2/4, 1/3, same length so no brevity penalty; the geometric mean, on sacreBLEU's 0-100.
    bleu = scores(["the cat sat on the mat"], ["the cat sat on a mat"])["bleu"]
    assert bleu == pytest.approx(100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** (1 / 4))
    assert bleu == pytest.approx(53.7285, abs=1e-4)
    assert scores(["the cat sat on the mat"], ["the cat sat on the mat"]) == {
        "exact_match": 1.0, "rouge_l": 1.0, "bleu": pytest.approx(100.0),
    }  # fmt: skip


def test_bleu_says_why_it_is_zero_for_answers_shorter_than_four_words(caplog):
    assert scores(["blue"], ["blue"]) == {"exact_match": 1.0, "rouge_l": 1.0, "bleu": 0.0}
    assert "no answer is four words long" in caplog.text


def test_the_shipped_metrics_are_evaluate_modules_that_load_by_path_offline():
    import evaluate
    from rouge_score import rouge_scorer

    rouge_l = evaluate.load(str(FOLDER / "rouge_l.py"))  # as any metric script is loaded, with no network
    assert isinstance(rouge_l, evaluate.Metric) and rouge_l.name == "rouge_l"
    got = rouge_l.compute(predictions=["a big dog ran"], references=["the big dog ran home"])["rouge_l"]
    assert got == pytest.approx(
        rouge_scorer.RougeScorer(["rougeL"]).score("the big dog ran home", "a big dog ran")["rougeL"].fmeasure
    )
    assert got == pytest.approx(2 * (3 / 4) * (3 / 5) / (3 / 4 + 3 / 5))  # LCS "big dog ran"


def test_the_model_card_carries_the_scores_as_hub_model_index(tmp_path):
    from huggingface_hub import ModelCard

    from lmtune.card import model_card
    from lmtune.config import Config

    summary = run_summary()
    run = tmp_path / "gpt2-alpaca"
    answers = {
        "dataset": "tatsu-lab/alpaca", "conversations": 520, "generation": "greedy, at most 128 new tokens",
        "metrics": {"exact_match": 0.125, "rouge_l": 0.41234567, "bleu": 17.5}, "predictions": str(run / "predictions.jsonl"),
    }  # fmt: skip
    card = ModelCard(
        model_card(run, Config(model="gpt2", data="tatsu-lab/alpaca", data_format="chat"), summary, answers)
    )
    assert card.data.base_model == "gpt2" and card.data.model_name == "gpt2-alpaca"
    assert [
        (e.task_type, e.dataset_type, e.dataset_name, e.metric_type, e.metric_value) for e in card.data.eval_results
    ] == [
        ("text-generation", "tatsu-lab/alpaca", "tatsu-lab/alpaca", "exact_match", 0.125),
        ("text-generation", "tatsu-lab/alpaca", "tatsu-lab/alpaca", "rouge_l", 0.4123),
        ("text-generation", "tatsu-lab/alpaca", "tatsu-lab/alpaca", "bleu", 17.5),
    ]
    assert "last user turn of 520 conversations of tatsu-lab/alpaca (greedy, at most 128 new tokens)" in card.text
    assert "the answers are in `predictions.jsonl`" in card.text and "| rouge_l | 0.4123 |" in card.text


@pytest.fixture
def answers_run(cli, tiny_model, tmp_path):
    """A chat run of the tiny model that has learnt four answers (as tests/test_chat.py's run does)."""
    return learnt_chat_run(cli, tiny_model, tmp_path, PAIRS)


@pytest.mark.slow
def test_eval_generate_scores_a_learnt_set_fully_and_the_base_model_lower(
    cli, answers_run, tiny_model, tmp_path, caplog, lmtune_home
):
    from huggingface_hub import ModelCard

    run, valid = answers_run
    r = cli("eval", run, "--generate", "--json")
    assert r.code == 0, r.err
    result = json.loads(r.out)
    assert result["conversations"] == 4 and result["skipped"] == 0
    assert result["metrics"] == {"exact_match": 1.0, "rouge_l": 1.0, "bleu": pytest.approx(100.0)}
    assert result["generation"] == "greedy, at most 128 new tokens"
    assert result["data"] == f"the validation data of {run} ({valid})"
    # The tiny model's context (64) leaves less than 128 tokens after the prompts: said, and the prompt kept.
    assert "leaves room for" in caplog.text and "keeping the last" not in caplog.text

    # predictions.jsonl in the run folder: the user turn, the data's answer, the model's.
    lines = [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()]
    assert result["predictions"] == str(run / "predictions.jsonl")
    assert lines == [{"prompt": k, "reference": v, "prediction": v} for k, v in PAIRS.items()]

    # The model card shows the figures, and the hub reads them from its model-index.
    card = ModelCard.load(run / "README.md")
    found = {e.metric_type: e.metric_value for e in card.data.eval_results}
    assert found == {"exact_match": 1.0, "rouge_l": 1.0, "bleu": 100.0}
    assert {(e.task_type, e.dataset_type) for e in card.data.eval_results} == {("text-generation", "valid.jsonl")}
    assert card.data.model_name == run.name
    assert "| exact_match | 1.0000 |" in card.text and "answered the last user turn of 4 conversations" in card.text
    assert "| after |" in card.text  # the training results are still there
    assert str(tmp_path) not in card.content  # names, not local paths

    # The base model, answering in lmtune's simple template (--chat), beside the run in one table.
    folder = tmp_path / "answers"
    folder.mkdir()
    r = cli("eval", run, tiny_model, "--generate", "--chat", "--predictions", folder)
    assert r.code == 0, r.err
    assert "Answers to 4 conversations of the validation data of" in r.out
    assert all(key in r.out for key in ("exact_match", "rouge_l", "bleu", "1.0000", "100.0000"))
    assert "answers in" in r.out and "scores added to its model card" in r.out
    r = cli("eval", run, tiny_model, "--generate", "--chat", "--predictions", folder, "--json")
    mine, base = json.loads(r.out)
    assert mine["metrics"] == result["metrics"] and mine["predictions"] == str(folder / "predictions-chat-run.jsonl")
    assert base["metrics"]["exact_match"] < 1 and base["metrics"]["rouge_l"] < 1 and base["metrics"]["bleu"] < 100
    assert base["predictions"] == str(folder / f"predictions-{tiny_model.name}.jsonl") and "card" not in base

    # Two processes (accelerate launch) answer two conversations each; the first scores all four and writes.
    (run / "predictions.jsonl").unlink()
    proc = two_cpu_processes(["eval", run, "--generate", "--json"], lmtune_home, port=29533)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["metrics"] == result["metrics"]  # printed once, by the first process
    assert [json.loads(line) for line in (run / "predictions.jsonl").read_text().splitlines()] == lines
    assert "answering with" in proc.stderr and "(2)" in proc.stderr  # each process answered two
    base_lines = (folder / f"predictions-{tiny_model.name}.jsonl").read_text().splitlines()
    assert len(base_lines) == 4 and not list(tiny_model.glob("predictions*"))  # never into the base's folder


def test_eval_generate_with_data_and_a_local_metric_script(cli, tiny_model, tmp_path):
    """--data chat JSONL on a model that was not trained on chat (--chat); --metric PATH goes to evaluate.load."""
    script = tmp_path / "answer_words.py"
    script.write_text(
        "import datasets\nimport evaluate\n\n\n"
        "class AnswerWords(evaluate.Metric):\n"
        "    def _info(self):\n"
        "        features = datasets.Features({'predictions': datasets.Value('string'), 'references': datasets.Value('string')})\n"
        "        return evaluate.MetricInfo(description='words per answer', citation='', features=features)\n\n"
        "    def _compute(self, predictions, references):\n"
        "        return {'words': sum(len(p.split()) for p in predictions) / len(predictions), 'note': 'not a number'}\n"
    )
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"prompt": k, "response": v} for k, v in PAIRS.items()])
    r = cli(
        "eval", tiny_model, "--generate", "--chat", "--data", valid, "--metric", script, "--metric", "exact_match",
        "--predictions", tmp_path, "--max-new-tokens", "5", "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    result = json.loads(r.out)
    lines = Path(result["predictions"]).read_text().splitlines()
    predictions = [json.loads(line)["prediction"] for line in lines]
    assert result["metrics"] == {
        "words": pytest.approx(sum(len(p.split()) for p in predictions) / 4),
        "exact_match": 0.0,
    }
    assert result["generation"] == "greedy, at most 5 new tokens" and "card" not in result


def test_a_metric_that_cannot_be_loaded_offline_is_one_line_before_any_answer(cli, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(answers, "answer_everywhere", lambda *a, **k: pytest.fail("answered before the metric loaded"))
    valid = write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "the sky", "response": "blue"}])
    r = cli("eval", tiny_model, "--generate", "--chat", "--data", valid, "--metric", "rouge")
    assert r.code == 1 and one_line(r.err), r.err
    assert "cannot load metric `rouge`" in r.err and "HF_HUB_OFFLINE is set" in r.err
    assert "offline (exact_match, rouge_l, bleu)" in r.err
    r = cli("eval", tiny_model, "--generate", "--chat", "--data", valid, "--metric", tmp_path / "missing.py")
    assert r.code == 1 and one_line(r.err) and f"cannot load metric script {tmp_path / 'missing.py'}" in r.err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--generate", "--stride", "4"], "--stride is for the perplexity and --generate scores answers"),
        (["--generate", "--chart", "x.png"], "--chart is for the perplexity"),
        (["--metric", "bleu"], "--metric is for answers, which --generate scores; add --generate"),
        (["--temperature", "0.5"], "--temperature is for answers"),
        (["--generate"], "was not trained on chat data; pass --chat"),
        (["--generate", "--chat", "--data", "{corpus}/valid.txt"], "is plain text; chat data is JSONL"),
        (["--generate", "--chat", "--predictions", "{tmp}/nowhere"], "--predictions {tmp}/nowhere: no such folder"),
        (["--generate", "--chat"], "none of these models is a run folder with its own validation data; pass --data"),
    ],
)
def test_bad_answer_options_give_one_line(cli, tiny_model, corpus, tmp_path, args, message):
    args = [a.format(corpus=corpus, tmp=tmp_path) for a in args]
    if "--data" not in args and "not trained on chat" in message:
        args += ["--data", str(write_jsonl(tmp_path / "v.jsonl", [{"prompt": "a", "response": "b"}]))]
    r = cli("eval", tiny_model, *args)
    assert r.code == 1 and message.format(tmp=tmp_path) in r.err, r.err
    assert one_line(r.err), r.err


def test_questions_are_the_last_user_turn_with_the_turns_before_it(tiny_model):
    from lmtune.model import load_tokenizer

    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "the cat"},
        {"role": "assistant", "content": "sat"},
        {"role": "user", "content": "the dog"},
        {"role": "assistant", "content": "ran"},
    ]
    unanswered = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": " "}]
    qs, skipped = answers.questions([conv, unanswered], "test")
    assert skipped == 1 and len(qs) == 1
    assert qs[0].messages == conv[:4] and qs[0].reference == "ran"
    tok = load_tokenizer(str(tiny_model))
    # The prompt is the conversation so far in the template training used, ending where the answer starts.
    assert answers.prompt_text(tok, qs[0].messages) == (
        f"Be brief.\n\n### Instruction:\nthe cat\n\n### Response:\nsat{tok.eos_token}"
        "### Instruction:\nthe dog\n\n### Response:\n"
    )


def test_a_runs_validation_conversations_are_the_ones_training_held_out(tiny_model, tmp_path):
    """No --validation-data: the held-out share, as data.build_corpus chose it (same count, same texts)."""
    from lmtune import data
    from lmtune.config import Config
    from lmtune.model import load_tokenizer

    rows = [{"prompt": f"the {w} {i}", "response": f"{w} {i}"} for i, w in enumerate(["cat", "dog", "sun"] * 20)]
    cfg = Config(data=str(write_jsonl(tmp_path / "train.jsonl", rows)), validation_percent=10)
    tok = load_tokenizer(str(tiny_model))
    corpus = data.load_corpus(cfg, tok, lambda e: None)
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())  # a run folder written before data plans: decided again
    held, _ = answers.validation_conversations(tmp_path)
    assert 0 < len(held) == corpus.validation.documents < len(rows)
    encoded = data.encode(held, tok, lambda e: None, "t").split(
        range(len(held)), tok.eos_token_id, corpus.validation.ids.dtype
    )
    assert encoded.ids.tolist() == corpus.validation.ids.tolist()  # the same conversations, in the same order
