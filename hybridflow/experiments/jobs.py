"""Results of a recipe's jobs kept beside its report, so a recipe longer than a sitting resumes.

A sitting's processes and untracked run folders end with it; a recipe that trains many small
models (the Residual Flows ablation, the NAF paper's VI figures, the flow-posterior VAEs) writes
one JSON file per finished job into ``reports/<name>/jobs/`` and commits it. A rerun reuses a
stored result only when it was made with exactly the same settings, so changing a recipe's
settings redoes its jobs rather than mixing results of two configurations.
"""

import json
import math
from pathlib import Path
from typing import Any

from ..reports import cpu_description

__all__ = ["JobStore"]


class JobStore:
    """One JSON file per job, ``{"settings", "result", "cpu"}``, in one folder.

    Args:
        folder: where the files live (created on the first ``save``).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)

    def path(self, name: str) -> Path:
        """The file of job ``name`` (``:`` and ``/`` are not kept in file names)."""
        if not name or name.startswith("."):
            raise ValueError(f"a job name must be a non-empty name not starting with '.': {name!r}")
        return self.folder / (name.replace(":", "_").replace("/", "_") + ".json")

    def load(self, name: str, settings: dict[str, Any]) -> dict[str, Any] | None:
        """The stored result of job ``name`` if it was made with these ``settings``, else None;
        the CPU it was computed on is added under ``"cpu"`` (timings must name it).

        Raises:
            ValueError: the stored file is not a job file (damaged or hand-edited): a silent
                rerun would hide that, so it is named instead.
        """
        path = self.path(name)
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
            stored_settings, result = stored["settings"], dict(stored["result"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{path} is not a job file ({error}); delete it to redo the job"
            ) from error
        if stored_settings != _as_json(settings):
            return None
        return result | {"cpu": stored.get("cpu", "not recorded")}

    def save(self, name: str, settings: dict[str, Any], result: dict[str, Any]) -> Path:
        """Store ``result`` of job ``name`` with its ``settings`` and this machine's CPU (every
        timing names its CPU); written whole or not at all."""
        path = self.path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"settings": _as_json(settings), "result": result, "cpu": cpu_description()}
        text = json.dumps(record, indent=1, allow_nan=False)
        partial = path.with_suffix(".json.partial")
        partial.write_text(text + "\n")
        partial.replace(path)
        return path

    def names(self) -> list[str]:
        """The names of the stored jobs, sorted."""
        return sorted(p.stem for p in self.folder.glob("*.json"))


def _as_json(settings: dict[str, Any]) -> Any:
    """The settings as JSON reads them back (tuples become lists), so stored and current
    settings compare equal; non-finite numbers are refused (JSON cannot hold them)."""
    for value in _leaves(settings):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"job settings must be finite numbers, got {value}")
    return json.loads(json.dumps(settings))


def _leaves(value: Any):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _leaves(item)
    else:
        yield value
