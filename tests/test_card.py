"""The run folder explains itself: a model card and training curves, and it works in a plain pipeline."""

import json

from conftest import run_summary

from lmtune.card import model_card
from lmtune.config import Config


def test_run_folder_has_a_model_card_and_curves(finetuned):
    summary = json.loads((finetuned / "summary.json").read_text())
    card = (finetuned / "README.md").read_text()
    header = card.split("---")[1]
    assert "library_name: transformers" in header and "pipeline_tag: text-generation" in header
    assert "base_model" not in header  # a local folder is no hub id
    assert f"| before | {summary['base_eval_loss']:.4f} | {summary['base_eval_perplexity']:.2f} |" in card
    assert f"| after | {summary['eval_loss']:.4f} | {summary['eval_perplexity']:.2f} |" in card
    assert "| `block_size` | `32` |" in card and "`seed`" not in card  # non-default settings only
    assert (finetuned / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_card_names_hub_base_model_and_dataset(tmp_path):
    summary = run_summary()
    card = model_card(tmp_path / "gpt2-wt", Config(model="gpt2", data="wikitext"), summary)
    assert "base_model: gpt2" in card and "- Salesforce/wikitext" in card


def test_a_run_folder_works_in_a_transformers_pipeline(finetuned):
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(finetuned))
    out = generate("The cat", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert out.startswith("The cat") and len(out) > len("The cat")


def test_eval_writes_a_bar_chart_of_several_models(cli, finetuned, tiny_model, corpus, tmp_path):
    import matplotlib.image

    chart = tmp_path / "ppl.png"
    r = cli("eval", finetuned, tiny_model, "--data", corpus / "valid.txt", "--chart", chart, "--json")
    assert r.code == 0, r.err
    assert len(json.loads(r.out)) == 2
    height, width, _ = matplotlib.image.imread(chart).shape
    assert width > height > 100  # a real image, wider than tall
    assert not list(tmp_path.glob(".ppl*"))  # written aside and renamed
    bad = cli("eval", finetuned, "--chart", tmp_path / "ppl.txt")
    assert bad.code == 1 and "name a .png, .svg or .pdf file" in bad.err


def test_the_card_shows_names_not_local_paths(finetuned, tiny_model, corpus, tmp_path_factory):
    card = (finetuned / "README.md").read_text()
    assert str(tmp_path_factory.getbasetemp()) not in card  # no home folder, no user name
    assert f"fine-tuned from `{tiny_model.name}` on `train.txt`" in card
    assert "| `data` | `train.txt` |" in card and "| `validation_data` | `valid.txt` |" in card
    assert "On valid.txt (" in card


def test_a_held_out_share_is_named_by_the_data_file_name(tmp_path):
    data = str(tmp_path / "home" / "alice" / "corpus.txt")
    summary = run_summary(validation=f"5% of the documents of {data}, held out")
    card = model_card(tmp_path / "run", Config(model=str(tmp_path / "base"), data=data), summary)
    assert str(tmp_path) not in card
    assert "On 5% of the documents of corpus.txt, held out" in card and "fine-tuned from `base`" in card
