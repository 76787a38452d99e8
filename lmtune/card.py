"""What a person reads in a run folder: `README.md` (a Hugging Face model card) and `curves.png`."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from lmtune import atomic, runs
from lmtune.config import Config, build
from lmtune.errors import LmtuneError
from lmtune.model import looks_local

PATH_KEYS = ("model", "tokenizer", "data", "validation_data")  # config keys that may hold local paths


def local_names(values: dict[str, Any]) -> dict[str, str]:
    """Each local path among a config's `values`, mapped to its file or folder name."""
    paths = [v for k in PATH_KEYS if isinstance(v := values.get(k), str) and looks_local(v)]
    if isinstance(values.get("data"), list):  # several sources: each path, and each one's validation
        for d in values["data"]:
            paths += [
                v for v in ([d] if isinstance(d, str) else [d["path"], d.get("validation")]) if v and looks_local(v)
            ]
    return {path: Path(path).name or path for path in paths}


def hide_paths(text: str, names: dict[str, str]) -> str:
    """`text` for others to read: each local path in `names` cut to its name, and the home folder to `~`.

    A run's config.yaml keeps absolute paths so it works from any folder; a card or an upload shows where
    the files lay (home folder, user name) to no one.
    """
    home = str(Path.home())
    for path in sorted(names, key=len, reverse=True):  # a folder's path is the start of its files' paths
        text = text.replace(path, names[path])
    return text.replace(home, "~") if len(Path(home).parts) > 1 else text


def metrics(run: Path) -> list[dict[str, Any]]:
    path = run / runs.METRICS
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(run: Path, base_perplexity: float) -> Path:
    """Training loss, evaluation loss and evaluation perplexity against tokens seen, base model as a line."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    events = metrics(run)
    train = [e for e in events if e["event"] == "train"]
    evals = [e for e in events if e["event"] == "eval"]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([e["tokens"] for e in train], [e["loss"] for e in train], label="training loss", alpha=0.8)
    ax_loss.plot([e["tokens"] for e in evals], [e["eval_loss"] for e in evals], "o-", label="evaluation loss")
    ax_loss.set_xlabel("tokens seen")
    ax_loss.set_ylabel("loss (nats per token)")
    ax_loss.legend()
    ax_ppl.plot([e["tokens"] for e in evals], [e["eval_perplexity"] for e in evals], "o-", label="evaluation")
    ax_ppl.axhline(base_perplexity, color="gray", linestyle="--", label=f"base model ({base_perplexity:,.2f})")
    ax_ppl.set_yscale("log")
    ax_ppl.set_xlabel("tokens seen")
    ax_ppl.set_ylabel("perplexity")
    ax_ppl.legend()
    fig.suptitle(run.name)
    fig.tight_layout()
    path = run / runs.CURVES
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_perplexities(results: list[dict[str, Any]], path: Path) -> Path:
    """A bar chart of the perplexity of each model `lmtune eval` scored, written beside `path` and renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [Path(r["model"]).name or r["model"] for r in results]
    values = [r["perplexity"] for r in results]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(results) + 2), 4))
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:,.2f}" for v in values])
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"on {Path(results[0]['data']).name}, context {results[0]['context']}, stride {results[0]['stride']}")
    ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    with atomic.written_beside(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip(".").lower())
    plt.close(fig)
    return path


def model_card(run: Path, cfg: Config, summary: dict[str, Any], answers: dict[str, Any] | None = None) -> str:
    """A model card in the Hugging Face format: metadata header, results, settings, how to load it.

    `answers`: the scores of `lmtune eval --generate`, shown in the card and in the header's model-index.
    """
    base = cfg.model if cfg.model and not looks_local(cfg.model) else None
    hub = [
        {"wikitext": "Salesforce/wikitext"}.get(d.path, d.path) for d in cfg.data_sources() if not looks_local(d.path)
    ]
    header = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:", "- lmtune"]
    if base:
        header.append(f"base_model: {base}")
    if hub:
        header += ["datasets:", *(f"- {name.split(':')[0]}" for name in hub)]
    if answers:
        header += yaml.safe_dump({"model-index": model_index(run.name, answers)}, sort_keys=False).splitlines()
    header.append("---")
    start = f"fine-tuned from `{cfg.model}`" if cfg.model and not cfg.from_scratch else "trained from scratch"
    settings = {k: v for k, v in cfg.model_dump(exclude={"output"}).items() if v != Config.model_fields[k].default}
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in settings.items())
    card = "\n".join([
        *header,
        "",
        f"# {run.name}",
        "",
        f"A causal language model {start} on {' + '.join(f'`{d.path}`' for d in cfg.data_sources())} with lmtune, "
        f"{summary['steps']} steps, {summary['train_tokens']:,} tokens, {summary['parameters']:,} parameters.",
        "",
        "## Results",
        "",
        f"On {summary['validation']} ({summary['eval_tokens']:,} tokens scored, context {summary['block_size']}):",
        "",
        "| | loss | perplexity | bits per byte |",
        "| --- | --- | --- | --- |",
        f"| before | {summary['base_eval_loss']:.4f} | {summary['base_eval_perplexity']:.2f} | "
        f"{summary['base_eval_bits_per_byte']:.4f} |",
        f"| after | {summary['eval_loss']:.4f} | {summary['eval_perplexity']:.2f} | {summary['eval_bits_per_byte']:.4f} |",
        "",
        *source_table(summary.get("sources", [])),
        *preference_table(summary),
        f"![training curves]({runs.CURVES})",
        "",
        *(answers_section(answers, run) if answers else []),
        "## Settings",
        "",
        "Everything not listed is lmtune's default; `config.yaml` holds every key.",
        "",
        "| key | value |",
        "| --- | --- |",
        rows,
        "",
        f"Precision {summary['mixed_precision']}, {summary['processes']} process(es), "
        f"{summary['tokens_per_second']:,.0f} tokens/s over {summary['train_seconds']:.0f} s of training.",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'generate = pipeline("text-generation", model="{run.name}")  # the folder, or its hub repo',
        'print(generate("Hello, my dog", max_new_tokens=40)[0]["generated_text"])',
        "```",
        "",
        f'or `lmtune generate "Hello, my dog" --model {run.name}`; repeat the run with '
        f"`lmtune finetune --recipe {run.name}/config.yaml`.",
        "",
    ])  # fmt: skip
    # The model, the data and the validation source are absolute paths by now: names only, in all three places.
    return hide_paths(card, local_names(cfg.model_dump()))


