"""Tests for hybridflow.evaluation.calibration: hand-computed binned errors, temperature
scaling on synthetic over-/under-confident models, and the reliability diagram."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from hybridflow.evaluation.calibration import (
    __all__ as calibration_all,
)
from hybridflow.evaluation.calibration import (
    adaptive_calibration_error,
    apply_temperature,
    calibration_metrics,
    classwise_calibration_error,
    fit_temperature,
    maximum_calibration_error,
    plot_reliability_diagram,
    reliability_bins,
)
from hybridflow.evaluation.metrics import (
    _softmax,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _sample_labels(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from the categorical distribution ``probs[i]``."""
    u = rng.random(probs.shape[0])
    # Index of the first cumulative probability >= u; min() guards against cumsum rounding < 1.
    return np.minimum((probs.cumsum(axis=1) < u[:, None]).sum(axis=1), probs.shape[1] - 1)


# --------------------------------------------------------------------------------------------
# Hand-computed binned calibration errors
# --------------------------------------------------------------------------------------------

# Four 3-class predictions; with n_bins=4 the bins are (0,.25], (.25,.5], (.5,.75], (.75,1].
#   ex  probs            label  pred  conf  correct  equal-width bin
#   1   [.9, .05, .05]   0      0     .9    1        3
#   2   [.8, .1, .1]     1      0     .8    0        3
#   3   [.4, .3, .3]     0      0     .4    1        1
#   4   [.45, .35, .2]   1      0     .45   0        1
HAND_PROBS = np.array([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.4, 0.3, 0.3], [0.45, 0.35, 0.2]])
HAND_LABELS = np.array([0, 1, 0, 1])


def test_equal_width_ece_and_mce_hand_case() -> None:
    # bin 1: acc 1/2, conf .425 -> gap .075, weight 2/4 -> .0375
    # bin 3: acc 1/2, conf .85  -> gap .35,  weight 2/4 -> .175
    # ECE = .2125, MCE = max(.075, .35) = .35
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=4) == pytest.approx(0.2125)
    assert maximum_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=4) == pytest.approx(0.35)


def test_adaptive_ece_hand_case() -> None:
    # Sorted confidences: .4 (c), .45 (w), .8 (w), .9 (c).
    # 2 equal-mass bins = {.4, .45}, {.8, .9}: the same groups as equal-width -> .2125.
    assert adaptive_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=2) == pytest.approx(0.2125)
    # 4 equal-mass bins = singletons: (|1-.4| + |0-.45| + |0-.8| + |1-.9|) / 4 = 1.95/4 = .4875.
    assert adaptive_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=4) == pytest.approx(0.4875)
    # N=4 < n_bins=15 -> 4 bins, i.e. the singleton case again.
    assert adaptive_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=15) == pytest.approx(0.4875)


def test_adaptive_ece_differs_from_equal_width() -> None:
    # 2-class, confidences .55 (w), .6 (c), .9 (c), .95 (c); n_bins=2.
    # Equal width: all in (.5, 1]: acc .75, conf (.55+.6+.9+.95)/4 = .75 -> ECE 0.
    # Equal mass: {.55 w, .6 c}: acc .5, conf .575 -> .075; {.9, .95}: acc 1, conf .925 -> .075;
    # AdaECE = 1/2 * .075 + 1/2 * .075 = .075.
    probs = np.array([[0.55, 0.45], [0.6, 0.4], [0.9, 0.1], [0.95, 0.05]])
    labels = np.array([1, 0, 0, 0])
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.0, abs=1e-12)
    assert adaptive_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.075)
    # MCE over the single non-empty bin is 0 as well.
    assert maximum_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.0, abs=1e-12)


