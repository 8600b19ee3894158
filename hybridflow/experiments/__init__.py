"""Experiments: grids of training runs (λ × backbone × seed × config values), each cell trained
in sequence or in worker processes, evaluated with the full suite, and the λ study report.

:mod:`~.grid` (cells, their names and configs, running them), :mod:`~.cell_worker` (the worker
process), :mod:`~.cell_eval` (one cell's evaluation) and :mod:`~.sweep` (``run_sweep``, behind
``hybridflow sweep`` and the study recipes), :mod:`~.carry` (a study's state carried between
sittings) and :mod:`~.jobs` (``JobStore``: recipes' per-job results kept beside their reports).
Rendering lives in :mod:`hybridflow.reports`.
"""

from .cell_eval import EVAL_FILE, evaluate_cell
from .grid import Cell, cell_name, expand_grid, parse_grid, read_status, run_cells, sweep_status
from .jobs import JobStore
from .sweep import SweepFailedError, run_sweep, sweep_baselines

__all__ = [
    "EVAL_FILE",
    "Cell",
    "JobStore",
    "SweepFailedError",
    "cell_name",
    "evaluate_cell",
    "expand_grid",
    "parse_grid",
    "read_status",
    "run_cells",
    "run_sweep",
    "sweep_baselines",
    "sweep_status",
]
