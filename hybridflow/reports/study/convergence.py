"""Convergence in a λ study: why each run stopped, its learning curves, and the cells compared at
equal wall time (:mod:`hybridflow.training.stopping` sets the rule each run records)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from ..document import Table
from .figures import _read_metrics
from .results import CellResult, _backbones, _lams

__all__ = [
    "convergence_table",
    "draw_convergence_curves",
    "equal_time_table",
    "read_validation_curve",
]

_REASONS = {
    "plateau": "plateau",
    "budget_minutes": "time budget",
    "max_epochs": "max epochs",
    "max_steps": "max steps",
}


def read_validation_curve(run_dir: Path) -> list[dict[str, float]]:
    """The validation rows of a run's ``metrics.csv``: step, elapsed_s, bpd, accuracy,
    class_nll (a metric the run did not log is absent from its rows)."""
    keys = ("step", "elapsed_s", "bpd", "accuracy", "class_nll")
    return [
        {k: float(row[k]) for k in keys if row.get(k) not in (None, "")}
        for row in _read_metrics(Path(run_dir))
        if row.get("split") == "val"
    ]


def _seconds(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _improvement_text(stop: Mapping[str, Any] | None) -> str:
    if not stop or stop.get("improvement") is None:
        return "–"
    return f"{100 * stop['improvement']:.2f}%"


def convergence_table(results: Sequence[CellResult]) -> Table:
    """Per cell: each seed's status (converged / budget-limited), why it stopped, its
    last-quarter improvement of the monitored validation metric, steps and training time."""
    header = ["backbone", "λ", "status per seed", "stopped by", "last-quarter improvement"]
    header += ["monitored", "steps", "train time (s)"]
    rows = []
    for r in results:
        stops = [s or {} for s in r.stops]
        if not stops:
            continue
        statuses = [s.get("status", "unknown") for s in stops]
        rows.append(
            [
                r.backbone,
                r.lam,
                ", ".join(statuses),
                ", ".join(_REASONS.get(s.get("reason", ""), "–") for s in stops),
                ", ".join(_improvement_text(s) for s in stops),
                stops[0].get("metric", "–"),
                ", ".join(f"{s['step']:,}" if "step" in s else "–" for s in stops),
                ", ".join(_seconds(s["elapsed_s"]) if "elapsed_s" in s else "–" for s in stops),
            ]
        )
    return Table(header, rows)


def _at_time(curve: Sequence[Mapping[str, float]], limit: float) -> Mapping[str, float] | None:
    """The last validation row logged at or before ``limit`` seconds of training."""
    before = [row for row in curve if row.get("elapsed_s", math.inf) <= limit]
    return before[-1] if before else None


def _mean(points: Sequence[Mapping[str, float]], key: str, scale: float, digits: int) -> str:
    values = [scale * p[key] for p in points if key in p]
    return f"{statistics.fmean(values):.{digits}f}" if values else "–"


def equal_time_table(results: Sequence[CellResult]) -> tuple[Table, dict[str, float]] | None:
    """Validation accuracy and bits/dim of every backbone at the same training time, per λ.

    The time of a λ is the shortest of its cells' training (the median over seeds of each
    cell's last validation); each run contributes its last validation at or before it.
    Returns the table and the time per λ, or ``None`` without two backbones to compare.
    """
    if len(_backbones(results)) < 2:
        return None
    rows: list[list[str]] = []
    times: dict[str, float] = {}
    for lam in _lams(results):
        cells = [r for r in results if r.lam == lam and r.runs]
        curves = {id(r): [read_validation_curve(d) for d in r.run_dirs] for r in cells}
        ends = [
            statistics.median(c[-1]["elapsed_s"] for c in curves[id(r)] if c)
            for r in cells
            if any(curves[id(r)])
        ]
        if len(ends) < 2:
            continue
        limit = times[lam] = min(ends)
        for r in cells:
            points = [p for c in curves[id(r)] if (p := _at_time(c, limit))]
            if not points:
                rows.append([r.backbone, lam, _seconds(limit), "–", "–", "–"])
                continue

            steps = ", ".join(f"{int(p['step']):,}" for p in points)
            acc = _mean(points, "accuracy", 100, 2)
            bpd = _mean(points, "bpd", 1, 3) if lam != "0" else "–"  # untrained density
            rows.append([r.backbone, lam, _seconds(limit), acc, bpd, steps])
    if not rows:
        return None
    header = ["backbone", "λ", "at time (s)", "val accuracy %", "val bits/dim", "at steps"]
    return Table(header, rows), times


def draw_convergence_curves(results: Sequence[CellResult], path: Path) -> bool:
    """Validation bits/dim and accuracy of every run against steps and against training time:
    one row per backbone, one colour per λ, one line style per seed; ``×`` where the plateau
    rule or the budget stopped a run. Returns whether anything was drawn."""
    backbones, lams = _backbones(results), _lams(results)
    fig = Figure(figsize=(16.0, 3.2 * len(backbones)), layout="constrained")
    colours = {lam: f"C{i}" for i, lam in enumerate(lams)}
    panels = (("bpd", "step"), ("bpd", "elapsed_s"), ("accuracy", "step"))
    panels += (("accuracy", "elapsed_s"),)
    drawn = False
    for i, backbone in enumerate(backbones):
        axes = [fig.add_subplot(len(backbones), 4, 4 * i + j + 1) for j in range(4)]
        for r in results:
            if r.backbone != backbone:
                continue
            for k, (run_dir, stop) in enumerate(zip(r.run_dirs, r.stops, strict=True)):
                curve = read_validation_curve(run_dir)
                for ax, (metric, x) in zip(axes, panels, strict=True):
                    pts = [(p[x], p[metric]) for p in curve if metric in p and x in p]
                    if metric == "bpd" and r.lam == "0":
                        continue  # λ = 0 leaves the density untrained: off the scale
                    if not pts:
                        continue
                    xs, ys = zip(*pts, strict=True)
                    ys = [100 * y for y in ys] if metric == "accuracy" else list(ys)
                    label = f"λ={r.lam}" if k == 0 else None
                    style = ("-", "--", ":", "-.")[k % 4]
                    ax.plot(xs, ys, style, color=colours[r.lam], lw=1.2, label=label)
                    if stop and stop.get("reason") in ("plateau", "budget_minutes"):
                        ax.plot(xs[-1], ys[-1], "x", color=colours[r.lam], ms=7)
                    drawn = True
        for ax, (metric, x) in zip(axes, panels, strict=True):
            what = "bits/dim" if metric == "bpd" else "accuracy (%)"
            ax.set_title(f"{backbone}: validation {what}", fontsize=10)
            ax.set_xlabel("step" if x == "step" else "training time (s)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if drawn:
        fig.savefig(path, dpi=90)
    return drawn
