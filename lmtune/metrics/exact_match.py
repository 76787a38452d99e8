"""Exact match: the share of answers equal to their reference, whitespace at either end ignored (0 to 1)."""

import datasets
import evaluate


class ExactMatch(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__ or "",
            citation="",
            inputs_description="predictions, references: lists of strings, one reference per prediction",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        # A generated answer ends where the model wrote EOS; a trailing newline or space is not a wrong answer.
        same = [p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(same) / len(same)}
