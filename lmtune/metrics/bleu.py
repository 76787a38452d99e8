"""BLEU: sacreBLEU's corpus BLEU of the answers against their references (0 to 100), with its defaults:
13a tokenization, case kept, exponential smoothing, n-grams up to 4. Answers that are all shorter than
four words score 0 by definition; exact match and ROUGE-L say more about those.
"""

import logging

import datasets
import evaluate
import sacrebleu

log = logging.getLogger("lmtune")


class Bleu(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__ or "",
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018",
            inputs_description="predictions, references: lists of strings, one reference per prediction",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        result = sacrebleu.BLEU().corpus_score(predictions, [references])  # one stream of references
        if result.totals[-1] == 0:
            log.warning("BLEU is 0 by definition here: no answer is four words long (use exact_match or rouge_l)")
        return {"bleu": float(result.score)}
