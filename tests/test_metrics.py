"""Hand-computed tests for hybridflow.evaluation.metrics and hybridflow.evaluation.baselines."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import brier_score_loss, log_loss

from hybridflow.evaluation import baselines
from hybridflow.evaluation.baselines import categorical_bits_per_dim, uniform_bits_per_dim
from hybridflow.evaluation.calibration import calibration_metrics
from hybridflow.evaluation.metrics import (
    OOD_METRIC_DESCRIPTIONS,
    accuracy,
    brier_score,
    classification_metrics,
    expected_calibration_error,
    negative_log_likelihood,
    ood_metrics,
    selective_accuracy,
)

# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------

# Five 2-class predictions; with n_bins=4 the bins are (0,.25], (.25,.5], (.5,.75], (.75,1]
# (all edges exact in binary floating point).
#   ex  probs       label  pred  conf  correct  bin
#   1   [.9, .1]    0      0     .9    1        3
#   2   [.8, .2]    1      0     .8    0        3
#   3   [.6, .4]    0      0     .6    1        2
#   4   [.3, .7]    1      1     .7    1        2
#   5   [.5, .5]    1      0     .5    0        1   (argmax picks the first; .5 is in (.25,.5])
ECE_PROBS = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
ECE_LABELS = np.array([0, 1, 0, 1, 1])


def test_ece_hand_case() -> None:
    # bin 3: acc 1/2, conf .85 -> 2/5 * .35 = .14
    # bin 2: acc 1,   conf .65 -> 2/5 * .35 = .14
    # bin 1: acc 0,   conf .50 -> 1/5 * .50 = .10
    # ECE = .38  (if .5 wrongly went to bin 2: bin 2 = acc 2/3, conf .6 -> .04, ECE = .18)
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS, n_bins=4) == pytest.approx(0.38)


def test_ece_n_bins_honored() -> None:
    # One bin: acc 3/5 = .6, mean conf (.9+.8+.6+.7+.5)/5 = .7 -> ECE = .1
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS, n_bins=1) == pytest.approx(0.1)
    assert expected_calibration_error(ECE_PROBS, ECE_LABELS, n_bins=4) != pytest.approx(0.1)


def test_ece_perfect_calibration_is_zero() -> None:
    # Confidence .75 everywhere and exactly 3 of 4 correct.
    probs = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels) == pytest.approx(0.0, abs=1e-12)
    # Fully confident and always right.
    eye = torch.eye(3)
    assert expected_calibration_error(eye, torch.arange(3)) == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident_positive() -> None:
    # Confidence .99 but only half correct -> ECE = |.5 - .99| = .49
    probs = np.array([[0.99, 0.01]] * 4)
    labels = np.array([0, 0, 1, 1])
    ece = expected_calibration_error(probs, labels)
    assert ece > 0
    assert ece == pytest.approx(0.49)


def test_brier_hand_case() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    labels = np.array([0, 2])
    # ex1: .3^2 + .2^2 + .1^2 = .14 ; ex2: .2^2 + .5^2 + .7^2 = .78 ; mean = .46
    assert brier_score(probs, labels) == pytest.approx(0.46)


def test_nll_hand_case_and_clamping() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    labels = np.array([0, 2])
    expected = -(math.log(0.7) + math.log(0.3)) / 2
    assert negative_log_likelihood(probs, labels, from_logits=False) == pytest.approx(expected)
    # A zero probability on the target stays finite thanks to clamping.
    nll = negative_log_likelihood(np.array([[1.0, 0.0]]), np.array([1]), from_logits=False)
    assert math.isfinite(nll) and nll > 700


def test_nll_from_logits_equivalence() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 10, generator=gen) * 3
    labels = torch.randint(0, 10, (64,), generator=gen)
    from_logits = negative_log_likelihood(logits, labels, from_logits=True)
    from_probs = negative_log_likelihood(logits.softmax(dim=1), labels, from_logits=False)
    reference = torch.nn.functional.cross_entropy(logits.double(), labels).item()
    assert from_logits == pytest.approx(reference, rel=1e-10)
    assert from_probs == pytest.approx(reference, rel=1e-5)  # float32 softmax rounding


def test_nll_from_logits_is_stable_for_large_logits() -> None:
    logits = np.array([[1000.0, 0.0], [0.0, 1000.0]])
    assert negative_log_likelihood(logits, np.array([1, 1]), from_logits=True) == pytest.approx(
        500.0
    )


def test_accuracy_and_classification_metrics() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, -1.0], [0.5, 0.0]])
    labels = torch.tensor([0, 1, 1, 1])
    assert accuracy(logits, labels) == pytest.approx(0.5)
    assert accuracy(logits.softmax(1), labels) == pytest.approx(0.5)
    out = classification_metrics(logits, labels, n_bins=10)
    assert set(out) == {"accuracy", "ece", "brier", "nll"}
    assert all(isinstance(v, float) for v in out.values())
    probs = logits.double().softmax(1)
    assert out["ece"] == pytest.approx(expected_calibration_error(probs, labels, n_bins=10))
    assert out["brier"] == pytest.approx(brier_score(probs, labels))
    assert out["nll"] == pytest.approx(torch.nn.functional.cross_entropy(logits, labels).item())


def _probs_and_labels(seed: int, n: int = 40, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Random probabilities (rows sum to 1) and labels that never use the last class."""
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.normal(size=(n, c))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, rng.integers(0, c - 1, size=n)


