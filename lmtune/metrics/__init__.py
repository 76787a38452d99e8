"""lmtune's own `evaluate` metrics for answers, which need no network: exact match, ROUGE-L and BLEU.

Each file here is an `evaluate` module (one `evaluate.Metric` subclass), built on the libraries the hub's
own metrics use (rouge_score, sacrebleu): `evaluate.load("<this folder>/rouge_l.py")` loads one as it loads
any metric script, offline. lmtune makes them directly (`answers.load_metric`).
"""

import importlib
from pathlib import Path
from typing import Any

FOLDER = Path(__file__).resolve().parent
# The one table of lmtune's own metrics: name (its module, FOLDER / f"{name}.py") -> its evaluate.Metric class.
# A new metric is a file here and a line in this table; `--metric`'s help and the default list read it.
SHIPPED = {"exact_match": "ExactMatch", "rouge_l": "RougeL", "bleu": "Bleu"}


def own_metric(name: str, **kwargs: Any) -> Any:
    """lmtune's metric `name`, made directly (as evaluate.load would make it from its script)."""
    return getattr(importlib.import_module(f"lmtune.metrics.{name}"), SHIPPED[name])(**kwargs)