def test_classwise_ece_hand_case() -> None:
    # 3 classes, n_bins=2: bins (0,.5], (.5,1]. Per bin |sum 1[y=k] - sum p_k| / N, N = 4.
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]])
    labels = np.array([0, 1, 2, 1])
    # class 0: p = .7 .6 .2 .1, y=0: 1 0 0 0. high {1,2}: |1 - 1.3| = .3; low {3,4}: |0 - .3| = .3
    #          -> .6/4 = .15
    # class 1: p = .2 .3 .2 .8, y=1: 0 1 0 1. low {1,2,3}: |1 - .7| = .3; high {4}: |1 - .8| = .2
    #          -> .5/4 = .125
    # class 2: p = .1 .1 .6 .1, y=2: 0 0 1 0. low {1,2,4}: |0 - .3| = .3; high {3}: |1 - .6| = .4
    #          -> .7/4 = .175
    # mean = (.15 + .125 + .175) / 3 = .15
    assert classwise_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.15)
    # A single bin per class: |count_k - sum_i p_ik| / N = |1-1.6|, |2-1.5|, |1-.9| over 4
    # -> (.15 + .125 + .025) / 3 = .1
    assert classwise_calibration_error(probs, labels, n_bins=1) == pytest.approx(0.1)


def test_perfectly_calibrated_data_has_small_errors() -> None:
    rng = np.random.default_rng(1)
    probs = _softmax(2.0 * rng.normal(size=(20_000, 5)))
    labels = _sample_labels(probs, rng)
    assert expected_calibration_error(probs, labels) < 0.02
    assert adaptive_calibration_error(probs, labels) < 0.02
    assert classwise_calibration_error(probs, labels) < 0.02
    # The same probabilities with permuted labels are badly calibrated (guards against a
    # metric that is trivially small).
    shuffled = rng.permutation(labels)
    assert adaptive_calibration_error(probs, shuffled) > 0.1
    assert classwise_calibration_error(probs, shuffled) > 0.02


def test_binned_metrics_reject_bad_inputs() -> None:
    with pytest.raises(ValueError):
        adaptive_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=0)
    with pytest.raises(ValueError):
        classwise_calibration_error(HAND_PROBS, np.array([0, 1, 3, 0]))
    with pytest.raises(ValueError):
        maximum_calibration_error(HAND_PROBS[:0], HAND_LABELS[:0])


# --------------------------------------------------------------------------------------------
# Reliability bins
# --------------------------------------------------------------------------------------------


def test_reliability_bins_counts_and_empty_bins() -> None:
    bins = reliability_bins(HAND_PROBS, HAND_LABELS, n_bins=4)
    np.testing.assert_allclose(bins["edges"], [0.0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_array_equal(bins["count"], [0, 2, 0, 2])
    assert bins["count"].sum() == HAND_PROBS.shape[0]
    for key in ("confidence", "accuracy"):
        assert np.isnan(bins[key][[0, 2]]).all()
    np.testing.assert_allclose(bins["confidence"][[1, 3]], [0.425, 0.85])
    np.testing.assert_allclose(bins["accuracy"][[1, 3]], [0.5, 0.5])


def test_reliability_bins_consistent_with_ece_and_mce() -> None:
    rng = np.random.default_rng(2)
    probs = torch.from_numpy(_softmax(3.0 * rng.normal(size=(500, 4))))
    labels = torch.from_numpy(rng.integers(0, 4, size=500))
    bins = reliability_bins(probs, labels, n_bins=10)
    assert bins["count"].sum() == 500
    full = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][full] - bins["confidence"][full])
    ece = float((bins["count"][full] / 500 * gaps).sum())
    assert ece == pytest.approx(expected_calibration_error(probs, labels, n_bins=10))
    assert gaps.max() == pytest.approx(maximum_calibration_error(probs, labels, n_bins=10))


def _naive_binned_errors(probs: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, float]:
    """ECE, MCE and classwise ECE by explicit loops over the intervals ``(b/M, (b+1)/M]``
    (0 itself in the first), as Guo et al. 2017 (eqs. 3 and 5) and Kull et al. 2019 define them."""
    n, c = probs.shape

    def members(values: np.ndarray, b: int) -> np.ndarray:
        lo, hi = b / n_bins, (b + 1) / n_bins
        return ((values > lo) | ((b == 0) & (values == 0))) & (values <= hi)

    conf = probs.max(1)
    correct = probs.argmax(1) == labels
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        m = members(conf, b)
        if m.any():
            gap = abs(correct[m].mean() - conf[m].mean())
            ece += m.sum() / n * gap
            mce = max(mce, gap)
    classwise = 0.0
    for k in range(c):
        for b in range(n_bins):
            m = members(probs[:, k], b)
            if m.any():
                classwise += m.sum() / n * abs((labels[m] == k).mean() - probs[m, k].mean())
    return {"ece": ece, "mce": mce, "classwise_ece": classwise / c}