def test_nll_matches_sklearn_log_loss() -> None:
    """Oracle: scikit-learn's ``log_loss`` (mean NLL in nats), told every class exists."""
    probs, labels = _probs_and_labels(0)
    classes = list(range(probs.shape[1]))
    expected = log_loss(labels, probs, labels=classes)
    assert negative_log_likelihood(probs, labels, from_logits=False) == pytest.approx(
        expected, rel=1e-12
    )
    logits = np.log(probs) + 3.0  # softmax(log p + c) = p
    assert negative_log_likelihood(logits, labels, from_logits=True) == pytest.approx(
        expected, rel=1e-10
    )
    assert classification_metrics(logits, labels)["nll"] == pytest.approx(expected, rel=1e-10)
    assert calibration_metrics(logits, labels)["nll"] == pytest.approx(expected, rel=1e-10)


def test_brier_is_the_multiclass_sum_over_classes() -> None:
    """Oracle: numpy one-liners. The convention is Brier's (1950) multi-class score, the mean
    over examples of the squared error summed over all C classes (range [0, 2]); for two classes
    that is twice scikit-learn's binary ``brier_score_loss`` (positive class only, range [0, 1])."""
    probs, labels = _probs_and_labels(1)
    expected = np.mean(np.sum((probs - np.eye(probs.shape[1])[labels]) ** 2, axis=1))
    assert brier_score(probs, labels) == pytest.approx(expected, rel=1e-12)
    assert classification_metrics(np.log(probs), labels)["brier"] == pytest.approx(expected)
    binary = np.array([[0.9, 0.1], [0.35, 0.65], [0.2, 0.8], [0.6, 0.4]])
    y = np.array([0, 0, 1, 1])
    # (.1² + .1²) + (.65² + .65²) + (.2² + .2²) + (.6² + .6²) = 2 · .8325 -> / 4 = .41625
    assert brier_score(binary, y) == pytest.approx(0.41625)
    assert brier_score(binary, y) == pytest.approx(2 * brier_score_loss(y, binary[:, 1]))


