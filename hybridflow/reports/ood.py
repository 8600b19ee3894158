"""OOD detection for a finished run: every score × every metric, written beside the run.

The in-distribution data are split by role so that nothing is fitted on what it is tested on:
class means and the tied covariance of the Mahalanobis scores come from (a subset of) the
training split; the validation split is halved, one half estimating the entropy and threshold
of the typicality test, the other calibrating the conformal p-values of the hybrid score; the
test split is the in-distribution side of every metric.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from ..data import ImageDataset, dataset_tensors, load_dataset
from ..evaluation import OOD_METRIC_DESCRIPTIONS, ood_metrics, predict
from ..evaluation.ood import (
    OOD_SCORE_DESCRIPTIONS,
    FisherCombination,
    MahalanobisDetector,
    TypicalityTest,
    bpd_score,
    complexity_score,
    energy_score,
    likelihood_ratio_score,
    max_softmax_score,
    nll_score,
    png_bits_per_dim,
)
from ..naming import unknown_name_message
from ..runs import load_run
from .runs import check_compatible, run_data_kwargs, write_csv

__all__ = ["HYBRID_COMPONENTS", "format_ood_table", "ood_run", "sanitize_predictions"]

#: Default components of the hybrid score: the density's and the classifier's own evidence.
HYBRID_COMPONENTS = ("typicality", "energy")


def _subset(dataset, index: torch.Tensor):
    """A shallow copy of an in-memory dataset restricted to ``index``."""
    out = copy.copy(dataset)
    if isinstance(dataset, ImageDataset):
        out.images, out.labels = dataset.images[index], dataset.labels[index]
        out.indices = dataset.indices[index]
    else:
        out.points, out.labels = dataset.points[index], dataset.labels[index]
        if hasattr(dataset, "indices"):
            out.indices = dataset.indices[index]
    return out


# Stand-in for an infinite value: finite, so every score and metric can rank it, and beyond
# anything a real score reaches.
_HUGE = 1e300


def sanitize_predictions(pred: dict) -> dict[str, int]:
    """Replace non-finite model outputs in place by extreme finite values; return their counts.

    One diverging input must not abort a whole OOD report. A log-likelihood of ``-inf`` or NaN
    becomes ``-1e300`` (an impossible input: most OOD), ``+inf`` becomes ``+1e300``; non-finite
    logits and features become ``±1e300`` (NaN: 0). Rankings, hence every metric, are kept.
    """
    counts = {}
    for key, nan in (
        ("log_prob", -_HUGE),
        ("background_log_prob", -_HUGE),
        ("logits", 0.0),
        ("latent", 0.0),
        ("pre_logits", 0.0),
    ):
        if key in pred:
            bad = ~np.isfinite(pred[key])
            counts[key] = int(bad.sum())
            if counts[key]:
                big = np.finfo(pred[key].dtype).max if pred[key].dtype != np.float64 else _HUGE
                pred[key] = np.nan_to_num(pred[key], nan=nan, posinf=big, neginf=-big)
    return counts


class _Scorer:
    """Fitted OOD scores of one model (plus an optional background model)."""

    def __init__(
        self,
        dim: int,
        typicality_batch: int,
        alpha: float,
        hybrid_components: Sequence[str],
    ) -> None:
        self.dim = dim
        self.typicality = TypicalityTest(1, alpha=alpha)
        self.typicality_batch = TypicalityTest(typicality_batch, alpha=alpha)
        self.mahalanobis = MahalanobisDetector()
        self.mahalanobis_head = MahalanobisDetector()
        self.hybrid = FisherCombination()
        self.hybrid_components = tuple(hybrid_components)

    def fit(self, train: Mapping, val_fit: Mapping, val_cal: Mapping) -> None:
        self.mahalanobis.fit(train["latent"], train["labels"])
        self.mahalanobis_head.fit(train["pre_logits"], train["labels"])
        nll = nll_score(val_fit["log_prob"])
        self.typicality.fit(nll)
        self.typicality_batch.fit(nll)
        calibration = self.per_example(val_cal)  # components are checked by ood_run up front
        self.hybrid.fit({k: calibration[k] for k in self.hybrid_components})

    def per_example(self, pred: Mapping) -> dict[str, np.ndarray]:
        """Every per-example score (higher = more OOD)."""
        scores = {
            "nll": nll_score(pred["log_prob"]),
            "bpd": bpd_score(pred["log_prob"], self.dim),
        }
        scores["typicality"] = self.typicality.score(scores["nll"])
        if "png_bpd" in pred:
            scores["complexity"] = complexity_score(scores["bpd"], pred["png_bpd"])
        if "background_log_prob" in pred:
            scores["likelihood_ratio"] = likelihood_ratio_score(
                pred["log_prob"], pred["background_log_prob"]
            )
        if pred["logits"].shape[1] > 0:
            scores["max_softmax"] = max_softmax_score(pred["logits"])
            scores["energy"] = energy_score(pred["logits"])
        if "latent" in pred:
            scores["mahalanobis"] = self.mahalanobis.score(pred["latent"])
            scores["mahalanobis_head"] = self.mahalanobis_head.score(pred["pre_logits"])
        # Overflow from extreme (sanitized) inputs: rank it as most OOD rather than abort.
        scores = {
            k: np.nan_to_num(v, nan=_HUGE, posinf=_HUGE, neginf=-_HUGE) for k, v in scores.items()
        }
        if self.hybrid.calibration:
            scores["hybrid"] = self.hybrid.score(scores)
        return scores


def format_ood_table(result: Mapping[str, Any]) -> str:
    """Markdown table of every score × metric for each OOD set of :func:`ood_run`'s result."""
    lines = []
    for spec, entry in result["ood"].items():
        lines += [
            f"**{result['dataset']} (in) vs {spec} (out)** — in bits/dim "
            f"{result['in_distribution']['bpd']:.3f}, out bits/dim {entry['bpd']:.3f}",
            "",
            "| score | AUROC | AUPR-in | AUPR-out | FPR@95 (ID accepted) | FPR@95 (OOD caught) |",
            "|---|---|---|---|---|---|",
        ]
        for score, m in entry["metrics"].items():
            lines.append(
                f"| {score} | {m['auroc']:.4f} | {m['aupr_in']:.4f} | {m['aupr_out']:.4f} | "
                f"{m['fpr95_id']:.4f} | {m['fpr95_ood']:.4f} |"
            )
        t, m = entry["typicality_batch_flag_rate"], result["typicality_batch"]
        lines.append("")
        if t is None:
            lines.append(f"No batch typicality test: fewer OOD inputs than M = {m}.")
        else:
            lines.append(
                f"Typicality test at the bootstrap threshold (M = {m}, α = {result['alpha']}): "
                f"{t['out']:.1%} of OOD batches and {t['in']:.1%} of in-distribution test "
                "batches rejected. The `typicality_batch` row scores disjoint random batches of M "
                f"({entry['n'] // m:,} OOD batches), every other row single inputs."
            )
        lines.append("")
    lines.append("FPR@95 (ID accepted): " + OOD_METRIC_DESCRIPTIONS["fpr95_id"])
    lines.append("")
    lines.append("FPR@95 (OOD caught): " + OOD_METRIC_DESCRIPTIONS["fpr95_ood"])
    return "\n".join(lines) + "\n"


