"""Reports: evaluate run folders and write λ-sweep comparison reports."""

from .runs import evaluate_run
from .sweep import RESULT_COLUMNS, run_sweep, write_report

__all__ = ["RESULT_COLUMNS", "evaluate_run", "run_sweep", "write_report"]