# Six 3-class predictions, unsorted, for the default 15 equal-width bins (b/15, (b+1)/15]
# (Guo et al. 2017, eq. 3); no confidence sits on a bin edge.
#   ex  probs               label  pred  conf  correct  bin (edges)
#   1   [.62, .30, .08]     0      0     .62   1        9   (.6000, .6667]
#   2   [.05, .90, .05]     2      1     .90   0        13  (.8667, .9333]
#   3   [.35, .37, .28]     0      1     .37   0        5   (.3333, .4000]
#   4   [.95, .03, .02]     0      0     .95   1        14  (.9333, 1]
#   5   [.50, .45, .05]     1      0     .50   0        7   (.4667, .5333]
#   6   [.20, .15, .65]     2      2     .65   1        9   (.6000, .6667]
ECE15_PROBS = np.array(
    [
        [0.62, 0.30, 0.08],
        [0.05, 0.90, 0.05],
        [0.35, 0.37, 0.28],
        [0.95, 0.03, 0.02],
        [0.50, 0.45, 0.05],
        [0.20, 0.15, 0.65],
    ]
)
ECE15_LABELS = np.array([0, 2, 0, 0, 1, 2])


def test_ece_with_15_bins_by_hand() -> None:
    # bin 9: 2 examples, acc 1, conf .635 -> 2/6 · .365 ; bins 13, 5, 14, 7: one each,
    # gaps .90, .37, .05, .50 -> ECE = (.73 + .90 + .37 + .05 + .50) / 6 = 2.55 / 6 = .425
    assert expected_calibration_error(ECE15_PROBS, ECE15_LABELS) == pytest.approx(0.425)
    # Through logits (softmax(log p) = p), as the evaluation reports it.
    logits = np.log(ECE15_PROBS)
    assert classification_metrics(logits, ECE15_LABELS)["ece"] == pytest.approx(0.425)
    assert calibration_metrics(logits, ECE15_LABELS)["ece"] == pytest.approx(0.425)
    # One bin: |acc - mean conf| = |3/6 - 3.99/6| = .165
    assert expected_calibration_error(ECE15_PROBS, ECE15_LABELS, n_bins=1) == pytest.approx(0.165)


def test_aurc_with_unsorted_inputs_and_ties_by_hand() -> None:
    """AURC is the mean selective risk over coverages k/N, k = 1..N, keeping the most confident
    first; tied confidences keep their input order (a stable sort), so the earlier input is kept
    first. Here both tie groups would give another value in the other order."""
    correct = np.array([1, 0, 1, 1, 0], bool)
    confidence = np.array([0.2, 0.9, 0.9, 0.5, 0.2])
    # Kept order: #1 (.9, wrong), #2 (.9, right), #3 (.5, right), #0 (.2, right), #4 (.2, wrong)
    # hits 0, 1, 2, 3, 3 -> risks 1, 1/2, 1/3, 1/4, 2/5 -> AURC = (149/60) / 5 = 149/300
    out = selective_accuracy(correct, confidence, coverages=(0.4, 0.6, 0.8, 1.0))
    assert out["aurc"] == pytest.approx(149 / 300)
    assert out["acc@40"] == pytest.approx(1 / 2)
    assert out["acc@60"] == pytest.approx(2 / 3)
    assert out["acc@80"] == pytest.approx(3 / 4)
    assert out["acc@100"] == pytest.approx(3 / 5)
    # The same examples listed with each tie group reversed: #2 before #1, #4 before #0.
    # hits 1, 1, 2, 2, 3 -> risks 0, 1/2, 1/3, 1/2, 2/5 -> AURC = (104/60) / 5 = 104/300
    listed = [2, 1, 3, 4, 0]
    reordered = selective_accuracy(correct[listed], confidence[listed], coverages=())
    assert reordered["aurc"] == pytest.approx(104 / 300)


def test_classification_input_validation() -> None:
    with pytest.raises(ValueError):
        accuracy(np.zeros((3, 2)), np.array([0, 1]))  # length mismatch
    with pytest.raises(ValueError):
        accuracy(np.zeros((2, 2)), np.array([0, 2]))  # label out of range
    with pytest.raises(ValueError):
        expected_calibration_error(np.zeros((0, 2)), np.zeros(0, dtype=int))


# --------------------------------------------------------------------------------------------
# OOD detection (higher score = more OOD)
# --------------------------------------------------------------------------------------------