def _plot_histograms(
    in_scores: Mapping[str, np.ndarray], out_scores: Mapping[str, Mapping[str, np.ndarray]], path
) -> None:
    names = list(in_scores)
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4 * cols, 3 * rows), layout="constrained")
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        groups = {"in (test)": in_scores[name]} | {k: v[name] for k, v in out_scores.items()}
        lo, hi = np.quantile(np.concatenate(list(groups.values())), [0.005, 0.995])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 60)
        for label, values in groups.items():
            ax.hist(
                np.clip(values, lo, hi),
                bins=bins,
                alpha=0.5,
                density=True,
                label=label,
                histtype="stepfilled",  # one polygon, not 60 bars: 10x faster to draw
            )
        ax.set_title(f"{name} (higher = more OOD)", fontsize=9)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=90)


def _available_scores(model, background: str | Path | None) -> set[str]:
    """Per-example scores that ``model`` (with or without a background model) can give."""
    available = set(OOD_SCORE_DESCRIPTIONS) - {"typicality_batch", "hybrid"}
    if not _is_image_model(model):
        available.discard("complexity")  # PNG codes 1- or 3-channel images of levels
    if background is None:
        available.discard("likelihood_ratio")
    if model.num_classes == 0:
        available -= {"max_softmax", "energy"}
    return available


