"""A run folder in other tools: lm-evaluation-harness loads it with `--model_args pretrained=RUN` (offline,
with a task over a local file; the harness's own tasks download their datasets)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LM_EVAL = shutil.which("lm_eval") or str(Path(sys.executable).with_name("lm_eval"))


@pytest.mark.slow
def test_lm_evaluation_harness_scores_a_run_folder(finetuned, corpus, tmp_path):
    docs = [p for p in (corpus / "valid.txt").read_text().split("\n\n") if p.strip()][:10]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "local.yaml").write_text(
        "task: lmtune_local\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n"
    )
    out = tmp_path / "results"
    cmd = [
        LM_EVAL, "--model", "hf", "--model_args", f"pretrained={finetuned}", "--tasks", "lmtune_local",
        "--include_path", str(tasks), "--device", "cpu", "--batch_size", "4", "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results_file,) = out.rglob("results_*.json")
    scores = json.loads(results_file.read_text())["results"]["lmtune_local"]
    assert 0 < scores["bits_per_byte,none"] < 8 and scores["word_perplexity,none"] > 1