def test_auroc_perfect_and_reversed() -> None:
    s_in = np.array([0.0, 1.0, 2.0])
    s_out = np.array([3.0, 4.0])
    perfect = ood_metrics(s_in, s_out)
    assert perfect["auroc"] == pytest.approx(1.0)
    assert perfect["aupr_in"] == pytest.approx(1.0)
    assert perfect["aupr_out"] == pytest.approx(1.0)
    assert perfect["fpr95_id"] == pytest.approx(0.0)
    assert perfect["fpr95_ood"] == pytest.approx(0.0)
    reversed_ = ood_metrics(s_out, s_in)
    assert reversed_["auroc"] == pytest.approx(0.0)
    assert reversed_["fpr95_id"] == pytest.approx(1.0)
    assert reversed_["fpr95_ood"] == pytest.approx(1.0)


def test_auroc_with_ties() -> None:
    # P(out > in) + 0.5 P(out == in) over 3*2 pairs:
    # out=1: beats in=0 (1), ties in=1 (.5), loses to in=2 (0) -> 1.5 ; out=3 beats all -> 3
    # AUROC = 4.5 / 6 = .75
    res = ood_metrics(torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 3.0]))
    assert res["auroc"] == pytest.approx(0.75)


def test_aupr_hand_case() -> None:
    s_in = np.array([1.0, 2.0, 4.0])
    s_out = np.array([3.0, 5.0])
    res = ood_metrics(s_in, s_out)
    # OOD positive, ranking by score desc: 5(out) 4(in) 3(out) 2(in) 1(in)
    # precision at the OOD hits: 1/1, 2/3 -> AP_out = (1 + 2/3) / 2 = 5/6
    assert res["aupr_out"] == pytest.approx(5 / 6)
    # ID positive, ranking by -score desc: 1(in) 2(in) 3(out) 4(in) 5(out)
    # precision at the ID hits: 1/1, 2/2, 3/4 -> AP_in = (1 + 1 + 3/4) / 3 = 11/12
    assert res["aupr_in"] == pytest.approx(11 / 12)
    # AUROC: out=3 beats 2 of 3, out=5 beats 3 of 3 -> 5/6
    assert res["auroc"] == pytest.approx(5 / 6)


def test_fpr95_conventions_differ() -> None:
    s_in = np.arange(20, dtype=float)  # 0, 1, ..., 19
    s_out = np.array([5.5] * 10 + [50.0] * 10)
    res = ood_metrics(s_in, s_out)
    # fpr95_id: accept (score <= t) 19/20 ID -> smallest t = 18; OOD accepted = the ten 5.5's
    #   -> 10/20 = .5
    assert res["fpr95_id"] == pytest.approx(0.5)
    # fpr95_ood: flag (score >= t) 19/20 OOD -> must flag the 5.5's, t = 5.5; ID flagged =
    #   6, 7, ..., 19 -> 14/20 = .7
    assert res["fpr95_ood"] == pytest.approx(0.7)


def test_fpr95_not_affected_by_collinear_point_dropping() -> None:
    # Identical ID and OOD scores 0..19: every threshold adds one ID and one OOD example, so
    # the ROC is a straight diagonal whose interior points sklearn drops by default (which
    # would report 1.0). The exact first crossing of TPR 95% must still be found:
    # fpr95_id: accept (score <= 18) 19/20 ID; OOD accepted = 0..18 -> 19/20 = .95
    # fpr95_ood: flag (score >= 1) 19/20 OOD; ID flagged = 1..19 -> 19/20 = .95
    scores = np.arange(20, dtype=float)
    res = ood_metrics(scores, scores.copy())
    assert res["fpr95_id"] == pytest.approx(0.95)
    assert res["fpr95_ood"] == pytest.approx(0.95)
    assert res["auroc"] == pytest.approx(0.5)


def test_ood_metrics_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="2 non-finite"):
        ood_metrics(np.array([0.0, np.nan, 1.0, np.inf]), np.array([1.0]))
    with pytest.raises(ValueError, match="1 non-finite"):
        ood_metrics(np.array([0.0]), torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="empty"):
        ood_metrics(np.array([]), np.array([1.0]))


