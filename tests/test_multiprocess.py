"""`accelerate launch --num_processes 2 --cpu -m lmtune finetune ...`: two real processes, one result."""

import pytest
from conftest import read_json, two_cpu_processes

ARGS = ["--block-size", "32", "--batch-size", "4", "--max-steps", "4", "--mixed-precision", "no", "--lr", "1e-3"]


@pytest.mark.slow
def test_two_cpu_processes_train_one_model_and_gather_metrics(cli, tiny_model, corpus, tmp_path, lmtune_home):
    data = ["--data", str(corpus / "train.txt"), "--validation-data", str(corpus / "valid.txt")]
    single = tmp_path / "single"
    assert cli("finetune", tiny_model, *data, *ARGS, "--output", single).code == 0

    double = tmp_path / "double"
    args = ["finetune", tiny_model, *data, *ARGS, "--output", double]
    proc = two_cpu_processes(args, lmtune_home, port=29517)
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = read_json(single / "summary.json"), read_json(double / "summary.json")
    assert two["processes"] == 2
    # Each optimizer step takes a micro-batch from each process: twice the tokens per step.
    assert two["tokens_per_step"] == 2 * one["tokens_per_step"]
    assert two["train_tokens"] == 4 * 2 * 4 * 32
    # Evaluation is split between the processes and summed: the same tokens, the same base loss.
    assert two["eval_tokens"] == one["eval_tokens"]
    assert two["base_eval_loss"] == pytest.approx(one["base_eval_loss"], rel=1e-6)
    assert two["eval_loss"] < two["base_eval_loss"]
    # Only the main process wrote the run folder, and it is complete.
    assert (double / "model.safetensors").is_file()
    assert len((double / "metrics.jsonl").read_text().splitlines()) == len(
        (single / "metrics.jsonl").read_text().splitlines()
    )
