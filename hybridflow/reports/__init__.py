"""Reports: evaluate run folders (metrics, OOD, calibration, samples, attributions) and run λ
studies (grids of λ × backbone × seed) into one comparison report."""

from .diagnostics import calibrate_run, explain_run, sample_run
from .document import Document, Table, git_commit, package_versions
from .grid import Cell, expand_grid, parse_grid, run_cells
from .ood import HYBRID_COMPONENTS, format_ood_table, ood_run
from .runs import evaluate_run
from .study import evaluate_cell, reproduction_checks, write_study_report
from .sweep import SweepFailedError, run_sweep, sweep_baselines

__all__ = [
    "HYBRID_COMPONENTS",
    "Cell",
    "Document",
    "SweepFailedError",
    "Table",
    "calibrate_run",
    "evaluate_cell",
    "evaluate_run",
    "expand_grid",
    "explain_run",
    "format_ood_table",
    "git_commit",
    "ood_run",
    "package_versions",
    "parse_grid",
    "reproduction_checks",
    "run_cells",
    "run_sweep",
    "sample_run",
    "sweep_baselines",
    "write_study_report",
]
