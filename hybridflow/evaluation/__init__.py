"""Evaluation: bits/dim, accuracy and calibration, OOD scores and metrics, samples, baselines.

Attributions live in :mod:`hybridflow.evaluation.attribution` (imported on demand: captum).
"""

from .baselines import categorical_bits_per_dim, uniform_bits_per_dim
from .calibration import (
    adaptive_calibration_error,
    apply_temperature,
    calibration_metrics,
    classwise_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    plot_reliability_diagram,
    reliability_bins,
)
from .evaluate import Predictions, evaluate_predictions, ood_scores, ood_table, predict
from .fid import FID_FEATURES, fid_feature_network, frechet_distance
from .metrics import (
    OOD_METRIC_DESCRIPTIONS,
    accuracy,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    ood_metrics,
    selective_accuracy,
)
from .ood import (
    OOD_SCORE_DESCRIPTIONS,
    FisherCombination,
    MahalanobisDetector,
    TypicalityTest,
    bpd_score,
    complexity_score,
    conformal_p_values,
    energy_score,
    likelihood_ratio_score,
    max_softmax_score,
    nll_score,
    png_bits_per_dim,
)
from .samples import DEFAULT_TEMPERATURES, reconstruct, sample_at_temperatures, save_image_grid

__all__ = [
    "DEFAULT_TEMPERATURES",
    "FID_FEATURES",
    "OOD_METRIC_DESCRIPTIONS",
    "OOD_SCORE_DESCRIPTIONS",
    "FisherCombination",
    "MahalanobisDetector",
    "Predictions",
    "TypicalityTest",
    "accuracy",
    "adaptive_calibration_error",
    "apply_temperature",
    "bpd_score",
    "brier_score",
    "calibration_metrics",
    "categorical_bits_per_dim",
    "classification_metrics",
    "classwise_calibration_error",
    "complexity_score",
    "conformal_p_values",
    "energy_score",
    "evaluate_predictions",
    "expected_calibration_error",
    "fid_feature_network",
    "fit_temperature",
    "frechet_distance",
    "likelihood_ratio_score",
    "max_softmax_score",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "nll_score",
    "ood_metrics",
    "ood_scores",
    "ood_table",
    "plot_reliability_diagram",
    "png_bits_per_dim",
    "predict",
    "reconstruct",
    "reliability_bins",
    "sample_at_temperatures",
    "save_image_grid",
    "selective_accuracy",
    "uniform_bits_per_dim",
]
