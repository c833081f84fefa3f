"""Evaluation: SQuAD exact match / F1 (v1.1 and v2 no-answer rules), by context length."""

from littlebird_ds.eval.squad_metrics import (
    evaluate_predictions,
    exact_match_score,
    f1_score,
    length_bucket,
    normalize_answer,
    score_prediction,
)

__all__ = [
    "evaluate_predictions",
    "exact_match_score",
    "f1_score",
    "length_bucket",
    "normalize_answer",
    "score_prediction",
]