@pytest.mark.parametrize("n_bins", [15, 7])
def test_calibration_metrics_against_independent_references(n_bins: int) -> None:
    """Oracle: explicit per-bin loops for ECE, MCE and classwise ECE; scikit-learn's ``log_loss``
    for the NLL; a numpy one-liner for the multi-class Brier score (squared error summed over
    classes); the argmax count for accuracy."""
    rng = np.random.default_rng(4)
    logits = 2.5 * rng.normal(size=(400, 4))
    probs = _softmax(logits)
    labels = _sample_labels(_softmax(0.5 * logits), rng)  # over-confident by a factor 2
    out = calibration_metrics(logits, labels, n_bins=n_bins)
    for key, value in _naive_binned_errors(probs, labels, n_bins).items():
        assert out[key] == pytest.approx(value, rel=1e-10, abs=1e-12), key
    assert out["ece"] > 0.05  # the over-confidence shows
    assert out["nll"] == pytest.approx(log_loss(labels, probs, labels=range(4)), rel=1e-10)
    brier = np.mean(np.sum((probs - np.eye(4)[labels]) ** 2, axis=1))
    assert out["brier"] == pytest.approx(brier, rel=1e-12)
    assert out["accuracy"] == pytest.approx(np.mean(probs.argmax(1) == labels))


# --------------------------------------------------------------------------------------------
# Temperature scaling
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def true_logits_and_labels() -> tuple[np.ndarray, np.ndarray]:
    """Logits of a calibrated 10-class model and labels drawn from its softmax."""
    rng = np.random.default_rng(0)
    logits = 1.5 * rng.normal(size=(5000, 10))
    return logits, _sample_labels(_softmax(logits), rng)


def test_fit_temperature_recovers_overconfidence(true_logits_and_labels) -> None:
    true_logits, labels = true_logits_and_labels
    logits = 4.0 * true_logits  # over-confident by a factor 4
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(4.0, rel=0.1)
    before = calibration_metrics(logits, labels)
    after = calibration_metrics(logits, labels, temperature=t)
    assert after["nll"] < before["nll"]
    assert after["accuracy"] == before["accuracy"]
    assert after["ece"] < before["ece"]
    # Dividing the logits by hand gives the same metrics as the temperature argument.
    manual = calibration_metrics(apply_temperature(logits, t), labels)
    for key, value in after.items():
        assert manual[key] == pytest.approx(value, rel=1e-12, abs=1e-12)


def test_fit_temperature_recovers_underconfidence(true_logits_and_labels) -> None:
    true_logits, labels = true_logits_and_labels
    logits = torch.from_numpy(0.25 * true_logits)
    t = fit_temperature(logits, torch.from_numpy(labels))
    assert t < 1.0
    assert t == pytest.approx(0.25, rel=0.1)
    nll_after = negative_log_likelihood(logits / t, labels, from_logits=True)
    assert nll_after < negative_log_likelihood(logits, labels, from_logits=True)


def test_fit_temperature_independent_of_default_dtype(true_logits_and_labels) -> None:
    true_logits, labels = true_logits_and_labels
    logits = torch.tensor(3.0 * true_logits[:1000], dtype=torch.float32)
    y = torch.from_numpy(labels[:1000])
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        t64 = fit_temperature(logits, y)
        torch.set_default_dtype(torch.float32)
        t32 = fit_temperature(logits, y)
    finally:
        torch.set_default_dtype(previous)
    assert t32 == t64


def test_fit_temperature_works_under_no_grad(true_logits_and_labels) -> None:
    true_logits, labels = true_logits_and_labels
    with torch.no_grad():
        t = fit_temperature(2.0 * true_logits[:1000], labels[:1000])
    assert t == pytest.approx(2.0, rel=0.2)