def test_ood_descriptions_cover_all_keys() -> None:
    res = ood_metrics(np.array([0.0, 1.0]), np.array([2.0, 0.5]))
    assert set(res) == set(OOD_METRIC_DESCRIPTIONS)
    assert all(isinstance(v, float) for v in res.values())


# --------------------------------------------------------------------------------------------
# Bits-per-dimension baselines
# --------------------------------------------------------------------------------------------


def _brute_force_bpd(train: np.ndarray, test: np.ndarray, num_levels: int, alpha: float) -> float:
    train = train.reshape(train.shape[0], -1)
    test = test.reshape(test.shape[0], -1)
    n, dim = train.shape
    total = 0.0
    for x in test:
        for d in range(dim):
            count = sum(1 for row in train if row[d] == x[d])
            total -= math.log2((count + alpha) / (n + alpha * num_levels))
    return total / (test.shape[0] * dim)


def test_categorical_bpd_hand_case() -> None:
    train = np.array([[0, 0], [0, 1], [1, 1]])
    test = np.array([[0, 1], [1, 0]])
    # alpha=1, K=2, N=3 -> denominators 5.
    # pixel 0: counts (2, 1) -> P = (3/5, 2/5) ; pixel 1: counts (1, 2) -> P = (2/5, 3/5)
    # test [0,1]: 3/5 * 3/5 = 9/25 ; test [1,0]: 2/5 * 2/5 = 4/25
    # bpd = (log2(25/9) + log2(25/4)) / (2 images * 2 dims)
    expected = (math.log2(25 / 9) + math.log2(25 / 4)) / 4
    assert categorical_bits_per_dim(train, test, num_levels=2) == pytest.approx(expected)
    assert categorical_bits_per_dim(
        torch.from_numpy(train), torch.from_numpy(test), num_levels=2
    ) == pytest.approx(expected)


def test_categorical_bpd_matches_brute_force(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    # Skewed distribution so the per-pixel model differs clearly from uniform.
    probs = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
    train = rng.choice(5, size=(40, 2, 3, 3), p=probs).astype(np.uint8)
    test = rng.choice(5, size=(7, 2, 3, 3), p=probs).astype(np.uint8)
    expected = _brute_force_bpd(train, test, num_levels=5, alpha=0.5)
    assert categorical_bits_per_dim(train, test, 5, alpha=0.5) == pytest.approx(expected)
    # Chunked accumulation must give the same answer.
    monkeypatch.setattr(baselines, "_CHUNK_ELEMS", 20)
    assert categorical_bits_per_dim(train, test, 5, alpha=0.5) == pytest.approx(expected)


def test_categorical_bpd_uniform_data_close_to_log2k() -> None:
    rng = np.random.default_rng(1)
    train = rng.integers(0, 8, size=(20000, 4))
    test = rng.integers(0, 8, size=(5000, 4))
    assert categorical_bits_per_dim(train, test, num_levels=8) == pytest.approx(3.0, abs=0.01)


def test_categorical_bpd_validation() -> None:
    ok = np.zeros((2, 3), dtype=np.int64)
    with pytest.raises(ValueError):
        categorical_bits_per_dim(ok, np.full((1, 3), 4), num_levels=4)
    with pytest.raises(ValueError):
        categorical_bits_per_dim(np.full((2, 3), -1), ok, num_levels=4)
    with pytest.raises(ValueError):
        categorical_bits_per_dim(ok, np.zeros((1, 4), dtype=np.int64), num_levels=4)
    with pytest.raises(ValueError):
        categorical_bits_per_dim(ok, ok, num_levels=4, alpha=0.0)
    with pytest.raises(ValueError):
        categorical_bits_per_dim(ok + 0.5, ok, num_levels=4)


def test_uniform_bits_per_dim() -> None:
    assert uniform_bits_per_dim(256) == pytest.approx(8.0)
    assert uniform_bits_per_dim(2) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        uniform_bits_per_dim(0)
