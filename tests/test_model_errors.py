"""A model folder that is damaged gets one line naming the file and the fix, not a library's riddle."""

import json
import shutil


def broken_copy(tiny_model, tmp_path):
    folder = tmp_path / "base"
    shutil.copytree(tiny_model, folder)
    return folder


def test_a_truncated_weights_file_is_named(cli, tiny_model, corpus, tmp_path):
    folder = broken_copy(tiny_model, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # an interrupted copy
    for args in (["finetune", folder, "--data", corpus / "train.txt", "--output", tmp_path / "run"],
                 ["generate", "Hello", "--model", folder]):  # fmt: skip
        r = cli(*args)
        assert r.code == 1 and r.err.count("\n") == 1, r.err
        assert f"cannot load model from {folder}: model.safetensors is damaged or incomplete (" in r.err
        assert "copy it again" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "run").exists()


def test_a_config_that_does_not_fit_the_weights_names_the_first_mismatch(cli, tiny_model, corpus, tmp_path):
    folder = broken_copy(tiny_model, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "n_embd": 64}))  # weights are 32 wide
    r = cli("finetune", folder, "--data", corpus / "train.txt", "--output", tmp_path / "run")
    assert r.code == 1 and r.err.count("\n") == 1, r.err
    vocab = config["vocab_size"]
    assert (
        f"config.json does not match the weights in {folder}: transformer.wte.weight is [{vocab}, 32] in the "
        f"weights but config.json makes it [{vocab}, 64]"
    ) in r.err
    assert "look at the above report" not in r.err