def test_fit_temperature_degenerate_cases() -> None:
    # Constant logits: the NLL does not depend on T, so the start T = 1 is kept.
    assert fit_temperature(np.zeros((12, 3)), np.arange(12) % 3) == 1.0
    # Separable data pushes T towards 0; the result stays inside the clamp range and does not
    # increase the NLL.
    logits = 5.0 * np.eye(3)[[0, 1, 2, 0]]
    labels = np.array([0, 1, 2, 0])
    t = fit_temperature(logits, labels)
    assert math.exp(-5.0) - 1e-12 <= t < 1.0
    assert negative_log_likelihood(logits / t, labels, from_logits=True) < negative_log_likelihood(
        logits, labels, from_logits=True
    )


def test_fit_temperature_rejects_bad_inputs() -> None:
    logits = np.array([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0]])
    labels = np.array([0, 1, 0])
    with pytest.raises(ValueError):
        fit_temperature(np.array([[np.nan, 0.0], [0.0, 1.0], [2.0, -1.0]]), labels)
    with pytest.raises(ValueError):
        fit_temperature(np.array([[np.inf, 0.0], [0.0, 1.0], [2.0, -1.0]]), labels)
    with pytest.raises(ValueError):
        fit_temperature(logits, np.array([0, 2, 0]))
    with pytest.raises(ValueError):
        fit_temperature(logits, np.array([0, -1, 0]))
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 2)), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError):
        fit_temperature(logits, labels, max_iter=0)


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_apply_temperature_rejects_invalid_temperature(bad: float) -> None:
    with pytest.raises(ValueError):
        apply_temperature(np.ones((2, 3)), bad)
    with pytest.raises(ValueError):
        calibration_metrics(np.ones((2, 3)), np.array([0, 1]), temperature=bad)


def test_apply_temperature_divides() -> None:
    out = apply_temperature(torch.tensor([[2.0, -4.0]], dtype=torch.float32), 2.0)
    assert isinstance(out, np.ndarray)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [[1.0, -2.0]])


def test_calibration_metrics_keys_and_agreement() -> None:
    rng = np.random.default_rng(3)
    logits = 2.0 * rng.normal(size=(300, 4))
    labels = rng.integers(0, 4, size=300)
    out = calibration_metrics(logits, labels, n_bins=10)
    assert set(out) == {"accuracy", "ece", "adaptive_ece", "mce", "classwise_ece", "brier", "nll"}
    assert all(isinstance(v, float) for v in out.values())
    base = classification_metrics(logits, labels, n_bins=10)
    for key in ("accuracy", "ece", "brier", "nll"):
        assert out[key] == pytest.approx(base[key], rel=1e-12)
    assert out["ece"] <= out["mce"]


def test_public_api_listed() -> None:
    assert sorted(calibration_all) == sorted(
        [
            "adaptive_calibration_error",
            "apply_temperature",
            "calibration_metrics",
            "classwise_calibration_error",
            "fit_temperature",
            "maximum_calibration_error",
            "plot_reliability_diagram",
            "reliability_bins",
        ]
    )


# --------------------------------------------------------------------------------------------
# Reliability diagram
# --------------------------------------------------------------------------------------------


def test_plot_reliability_diagram_writes_png(tmp_path, true_logits_and_labels) -> None:
    true_logits, labels = true_logits_and_labels
    logits = 4.0 * true_logits[:1000]
    y = labels[:1000]
    t = fit_temperature(logits, y)
    pyplot_loaded = "matplotlib.pyplot" in sys.modules
    out = plot_reliability_diagram(
        {"before": (logits, y), "after temperature scaling": (logits / t, y)},
        tmp_path / "nested" / "dir" / "reliability.png",
        n_bins=10,
        title="synthetic",
    )
    assert out == tmp_path / "nested" / "dir" / "reliability.png"
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 1000
    # Plotting must not drag in pyplot (and with it global backend state).
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_loaded


def test_plot_reliability_diagram_rejects_empty(tmp_path) -> None:
    with pytest.raises(ValueError):
        plot_reliability_diagram({}, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()
