"""Fitting the Mahalanobis OOD detector (Lee et al. 2018): sklearn's estimator vs its function.

``MahalanobisDetector.fit`` shrinks the class-centred feature covariance with Ledoit-Wolf and
whitens by its Cholesky factor. It used ``LedoitWolf().fit(x).covariance_``, which also inverts
the covariance by an eigendecomposition (``pinvh``) that the detector never reads; it now calls
``sklearn.covariance.ledoit_wolf``, which returns the same matrix (checked bit for bit here).
A profile of one Fashion-MNIST study cell's evaluation (440 s on one thread) put 100 s in that
eigendecomposition: the classifier head's features are 7,840-dimensional (32 maps of 14×14 and
of 7×7, flattened).

Both are timed in turns in one process on the same random features (``--n`` × ``--dim``,
float32, read as float64 as the detector does; 10 classes), medians of ``--repeats``; "old"
fits ``LedoitWolf`` then whitens as the detector does, "new" is ``MahalanobisDetector().fit``.

    python benchmarks/mahalanobis_fit.py [--n 20000] [--dim 7840] [--repeats 3] [--threads 1]

Writes benchmarks/results/mahalanobis_fit.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from _common import RESULTS, cpu_model, environment
from sklearn.covariance import LedoitWolf

from hybridflow.evaluation.ood import MahalanobisDetector
from hybridflow.reports import cpu_description

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--n", type=int, default=20_000, help="training features")
parser.add_argument("--dim", type=int, default=7_840, help="feature dimension")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)
try:  # numpy/scipy's BLAS threads, where threadpoolctl (a scikit-learn dependency) can set them
    from threadpoolctl import threadpool_limits

    threadpool_limits(args.threads)
except ImportError:
    pass

rng = np.random.default_rng(0)
labels = rng.integers(0, 10, args.n)
# Correlated features with class offsets, as a trained head's are (not white noise).
mixing = rng.standard_normal((args.dim // 8, args.dim)).astype(np.float32) / 10
features = rng.standard_normal((args.n, args.dim // 8)).astype(np.float32) @ mixing
features += rng.standard_normal((args.n, args.dim)).astype(np.float32)
features += rng.standard_normal((10, args.dim)).astype(np.float32)[labels]


def old_fit() -> np.ndarray:
    """What the detector did before: the estimator (covariance and its unused precision)."""
    f = features.astype(np.float64)  # as the detector reads its input
    classes = np.unique(labels)
    means = np.stack([f[labels == c].mean(axis=0) for c in classes])
    centred = f - means[np.searchsorted(classes, labels)]
    cov = LedoitWolf(assume_centered=True).fit(centred).covariance_
    chol = np.linalg.cholesky(cov + 1e-10 * np.trace(cov) / cov.shape[0] * np.eye(len(cov)))
    return np.linalg.inv(chol).T


def new_fit() -> np.ndarray:
    return MahalanobisDetector().fit(features, labels).whitener


times: dict[str, list[float]] = {"old": [], "new": []}
results = {}
for _ in range(args.repeats):  # in turns: both see the same load on a shared machine
    for name, fit in (("old", old_fit), ("new", new_fit)):
        start = time.perf_counter()
        results[name] = fit()
        times[name].append(time.perf_counter() - start)
identical = bool(np.array_equal(results["old"], results["new"]))
summary = {
    "cpu": cpu_description(),
    "cpu_model": cpu_model(),
    **environment(args.threads),
    "n": args.n,
    "dim": args.dim,
    "repeats": args.repeats,
    "seconds": times,
    "median_s": {k: statistics.median(v) for k, v in times.items()},
    "speedup": statistics.median(times["old"]) / statistics.median(times["new"]),
    "whitener_identical": identical,
    "measured_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
}
RESULTS.mkdir(exist_ok=True)
(RESULTS / "mahalanobis_fit.json").write_text(json.dumps(summary, indent=2) + "\n")
print(
    f"{args.n} × {args.dim} features, {args.threads} thread(s), {summary['cpu']}: "
    f"old {summary['median_s']['old']:.1f} s, new {summary['median_s']['new']:.1f} s "
    f"(×{summary['speedup']:.2f}), whitener identical: {identical}"
)
