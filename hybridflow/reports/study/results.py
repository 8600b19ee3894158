"""The results of a λ study: one run's evaluation as flat metrics, and seeds grouped per cell."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...models import Lambda

__all__ = ["CellResult", "aggregate", "flat_metrics"]


def flat_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """One run's evaluation as flat ``metric -> number`` (the columns of ``results.csv``).

    OOD metrics are ``ood/<set>/<score>/<metric>``, their means over the sets
    ``ood/mean/<score>/<metric>``; selective accuracies ``selective/<by>/acc@80`` etc.
    """
    test = evaluation["test"]
    out: dict[str, float] = {}
    for key in ("accuracy", "bpd", "nll_nats", "ece", "brier", "class_nll"):
        if key in test:
            out[key] = float(test[key])
    if "iw" in evaluation:
        out["bpd_iw"] = float(evaluation["iw"]["bpd"])
    cal = evaluation.get("calibration")
    if cal:
        out["temperature"] = float(cal["temperature"])
        for key in ("adaptive_ece", "mce", "classwise_ece"):
            out[key] = float(cal["before"][key])
        for key in ("ece", "adaptive_ece", "mce", "brier", "nll"):
            out[f"{'class_nll' if key == 'nll' else key}_ts"] = float(cal["after"][key])
    for by, values in test.get("selective", {}).items():
        for key, value in values.items():
            out[f"selective/{by}/{key}"] = float(value)
    ood = evaluation.get("ood")
    if ood:
        per_score: dict[tuple[str, str], list[float]] = {}
        for spec, entry in ood["ood"].items():
            out[f"ood_bpd/{spec}"] = float(entry["bpd"])
            for score, metrics in entry["metrics"].items():
                for metric, value in metrics.items():
                    out[f"ood/{spec}/{score}/{metric}"] = float(value)
                    per_score.setdefault((score, metric), []).append(float(value))
        for (score, metric), values in per_score.items():
            out[f"ood/mean/{score}/{metric}"] = float(np.mean(values))
        out["test_bpd_ood_pass"] = float(ood["in_distribution"]["bpd"])
    out["num_parameters"] = float(test["num_parameters"])
    out["train_time_s"] = float(evaluation.get("train_time_s", float("nan")))
    fid = (evaluation.get("samples") or {}).get("fid")
    if fid:
        out["fid"] = float(fid["by_temperature"]["1"])
        out["fid_best"] = float(fid["best"])
        out["fid_best_temperature"] = float(fid["best_temperature"])
    stop = evaluation.get("stopped") or {}
    if stop.get("improvement") is not None:
        out["last_quarter_improvement"] = float(stop["improvement"])
    if stop.get("status") in ("converged", "budget-limited"):
        out["converged"] = float(stop["status"] == "converged")
    return out


@dataclass
class CellResult:
    """A group of seeds: its coordinates, per-seed metrics, stop records and failures."""

    backbone: str
    lam: str
    point: tuple[tuple[str, Any], ...]
    seeds: list[int] = field(default_factory=list)
    runs: list[dict[str, float]] = field(default_factory=list)
    failed: list[tuple[int, str]] = field(default_factory=list)
    run_dirs: list[Path] = field(default_factory=list)
    stops: list[dict[str, Any] | None] = field(default_factory=list)  # why each run stopped
    fid_label: str | None = None  # the feature network of the cells' Fréchet distances

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.point)
        return f"{self.backbone} λ={self.lam}" + (f" ({extra})" if extra else "")

    def stat(self, metric: str) -> dict[str, Any] | None:
        values = [r[metric] for r in self.runs if metric in r]
        if not values:
            return None
        return {
            "mean": float(np.mean(values)),
            "std": float(statistics.stdev(values)) if len(values) > 1 else 0.0,
            "n": len(values),
            "values": values,
            "seeds": [s for s, r in zip(self.seeds, self.runs, strict=True) if metric in r],
        }


def aggregate(cells, statuses, evaluations) -> list[CellResult]:
    """Group the cells' runs over seeds (``cells`` from :func:`~.grid.expand_grid`)."""
    groups: dict[Any, CellResult] = {}
    for cell in cells:
        group = groups.setdefault(cell.group, CellResult(cell.backbone, cell.lam, cell.point))
        status = statuses.get(cell.name, {})
        if status.get("status") == "done" and cell.name in evaluations:
            metrics = flat_metrics(evaluations[cell.name])
            group.seeds.append(cell.seed)
            group.runs.append(metrics)
            group.run_dirs.append(cell.run_dir)
            group.stops.append(evaluations[cell.name].get("stopped"))
            fid = (evaluations[cell.name].get("samples") or {}).get("fid")
            if fid:
                group.fid_label = f"{fid['label']}, {fid['samples']:,} samples vs {fid['real']:,}"
        else:
            group.failed.append((cell.seed, status.get("error", "did not run")))
    return list(groups.values())


def _lam_sort_key(lam: str) -> tuple[int, float, str]:
    """0, then 1/D, then numbers ascending; a label that is no λ last."""
    try:
        return (*Lambda.parse(lam).sort_key, lam)
    except ValueError:
        return (3, math.inf, lam)


def _lams(results: Sequence[CellResult]) -> list[str]:
    return sorted({r.lam for r in results}, key=_lam_sort_key)


def _backbones(results: Sequence[CellResult]) -> list[str]:
    return list(dict.fromkeys(r.backbone for r in results))


def _series(results, backbone, point=None):
    """The cells of one backbone (and grid point), in λ order."""
    rows = [r for r in results if r.backbone == backbone and r.runs]
    if point is not None:
        rows = [r for r in rows if r.point == point]
    return sorted(rows, key=lambda r: _lam_sort_key(r.lam))


def _points(results):
    return list(dict.fromkeys(r.point for r in results))


def _point_label(point) -> str:
    return ", ".join(f"{k}={v}" for k, v in point)


def _pm(stat: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` of a :meth:`CellResult.stat` (the std only over more than one seed)."""
    if stat is None:
        return "–"
    text = f"{scale * stat['mean']:.{digits}f}"
    return text + (f" ± {scale * stat['std']:.{digits}f}" if stat["n"] > 1 else "")
