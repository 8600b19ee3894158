"""``metrics.csv``: one row per logged training step or validation, exact across resumes."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["MetricsLog"]


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


class MetricsLog:
    """Appends rows to a CSV file; :meth:`rewind` makes a resumed run's file exact.

    Every row is written and closed at once, so a killed run keeps everything it logged. Rows
    logged after the checkpoint a run resumes from are logged again when the run replays those
    steps, hence :meth:`rewind` before resuming.
    """

    FIELDS = (
        "step",
        "epoch",
        "split",
        "lr",
        "loss",
        "ce",
        "nll_nats",
        "bpd",
        "accuracy",
        "ece",
        "brier",
        "class_nll",
        "nan_skips",
        "elapsed_s",
    )

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            self._rewrite([])

    def write(self, row: Mapping[str, Any]) -> None:
        """Append one row; missing or ``None`` fields stay empty, floats get 6 digits."""
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow(
                ["" if row.get(k) is None else _fmt(row[k]) for k in self.FIELDS]
            )

    def rows(self) -> list[dict[str, str]]:
        """The logged rows as raw strings (a torn last line, from a kill mid-write, is skipped)."""
        with self.path.open(newline="") as f:
            return [
                r
                for r in csv.DictReader(f)
                if None not in r and None not in r.values() and r["step"].isdigit()
            ]

    def rewind(self, step: int, keep_val_at_step: bool = True) -> None:
        """Keep only rows up to ``step`` (and its validation row if ``keep_val_at_step``)."""
        keep = [
            r
            for r in self.rows()
            if int(r["step"]) < step
            or (int(r["step"]) == step and (keep_val_at_step or r["split"] != "val"))
        ]
        self._rewrite(keep)

    def has_row(self, step: int, split: str) -> bool:
        return any(int(r["step"]) == step and r["split"] == split for r in self.rows())

    def _rewrite(self, rows: list[dict[str, str]]) -> None:
        # Replace atomically: a kill during the rewrite leaves the old file, never half of it.
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS, extrasaction="ignore", restval="")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
