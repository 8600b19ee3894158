"""The figures of a λ study report, each drawn for every cell at once."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
from matplotlib.figure import Figure

from ...evaluation.calibration import reliability_bins
from ...runs import METRICS_FILE
from .results import _backbones, _lams, _point_label, _points, _series

__all__ = ["FIGURES", "bits_per_dim_axis_is_log"]

LOG_AXIS_SPAN = 5.0  # largest / smallest bits/dim above which the trade-off plot goes log
MIN_GRID_WIDTH = 4.6  # inches: a one-cell grid still fits its title


def bits_per_dim_axis_is_log(values: list[float]) -> bool:
    """Whether the trade-off plot's bits/dim axis is logarithmic: only where the points span
    more than :data:`LOG_AXIS_SPAN` (λ = 0 cells far above the rest)."""
    return bool(values) and max(values) / min(values) > LOG_AXIS_SPAN


def _fig_tradeoff(results, path: Path) -> None:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.add_subplot()
    drawn_x: list[float] = []
    for backbone in _backbones(results):
        for point in _points(results):
            rows = _series(results, backbone, point)
            if not rows:
                continue
            x = [r.stat("bpd")["mean"] for r in rows]
            y = [100 * r.stat("accuracy")["mean"] for r in rows]
            xe = [r.stat("bpd")["std"] for r in rows]
            ye = [100 * r.stat("accuracy")["std"] for r in rows]
            label = backbone + (f" ({_point_label(point)})" if point else "")
            line = ax.errorbar(x, y, xerr=xe, yerr=ye, marker="o", capsize=3, label=label)
            drawn_x += [v for v in x if math.isfinite(v) and v > 0]
            for r, xi, yi in zip(rows, x, y, strict=True):
                ax.annotate(
                    f"λ={r.lam}",
                    (xi, yi),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=8,
                    color=line[0].get_color(),
                )
    # λ = 0 cells can sit orders of magnitude above the rest: a log axis then, a linear one
    # where all points share a decade (log ticks there read "2.025×10⁰").
    if bits_per_dim_axis_is_log(drawn_x):
        ax.set_xscale("log")
        ax.set_xlabel("test bits/dim (log scale; lower is better)")
    else:
        ax.set_xlabel("test bits/dim (lower is better)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy against bits/dim across λ (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.savefig(path, dpi=110)


def _score_names(results) -> list[str]:
    names: dict[str, None] = {}
    for r in results:
        for run in r.runs:
            for key in run:
                if key.startswith("ood/mean/") and key.endswith("/auroc"):
                    names[key.split("/")[2]] = None
    return list(names)


def _fig_ood_auroc(results, path: Path) -> bool:
    scores = _score_names(results)
    if not scores:
        return False
    lams = _lams(results)
    cols = min(4, len(scores))
    rows_n = math.ceil(len(scores) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.8 * rows_n + 0.4), layout="constrained")
    for i, score in enumerate(scores):
        ax = fig.add_subplot(rows_n, cols, i + 1)
        for backbone in _backbones(results):
            for point in _points(results):
                rows = _series(results, backbone, point)
                stats = [(lams.index(r.lam), r.stat(f"ood/mean/{score}/auroc")) for r in rows]
                stats = [(x, s) for x, s in stats if s is not None]
                if not stats:
                    continue
                ax.errorbar(
                    [x for x, _ in stats],
                    [s["mean"] for _, s in stats],
                    yerr=[s["std"] for _, s in stats],
                    marker="o",
                    capsize=3,
                    label=backbone + (f" ({_point_label(point)})" if point else ""),
                )
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(range(len(lams)), lams)
        ax.set_xlabel("λ")
        ax.set_title(score, fontsize=10)
        if i % cols == 0:
            ax.set_ylabel("AUROC (mean over OOD sets)")
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle("OOD AUROC against λ per score (higher = better; 0.5 = chance)")
    fig.savefig(path, dpi=100)
    return True


def _grid_axes(results, width=2.6, height=2.4):
    """A figure with one panel per (backbone, λ) cell of the first grid point and seed."""
    backbones, lams = _backbones(results), _lams(results)
    fig = Figure(
        figsize=(max(width * len(lams) + 0.6, MIN_GRID_WIDTH), height * len(backbones) + 0.6),
        layout="constrained",
    )
    panels = {}
    for i, b in enumerate(backbones):
        for j, lam in enumerate(lams):
            cell = next((r for r in results if r.backbone == b and r.lam == lam and r.runs), None)
            ax = fig.add_subplot(len(backbones), len(lams), i * len(lams) + j + 1)
            ax.set_title(f"{b}, λ={lam}", fontsize=9)
            panels[(b, lam)] = (ax, cell)
    return fig, panels


def _fig_reliability(results, path: Path) -> bool:
    fig, panels = _grid_axes(results)
    drawn = False
    for ax, cell in panels.values():
        file = cell.run_dirs[0] / "eval_test.npz" if cell else None
        if file is None or not file.exists():
            ax.set_axis_off()
            continue
        data = np.load(file)
        if data["logits"].shape[1] < 2:
            ax.set_axis_off()
            continue
        z = data["logits"] - data["logits"].max(1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
        bins = reliability_bins(probs, data["labels"], 15)
        centres = (bins["edges"][:-1] + bins["edges"][1:]) / 2
        ok = bins["count"] > 0
        ax.bar(
            centres[ok], bins["accuracy"][ok], width=1 / 15, edgecolor="k", lw=0.4, label="accuracy"
        )
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence", fontsize=8)
        ax.set_ylabel("accuracy", fontsize=8)
        ece = cell.runs[0].get("ece", float("nan"))
        ax.text(0.04, 0.9, f"ECE {100 * ece:.2f}%", fontsize=8, transform=ax.transAxes)
        drawn = True
    fig.suptitle("Reliability on test (15 bins, before TS; first seed)", fontsize=10)
    fig.savefig(path, dpi=90)
    return drawn


def _fig_bpd_hist(results, path: Path) -> bool:
    fig, panels = _grid_axes(results)
    drawn = False
    for ax, cell in panels.values():
        file = cell.run_dirs[0] / "ood" / "scores_test.npz" if cell else None
        if file is None or not file.exists():
            ax.set_axis_off()
            continue
        data = np.load(file)
        groups = {"test (in)": data["in/bpd"]}
        groups |= {
            k.rsplit("/", 1)[0]: data[k]
            for k in data.files
            if k.endswith("/bpd") and not k.startswith("in/")
        }
        values = np.concatenate(list(groups.values()))
        values = values[np.isfinite(values) & (np.abs(values) < 1e6)]
        lo, hi = np.quantile(values, [0.002, 0.998])
        bins = np.linspace(lo, hi if hi > lo else lo + 1, 50)
        for label, v in groups.items():
            ax.hist(
                np.clip(v, lo, hi),
                bins=bins,
                alpha=0.45,
                density=True,
                histtype="stepfilled",
                label=label.removeprefix("npz:").split("/")[-1],
            )
        ax.set_xlabel("bits/dim", fontsize=8)
        ax.tick_params(labelsize=7)
        drawn = True
    if drawn:
        handles, labels = next(
            (ax.get_legend_handles_labels() for ax, c in panels.values() if c and ax.has_data()),
            ([], []),
        )
        fig.legend(
            handles, labels, loc="outside lower center", ncols=min(6, len(labels)), fontsize=8
        )
    fig.suptitle("Test vs OOD bits/dim (first seed; 0.2–99.8% range)", fontsize=10)
    fig.savefig(path, dpi=90)
    return drawn


def _fig_samples(results, path: Path) -> bool:
    fig, panels = _grid_axes(results, width=2.4, height=2.6)
    drawn = False
    for ax, cell in panels.values():
        ax.set_axis_off()
        file = cell.run_dirs[0] / "samples" / "samples_T1.png" if cell else None
        if file is None or not file.exists():
            continue
        ax.imshow(mpimg.imread(file), cmap="gray", interpolation="nearest")
        bpd = cell.runs[0].get("bpd")
        ax.set_title(ax.get_title() + (f"\ntest {bpd:.2f} bits/dim" if bpd else ""), fontsize=8)
        drawn = True
    fig.suptitle("Samples at temperature 1 (first seed)", fontsize=10)
    fig.savefig(path, dpi=100)
    return drawn


def _read_metrics(run_dir: Path) -> list[dict[str, str]]:
    path = run_dir / METRICS_FILE
    return list(csv.DictReader(path.open())) if path.exists() else []


def _fig_curves(results, path: Path) -> bool:
    backbones, lams = _backbones(results), _lams(results)
    fig = Figure(figsize=(4.0 * len(backbones), 6.0), layout="constrained")
    drawn = False
    for j, backbone in enumerate(backbones):
        ax_bpd = fig.add_subplot(2, len(backbones), j + 1)
        ax_acc = fig.add_subplot(2, len(backbones), len(backbones) + j + 1)
        for lam in lams:
            cell = next(
                (r for r in results if r.backbone == backbone and r.lam == lam and r.runs), None
            )
            if cell is None:
                continue
            rows = _read_metrics(cell.run_dirs[0])
            train = [r for r in rows if r["split"] == "train" and r["bpd"]]
            val = [r for r in rows if r["split"] == "val" and r["accuracy"]]
            if train:
                ax_bpd.plot(
                    [int(r["step"]) for r in train],
                    [float(r["bpd"]) for r in train],
                    label=f"λ={lam}",
                    lw=1,
                )
                drawn = True
            if val:
                ax_acc.plot(
                    [int(r["step"]) for r in val],
                    [100 * float(r["accuracy"]) for r in val],
                    "o-",
                    label=f"λ={lam}",
                    ms=3,
                )
            train_acc = [r for r in train if r["accuracy"]]
            if train_acc and not val:
                ax_acc.plot(
                    [int(r["step"]) for r in train_acc],
                    [100 * float(r["accuracy"]) for r in train_acc],
                    lw=1,
                    label=f"λ={lam} (train)",
                )
        ax_bpd.set_yscale("log")
        ax_bpd.set_title(f"{backbone}: train bits/dim", fontsize=10)
        ax_acc.set_title(f"{backbone}: validation accuracy (%)", fontsize=10)
        ax_acc.set_xlabel("step")
        for ax in (ax_bpd, ax_acc):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle("Training curves (first seed)")
    fig.savefig(path, dpi=90)
    return drawn


#: Every figure of the report: file name -> (draw(results, path), alt text). A function that
#: returns ``False`` had nothing to draw (no OOD sets, no image samples, ...).
FIGURES = {
    "tradeoff.png": (_fig_tradeoff, "Accuracy against bits/dim across λ"),
    "ood_auroc.png": (_fig_ood_auroc, "OOD AUROC against λ per score"),
    "reliability.png": (_fig_reliability, "Reliability diagrams per cell"),
    "bpd_hist.png": (_fig_bpd_hist, "Test vs OOD bits/dim histograms"),
    "samples.png": (_fig_samples, "Samples per cell"),
    "curves.png": (_fig_curves, "Training curves"),
}
