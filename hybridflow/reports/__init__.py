"""Reports: evaluate run folders (metrics, OOD, calibration, samples, attributions) and write
λ-sweep comparison reports."""

from .diagnostics import calibrate_run, explain_run, sample_run
from .ood import HYBRID_COMPONENTS, format_ood_table, ood_run
from .runs import evaluate_run
from .sweep import RESULT_COLUMNS, run_sweep, write_report

__all__ = [
    "HYBRID_COMPONENTS",
    "RESULT_COLUMNS",
    "calibrate_run",
    "evaluate_run",
    "explain_run",
    "format_ood_table",
    "ood_run",
    "run_sweep",
    "sample_run",
    "write_report",
]
