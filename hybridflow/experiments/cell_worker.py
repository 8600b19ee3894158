"""Worker process of a grid: ``python -m hybridflow.experiments.cell_worker``.

Reads one job file path per line on stdin until it closes. Each ``JOB.json`` holds ``config``
(the cell's resolved training config), ``evaluate`` (keywords of
:func:`~hybridflow.reports.study.evaluate_cell`, or null) and ``threads``; the outcome goes to
the cell's ``cell.json`` (:func:`~hybridflow.reports.grid.run_cell`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from hybridflow.experiments.grid import run_cell

__all__: list[str] = []

if __name__ == "__main__":
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(Path(line.strip()).read_text())
        status = run_cell(job["config"], job["evaluate"], job["threads"])
        print(f"{job['config']['name']}: {status['status']}", flush=True)
        if status["status"] != "done":
            print(status.get("traceback") or status.get("error"), flush=True)
