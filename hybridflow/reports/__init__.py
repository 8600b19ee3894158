"""Reports: evaluate run folders (metrics, OOD, calibration, samples, attributions) and render
documents (tables, figures, provenance), the λ study report among them.

Running grids and sweeps moved to :mod:`hybridflow.experiments`; its names are still found here
for one release (deprecated).
"""

from .diagnostics import calibrate_run, explain_run, sample_run
from .document import Document, Table, cpu_description, git_commit, package_versions
from .ood import HYBRID_COMPONENTS, format_ood_table, ood_run
from .runs import evaluate_run
from .study import reproduction_checks, write_study_report

__all__ = [
    "HYBRID_COMPONENTS",
    "Document",
    "Table",
    "calibrate_run",
    "cpu_description",
    "evaluate_run",
    "explain_run",
    "format_ood_table",
    "git_commit",
    "ood_run",
    "package_versions",
    "reproduction_checks",
    "sample_run",
    "write_study_report",
]

# Deprecated: moved to hybridflow.experiments (issue 30); looked up lazily, since experiments
# imports this package.
_MOVED = frozenset(
    {
        "Cell",
        "SweepFailedError",
        "evaluate_cell",
        "expand_grid",
        "parse_grid",
        "run_cells",
        "run_sweep",
        "sweep_baselines",
    }
)


def __getattr__(name: str):
    if name in _MOVED:
        from .. import experiments

        return getattr(experiments, name)
    raise AttributeError(f"module 'hybridflow.reports' has no attribute {name!r}")