def preference_table(summary: dict[str, Any]) -> list[str]:
    """Preference tuning (DPO): its figures on the held-out pairs (the loss above: of the chosen answers)."""
    if "eval_dpo_loss" not in summary:
        return []
    return [
        f"Trained with DPO (beta {summary['beta']:g}) against {summary['reference']}; on the held-out pairs "
        "(before training the model is its own reference: DPO loss log 2 = 0.6931 and reward accuracy 0.5):",
        "",
        "| DPO loss | reward accuracy | reward margin | log-prob per token, chosen | rejected |",
        "| --- | --- | --- | --- | --- |",
        f"| {summary['eval_dpo_loss']:.4f} | {summary['eval_reward_accuracy']:.3f} | {summary['eval_reward_margin']:+.4f} | "
        f"{summary['eval_chosen_logp']:.4f} | {summary['eval_rejected_logp']:.4f} |",
        "",
    ]


def source_table(sources: list[dict[str, Any]]) -> list[str]:
    """Several sources: each one's share, tokens trained on and final scores (the table above is their whole)."""
    if len(sources) < 2:
        return []
    rows = [
        f"| {s['name']} | {100 * s['share']:.1f}% | {s['train_tokens']:,} | {s['eval_loss']:.4f} | {s['eval_perplexity']:.2f} |"
        for s in sources
    ]
    return [
        "By source:",
        "",
        "| source | share | tokens trained on | loss | perplexity |",
        "| --- | --- | --- | --- | --- |",
        *rows,
        "",
    ]


def model_index(name: str, answers: dict[str, Any]) -> list[dict[str, Any]]:
    """The answers' scores as the hub's model-index (its evaluation results), through huggingface_hub."""
    from huggingface_hub import EvalResult
    from huggingface_hub.repocard_data import eval_results_to_model_index

    results = [
        EvalResult(
            task_type="text-generation", task_name="Text Generation", dataset_type=answers["dataset"],
            dataset_name=answers["dataset"], metric_type=key, metric_name=key, metric_value=round(value, 4),
        )
        for key, value in answers["metrics"].items()
    ]  # fmt: skip
    return eval_results_to_model_index(name, results)


def answers_section(answers: dict[str, Any], run: Path) -> list[str]:
    """The card's lines for the scores of `lmtune eval --generate`."""
    rows = [f"| {key} | {value:.4f} |" for key, value in answers["metrics"].items()]
    written = Path(answers["predictions"])
    where = f"; the answers are in `{written.name}`" if written.parent.resolve() == run.resolve() else ""
    return [
        "## Answers",
        "",
        f"`lmtune eval --generate` answered the last user turn of {answers['conversations']:,} conversations of "
        f"{answers['dataset']} ({answers['generation']}){where}.",
        "",
        "| metric | value |",
        "| --- | --- |",
        *rows,
        "",
    ]


def write_answers(run: Path, answers: dict[str, Any]) -> Path:
    """The run's model card written again with the answers' scores in it."""
    summary = json.loads((run / runs.SUMMARY).read_text())
    path = run / runs.CARD
    with atomic.written_beside(path) as tmp:
        tmp.write_text(model_card(run, build(str(run / runs.CONFIG)), summary, answers))
    return path


def check_chart(chart: Path) -> None:
    """Fail before the evaluation, not after it, when --chart cannot be written."""
    if chart.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise LmtuneError(f"--chart {chart}: name a .png, .svg or .pdf file")
    if not chart.parent.is_dir():
        raise LmtuneError(f"--chart {chart}: folder {chart.parent} does not exist")
    if chart.is_dir():
        raise LmtuneError(f"--chart {chart} is a folder; name an image file, e.g. {chart / 'perplexity.png'}")
    if reason := atomic.cannot_write_in(chart.parent):
        raise LmtuneError(f"--chart {chart}: cannot write in {chart.parent} ({reason}); choose another folder")
    if chart.exists() and not os.access(chart, os.W_OK):
        raise LmtuneError(f"--chart {chart}: the file is read-only; choose another name")