def _is_image_model(model) -> bool:
    """Whether the model reads 1- or 3-channel images of levels (what PNG can code)."""
    shape = model.flow.input_shape
    return model.flow.num_levels is not None and len(shape) == 3 and shape[0] in (1, 3)


def _check_hybrid_components(components: Sequence[str], available: set[str]) -> None:
    if not components:
        raise ValueError(f"give at least one hybrid component among {sorted(available)}")
    for name in components:
        if name not in available:
            raise ValueError(
                unknown_name_message("hybrid component (OOD score)", name, available)
                + (" — likelihood_ratio needs --background" if name == "likelihood_ratio" else "")
            )


def _load_background(background: str | Path, model, device) -> Any:
    """The background model of the likelihood ratio, checked to read the same data."""
    bg_model, _ = load_run(background, device=device)
    if bg_model.flow.input_shape != model.flow.input_shape or (
        bg_model.flow.num_levels != model.flow.num_levels
    ):
        raise ValueError(
            f"background model reads {bg_model.flow.input_shape} with "
            f"{bg_model.flow.num_levels} levels; the model reads {model.flow.input_shape} "
            f"with {model.flow.num_levels}"
        )
    return bg_model


@dataclass
class _OodData:
    """The datasets of one OOD run, split by role (see the module docstring)."""

    train_fit: Any  # Mahalanobis fit
    val_fit: Any  # typicality entropy and threshold
    val_cal: Any  # hybrid score's conformal calibration
    test: Any  # in-distribution side of every metric
    out: dict[str, Any]  # OOD sets by spec


