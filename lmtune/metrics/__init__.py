"""lmtune's own `evaluate` metrics for answers, which need no network: exact match, ROUGE-L and BLEU.

Each file here is an `evaluate` module (one `evaluate.Metric` subclass), built on the libraries the hub's
own metrics use (rouge_score, sacrebleu): `evaluate.load("<this folder>/rouge_l.py")` loads one as it loads
any metric script, offline. lmtune makes them directly (`answers.load_metric`).
"""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
SHIPPED = ("exact_match", "rouge_l", "bleu")  # the module names: FOLDER / f"{name}.py"
