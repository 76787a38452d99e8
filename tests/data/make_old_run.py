"""Make tests/data/old-run with lmtune at commit 86cc91a (before the run was redesigned): a run stopped by
SIGTERM after step 5, and the metrics of the same run never stopped. Run with PYTHONPATH=<old tree>."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, "/work/main/tests")
from conftest import make_tiny_model, write_paragraphs

out = Path(sys.argv[1])
work = Path(sys.argv[2])
shutil.rmtree(out, ignore_errors=True)
shutil.rmtree(work, ignore_errors=True)
work.mkdir(parents=True)
make_tiny_model(work / "tiny")
write_paragraphs(work / "train.txt", 120, seed=1)
write_paragraphs(work / "valid.txt", 20, seed=2)
env = {**os.environ, "LMTUNE_HOME": str(work / "home"), "HF_HUB_OFFLINE": "1"}


def cmd(o, *extra):
    return [
        sys.executable,
        "-m",
        "lmtune",
        "finetune",
        str(work / "tiny"),
        "--data",
        str(work / "train.txt"),
        "--validation-data",
        str(work / "valid.txt"),
        "--output",
        str(o),
        "--block-size",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "12",
        "--lr",
        "1e-3",
        "--log-every",
        "1",
        "--eval-every",
        "4",
        "--save-every",
        "1",
        "--keep-checkpoints",
        "1",
        "--mixed-precision",
        "no",
        *extra,
    ]


subprocess.run(cmd(work / "reference"), env=env, check=True, capture_output=True)
p = subprocess.Popen(cmd(out), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
while True:
    m = out / "metrics.jsonl"
    steps = [json.loads(line).get("step", 0) for line in m.read_text().splitlines()] if m.is_file() else []
    if steps and max(steps) >= 5:
        p.send_signal(signal.SIGTERM)
        break
    time.sleep(0.01)
o, e = p.communicate()
print(p.returncode, e.decode()[-300:])
shutil.copy(work / "reference" / "metrics.jsonl", out / "reference-metrics.jsonl")
