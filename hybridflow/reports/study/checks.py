"""Checks of a study against a paper's table, passed in by the recipe that runs the study.

:data:`RESIDUAL_FLOWS_TABLE4` checks the three directions of the Residual Flows hybrid table
(Chen et al. 2019, Table 4); a study of another paper brings its own :class:`ReproductionCheck`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .results import CellResult, _pm

__all__ = [
    "RESIDUAL_FLOWS_TABLE4",
    "SEED_TABLE",
    "Floor",
    "ReproductionCheck",
    "convergence_note",
    "floor_check",
    "reproduction_checks",
]


@dataclass(frozen=True)
class ReproductionCheck:
    """A report section that checks claims of a paper on the study's results.

    ``evaluate(results)`` returns one dict per claim (``claim``, ``reproduced``, optional
    ``within_noise``, ``detail``, ``paper``) or ``None`` when the grid lacks the cells it needs
    (the section is then left out).
    """

    title: str
    intro: str
    paper_column: str
    evaluate: Callable[[Sequence[CellResult]], list[dict[str, Any]] | None]
    verdicts: tuple[str, str] = ("reproduced", "not reproduced")


SEED_TABLE = {
    "coupling": {"0": (99.50, None), "1/D": (98.45, 1.18), "1": (95.42, 1.04)},
    "coupling+1x1": {"0": (99.56, None), "1/D": (98.93, 1.15), "1": (94.22, 1.03)},
    "residual": {"0": (99.53, None), "1/D": (99.46, 1.01), "1": (98.69, 0.99)},
}


def convergence_note(cells: Sequence[CellResult]) -> str:
    """Whether the runs behind a claim finished learning: ``"all converged"``, the cells that did
    not (``"not converged: residual λ=1 (2 of 2 seeds)"``; seeds too short to tell count as not
    converged, failed seeds are named), or ``"not recorded"``."""
    statuses = [(r, [(s or {}).get("status", "unknown") for s in r.stops]) for r in cells]
    if not any(r.stops for r in cells) or all(st == "unknown" for _, sts in statuses for st in sts):
        return "not recorded"
    limited = [
        f"{_family(r.backbone) or r.backbone} λ={r.lam} ({n} of {len(sts)} seeds)"
        for r, sts in statuses
        if (n := sum(st != "converged" for st in sts))
    ]
    failed = [f"{r.backbone} λ={r.lam} ({len(r.failed)} failed)" for r in cells if r.failed]
    parts = (["not converged: " + "; ".join(limited)] if limited else []) + failed
    return "; ".join(parts) if parts else "all converged"


def _family(backbone: str) -> str | None:
    if backbone.startswith("resflow"):
        return "residual"
    return backbone if backbone in ("coupling", "coupling+1x1") else None


def reproduction_checks(results: Sequence[CellResult]) -> list[dict[str, Any]] | None:
    """The three directions of the seed's hybrid table, checked on this grid.

    Needs the coupling, coupling+1x1 and a residual (``resflow*``) backbone at λ ∈ {0, 1/D, 1}
    (first grid point). Returns one dict per claim: ``claim``, ``reproduced`` (bool), ``detail``
    (the numbers, mean ± std over seeds), ``paper`` (Chen et al. 2019's MNIST numbers) and
    ``convergence`` (:func:`convergence_note` of the cells the claim reads), or
    ``None`` when the grid does not have those cells.
    """
    table: dict[str, dict[str, CellResult]] = {}
    for r in results:
        fam = _family(r.backbone)
        if fam and r.runs and r.lam in ("0", "1/D", "1"):
            table.setdefault(fam, {}).setdefault(r.lam, r)
    if set(table) != set(SEED_TABLE) or any(len(v) != 3 for v in table.values()):
        return None

    def acc(f, lam):
        return table[f][lam].stat("accuracy")

    def bpd(f, lam):
        return table[f][lam].stat("bpd")

    def fmt_acc(f, lam):
        return f"{f} {_pm(acc(f, lam), 100)}%"

    def noise(a, b):  # difference smaller than the seeds' combined spread
        return abs(a["mean"] - b["mean"]) <= math.hypot(a["std"], b["std"])

    couplings = ("coupling", "coupling+1x1")
    families = ("residual", *couplings)

    def cells(lams):
        return [table[f][lam] for f in families for lam in lams]

    checks = []
    # (i) residual blocks keep accuracy best as λ grows
    ok = all(
        acc("residual", lam)["mean"] >= acc(c, lam)["mean"]
        for lam in ("1/D", "1")
        for c in couplings
    )
    tied = any(noise(acc("residual", lam), acc(c, lam)) for lam in ("1/D", "1") for c in couplings)
    checks.append(
        {
            "claim": "(i) residual blocks keep accuracy best as λ grows",
            "reproduced": ok,
            "within_noise": tied,
            "detail": "; ".join(
                f"λ={lam}: " + ", ".join(fmt_acc(f, lam) for f in ("residual", *couplings))
                for lam in ("1/D", "1")
            ),
            "paper": "λ=1/D: 99.46 vs 98.45, 98.93; λ=1: 98.69 vs 95.42, 94.22",
            "convergence": convergence_note(cells(("1/D", "1"))),
        }
    )
    # (ii) λ = 1 costs coupling models the most accuracy
    drops = {f: 100 * (acc(f, "0")["mean"] - acc(f, "1")["mean"]) for f in SEED_TABLE}
    ok = all(drops[c] > drops["residual"] for c in couplings)
    checks.append(
        {
            "claim": "(ii) λ = 1 costs coupling models the most accuracy",
            "reproduced": ok,
            "within_noise": None,
            "detail": "accuracy drop from λ=0 to λ=1: "
            + ", ".join(f"{f} {drops[f]:.2f} points" for f in (*couplings, "residual")),
            "paper": "drops 4.08 (coupling), 5.34 (+1×1), 0.84 (residual) points",
            "convergence": convergence_note(cells(("0", "1"))),
        }
    )
    # (iii) residual blocks give the lowest bits/dim at λ > 0
    ok = all(
        bpd("residual", lam)["mean"] < bpd(c, lam)["mean"]
        for lam in ("1/D", "1")
        for c in couplings
    )
    tied = any(noise(bpd("residual", lam), bpd(c, lam)) for lam in ("1/D", "1") for c in couplings)
    checks.append(
        {
            "claim": "(iii) residual blocks give the lowest bits/dim at λ > 0",
            "reproduced": ok,
            "within_noise": tied,
            "detail": "; ".join(
                f"λ={lam}: "
                + ", ".join(f"{f} {_pm(bpd(f, lam), 1, 3)}" for f in ("residual", *couplings))
                for lam in ("1/D", "1")
            ),
            "paper": "λ=1/D: 1.01 vs 1.18, 1.15; λ=1: 0.99 vs 1.04, 1.03",
            "convergence": convergence_note(cells(("1/D", "1"))),
        }
    )
    return checks


RESIDUAL_FLOWS_TABLE4 = ReproductionCheck(
    title="Reproduction of the Residual Flows hybrid table (Chen et al. 2019, Table 4)",
    intro=(
        "Directions of the seed's table (MNIST, paper's models) checked on this grid; "
        "'within seed noise' means a difference no larger than the seeds' combined "
        "standard deviation."
    ),
    paper_column="paper (MNIST)",
    evaluate=reproduction_checks,
)


@dataclass(frozen=True)
class Floor:
    """A number a study must reach: the best selected cell's value (or every one's) against a
    bound.

    Attributes:
        claim: What is required, e.g. ``"λ = 0: best backbone ≥ 92.5% accuracy"``.
        value: The cell's number (e.g. a mean over seeds); ``None`` where it has none.
        bound: The floor (or ceiling, with ``higher=False``).
        higher: Whether larger values are better.
        cells: Which cells the floor reads.
        every: Every selected cell must pass (else only the best one).
        scale, digits: How the numbers are shown.
    """

    claim: str
    value: Callable[[CellResult], float | None]
    bound: float
    higher: bool = True
    cells: Callable[[CellResult], bool] = lambda r: True
    every: bool = False
    scale: float = 1.0
    digits: int = 3

    def evaluate(self, results: Sequence[CellResult]) -> dict[str, Any] | None:
        """The claim dict of a :class:`ReproductionCheck`; ``None`` when no cell is selected.
        With ``every``, a selected cell without a finite value (failed, or lacking the metric)
        misses the floor and is named."""
        selected = [r for r in results if self.cells(r)]
        values = [(r, self.value(r) if r.runs else None) for r in selected]
        picked = [(r, v) for r, v in values if v is not None and math.isfinite(v)]
        missing = [r for r, v in values if v is None or not math.isfinite(v)]
        if not picked and not (self.every and missing):
            return None
        passes = [(v >= self.bound) if self.higher else (v <= self.bound) for _, v in picked]
        shown = picked
        if not self.every:
            shown = [(max if self.higher else min)(picked, key=lambda rv: rv[1])]
        detail = ", ".join(
            f"{r.backbone} λ={r.lam} {self.scale * v:.{self.digits}f}" for r, v in shown
        )
        if self.every and missing:
            detail += (
                ("; " if detail else "")
                + "no value: "
                + ", ".join(f"{r.backbone} λ={r.lam}" for r in missing)
            )
        return {
            "claim": self.claim,
            "reproduced": (all(passes) and not missing) if self.every else any(passes),
            "within_noise": None,
            "detail": detail,
            "paper": ("≥ " if self.higher else "≤ ") + f"{self.scale * self.bound:g}",
            "convergence": convergence_note([r for r, _ in shown]),
        }


def floor_check(title: str, intro: str, floors: Sequence[Floor]) -> ReproductionCheck:
    """A report section that states, per floor, whether the study reached it (the numbers and
    whether the cells behind them converged)."""

    def evaluate(results: Sequence[CellResult]) -> list[dict[str, Any]] | None:
        claims = [c for f in floors if (c := f.evaluate(results))]
        return claims or None

    return ReproductionCheck(title, intro, "floor", evaluate, verdicts=("met", "missed"))
