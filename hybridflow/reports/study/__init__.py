"""The λ study report: the results model, a paper's checks, the figures and the document.

:mod:`~.results` (flat metrics per run, seeds grouped per cell), :mod:`~.checks` (claims of a
paper checked on the results, passed in by the recipe), :mod:`~.figures` and :mod:`~.writer`
(``results.csv``, ``results.json``, ``report.md``, ``report.html``, one function per section).
Training and evaluating the cells is :mod:`hybridflow.experiments`'s job.
"""

from ..document import git_commit
from .checks import (
    RESIDUAL_FLOWS_TABLE4,
    SEED_TABLE,
    Floor,
    ReproductionCheck,
    floor_check,
    reproduction_checks,
)
from .results import CellResult, aggregate, flat_metrics
from .writer import write_study_report

__all__ = [
    "RESIDUAL_FLOWS_TABLE4",
    "SEED_TABLE",
    "CellResult",
    "Floor",
    "ReproductionCheck",
    "aggregate",
    "flat_metrics",
    "floor_check",
    "git_commit",
    "reproduction_checks",
    "write_study_report",
]


def __getattr__(name: str):
    # Deprecated: the cell evaluation moved to hybridflow.experiments (issue 30).
    if name in ("EVAL_FILE", "evaluate_cell"):
        from ... import experiments

        return getattr(experiments, name)
    raise AttributeError(f"module 'hybridflow.reports.study' has no attribute {name!r}")