def _load_ood_data(
    cfg: Mapping[str, Any],
    ood: Sequence[str],
    split: str,
    data_root: str | None,
    fit_examples: int,
    gen: torch.Generator,
) -> _OodData:
    data_kw = run_data_kwargs(cfg, data_root)
    train_set = load_dataset(cfg["dataset"], "train", **data_kw)
    train_fit = _subset(train_set, torch.randperm(len(train_set), generator=gen)[:fit_examples])
    val_set = load_dataset(cfg["dataset"], "val", **data_kw)
    if len(val_set) < 4:
        raise ValueError(
            f"OOD scoring needs a validation split (typicality test, hybrid calibration); "
            f"{cfg['dataset']} has {len(val_set)} validation examples (val_fraction="
            f"{cfg['val_fraction']})"
        )
    half = torch.randperm(len(val_set), generator=gen)
    val_fit = _subset(val_set, half[: len(half) // 2])
    val_cal = _subset(val_set, half[len(half) // 2 :])
    test = load_dataset(cfg["dataset"], split, **data_kw)
    out = {}
    for spec in ood:
        name, _, ood_split = spec.partition("@")
        out[spec] = load_dataset(name, ood_split or "all", **data_kw)
        check_compatible(name, out[spec], test)
    return _OodData(train_fit, val_fit, val_cal, test, out)


class _OodPredictor:
    """Model outputs an OOD score needs: log p(x), logits, features, PNG bits, background."""

    def __init__(self, model, bg_model, batch_size: int, device, bound_kw: Mapping) -> None:
        self.model, self.bg_model = model, bg_model
        self.batch_size, self.device, self.bound_kw = batch_size, device, dict(bound_kw)
        self.images = _is_image_model(model)

    def __call__(self, dataset, with_extras: bool = True, bound: bool = True) -> dict:
        # The training subset only feeds the Mahalanobis fit: skip the costly likelihood bound.
        kw = self.bound_kw if bound else {"seed": self.bound_kw["seed"]}
        pred = predict(
            self.model, dataset, self.batch_size, device=self.device, features=True, **kw
        )
        if with_extras and self.images:
            pred["png_bpd"] = png_bits_per_dim(
                dataset_tensors(dataset)[0], self.model.flow.num_levels
            )
        if with_extras and self.bg_model is not None:
            pred["background_log_prob"] = predict(
                self.bg_model, dataset, self.batch_size, device=self.device, **self.bound_kw
            )["log_prob"]
        pred["non_finite"] = sanitize_predictions(pred)
        return pred


def _labelled_accuracy(pred: Mapping) -> float | None:
    """Accuracy over the labelled examples (label ≥ 0), ``None`` without logits or labels."""
    labelled = pred["labels"] >= 0
    if pred["logits"].shape[1] == 0 or not labelled.any():
        return None
    return float((pred["logits"][labelled].argmax(1) == pred["labels"][labelled]).mean())


def _score_ood_set(
    scorer: _Scorer, in_scores: Mapping[str, np.ndarray], in_batch: np.ndarray, out_pred: dict
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(report entry, per-example scores)`` of one OOD set against the test split."""
    n = len(out_pred["log_prob"])
    out_scores = scorer.per_example(out_pred)
    metrics = {k: ood_metrics(in_scores[k], out_scores[k]) for k in in_scores}
    eps = scorer.typicality_batch.epsilon
    flag_rate = None
    if n >= scorer.typicality_batch.batch_size:  # a set smaller than M has no batch to test
        out_batch = scorer.typicality_batch.score(out_scores["nll"])
        metrics["typicality_batch"] = ood_metrics(in_batch, out_batch)
        flag_rate = {"in": float((in_batch > eps).mean())}
        flag_rate["out"] = float((out_batch > eps).mean())
    entry = {
        "n": n,
        "non_finite_outputs": out_pred["non_finite"],
        "bpd": float(out_scores["bpd"].mean()),
        **({"png_bpd": float(out_pred["png_bpd"].mean())} if "png_bpd" in out_pred else {}),
        "typicality_batch_flag_rate": flag_rate,
        "metrics": metrics,
    }
    return entry, out_scores


def _write_ood_outputs(
    out_dir: Path,
    split: str,
    result: Mapping[str, Any],
    in_scores: Mapping[str, np.ndarray],
    out_scores: Mapping[str, Mapping[str, np.ndarray]],
    figures: bool,
) -> None:
    """``ood_<split>.{json,csv,md}``, ``scores_<split>.npz`` and the histogram figure."""
    rows = [
        {"ood": spec, "score": k, **m}
        for spec, entry in result["ood"].items()
        for k, m in entry["metrics"].items()
    ]
    arrays = {f"in/{k}": v for k, v in in_scores.items()}
    for spec, scores in out_scores.items():
        arrays |= {f"{spec}/{k}": v for k, v in scores.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"ood_{split}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_csv(rows, out_dir / f"ood_{split}.csv")
    (out_dir / f"ood_{split}.md").write_text(format_ood_table(result))
    np.savez_compressed(out_dir / f"scores_{split}.npz", **arrays)
    if figures:
        _plot_histograms(in_scores, out_scores, out_dir / f"scores_{split}.png")


def ood_run(
    run_dir: str | Path,
    ood: Sequence[str],
    *,
    background: str | Path | None = None,
    split: str = "test",
    dequant_samples: int = 1,
    iw_samples: int = 0,
    typicality_batch: int = 10,
    alpha: float = 0.99,
    fit_examples: int = 10_000,
    hybrid_components: Sequence[str] = HYBRID_COMPONENTS,
    data_root: str | None = None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    out_dir: str | Path | None = None,
    seed: int = 0,
    figures: bool = True,
) -> dict[str, Any]:
    """Score in-distribution ``split`` data and each OOD dataset with every OOD score.

    Writes to ``out_dir`` (default ``RUN_DIR/ood``): ``ood_<split>.json`` (all metrics),
    ``ood_<split>.csv`` (one row per OOD dataset × score), ``ood_<split>.md`` (tables),
    ``scores_<split>.npz`` (per-example scores) and, with ``figures``, ``scores_<split>.png``
    (histograms; a study leaves it out and draws its own from the ``.npz`` files).

    Args:
        run_dir: A finished run folder (``model.pt``).
        ood: OOD dataset names (see :func:`~hybridflow.data.load_dataset`); read whole unless
            given as ``NAME@SPLIT``.
        background: Run folder of a background model trained on perturbed inputs
            (``--perturb_rate``, Ren et al. 2019); enables ``likelihood_ratio``.
        dequant_samples / iw_samples: Likelihood bound, see :func:`~hybridflow.evaluation.predict`.
        typicality_batch: ``M`` of the batch typicality test.
        alpha: Bootstrap quantile of the typicality threshold.
        fit_examples: Training examples used to fit the Mahalanobis scores.
        hybrid_components: Scores combined by the hybrid score.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "ood"
    if not ood:
        raise ValueError("give at least one OOD dataset")
    if split != "test":
        # The train split fits the Mahalanobis scores and the val split the typicality test and
        # the hybrid's p-values: scoring either would test detectors on their own fitting data.
        raise ValueError(f"OOD scoring reads the test split only, got split={split!r}")
    model, cfg = load_run(run_dir, device=device)
    _check_hybrid_components(hybrid_components, _available_scores(model, background))
    bg_model = _load_background(background, model, device) if background is not None else None
    data = _load_ood_data(
        cfg, ood, split, data_root, fit_examples, torch.Generator().manual_seed(seed)
    )
    bound_kw = {"dequant_samples": dequant_samples, "iw_samples": iw_samples, "seed": seed}
    run = _OodPredictor(model, bg_model, batch_size, device, bound_kw)

    scorer = _Scorer(model.dim, typicality_batch, alpha, hybrid_components)
    scorer.fit(run(data.train_fit, False, bound=False), run(data.val_fit, False), run(data.val_cal))
    in_pred = run(data.test)
    in_scores = scorer.per_example(in_pred)
    in_batch = scorer.typicality_batch.score(in_scores["nll"])
    result: dict[str, Any] = {
        "run": run_dir.name,
        "dataset": cfg["dataset"],
        "split": split,
        "lam": cfg["lam"],
        "backbone": cfg["backbone"],
        "background": str(background) if background is not None else None,
        "dequant_samples": dequant_samples,
        "iw_samples": iw_samples,
        "typicality_batch": typicality_batch,
        "alpha": alpha,
        "hybrid_components": list(hybrid_components),
        "typicality": {
            "entropy_nats": scorer.typicality.entropy,
            "epsilon_single": scorer.typicality.epsilon,
            "epsilon_batch": scorer.typicality_batch.epsilon,
        },
        "score_descriptions": {k: OOD_SCORE_DESCRIPTIONS[k] for k in in_scores},
        "metric_descriptions": OOD_METRIC_DESCRIPTIONS,
        "in_distribution": {
            "n": len(data.test),
            "non_finite_outputs": in_pred["non_finite"],
            "bpd": float(in_scores["bpd"].mean()),
            "accuracy": _labelled_accuracy(in_pred),
        },
        "ood": {},
    }
    if "png_bpd" in in_pred:
        result["in_distribution"]["png_bpd"] = float(in_pred["png_bpd"].mean())
    out_scores = {}
    for spec, dataset in data.out.items():
        result["ood"][spec], out_scores[spec] = _score_ood_set(
            scorer, in_scores, in_batch, run(dataset)
        )
    result["score_descriptions"]["typicality_batch"] = OOD_SCORE_DESCRIPTIONS["typicality_batch"]
    _write_ood_outputs(out_dir, split, result, in_scores, out_scores, figures)
    return result
