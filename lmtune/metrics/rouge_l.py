"""ROUGE-L: the F-measure of the longest common subsequence of words, answer against reference, averaged
over answers (0 to 1). rouge_score's own tokenizer, as in published ROUGE figures: lower-cased, words of
the letters a-z and digits only (text in other scripts scores 0), no stemming.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer


class RougeL(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__ or "",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004",
            inputs_description="predictions, references: lists of strings, one reference per prediction",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        scorer = rouge_scorer.RougeScorer(["rougeL"])
        # The plain mean: the hub's `rouge` reports a bootstrap resample's median by default, which moves
        # with the random seed.
        scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
        return {"rouge_l": sum(scores) / len(scores)}
