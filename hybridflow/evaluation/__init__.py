"""Evaluation: bits/dim, accuracy and calibration, OOD detection metrics, baselines."""

from .baselines import categorical_bits_per_dim, uniform_bits_per_dim
from .evaluate import Predictions, evaluate_predictions, ood_scores, ood_table, predict
from .metrics import (
    OOD_METRIC_DESCRIPTIONS,
    accuracy,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    ood_metrics,
)

__all__ = [
    "OOD_METRIC_DESCRIPTIONS",
    "Predictions",
    "accuracy",
    "brier_score",
    "categorical_bits_per_dim",
    "classification_metrics",
    "evaluate_predictions",
    "expected_calibration_error",
    "negative_log_likelihood",
    "ood_metrics",
    "ood_scores",
    "ood_table",
    "predict",
    "uniform_bits_per_dim",
]
