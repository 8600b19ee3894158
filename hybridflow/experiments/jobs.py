"""Results of a recipe's jobs kept beside its report, so a recipe longer than a sitting resumes.

A sitting's processes and untracked run folders end with it; a recipe that trains many small
models (the Residual Flows ablation, the NAF paper's VI figures, the flow-posterior VAEs) writes
one JSON file per finished job into ``reports/<name>/jobs/`` and commits it. A rerun reuses a
stored result only when it was made with exactly the same settings, so changing a recipe's
settings redoes its jobs rather than mixing results of two configurations.
"""

import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..reports import cpu_description

__all__ = ["JobStore"]


class JobStore:
    """One JSON file per job, ``{"name", "settings", "cpu", "result"}``, in one folder.

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
        """The stored result of job ``name`` if it was made with these ``settings``, else None
        (saying on stderr which settings differ); the CPU it was computed on is added under
        ``"cpu"`` (timings must name it).

        Raises:
            ValueError: the stored file is not a job file (damaged or hand-edited), or is
                another job's whose name maps to the same file: a silent rerun would hide
                that, so it is named instead.
        """
        path, current = self.path(name), _as_json(settings, name)
        if not path.exists():
            return None
        try:
            stored = json.loads(path.read_text())
            stored_settings, result = stored["settings"], dict(stored["result"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(
                f"{path} is not a job file ({error}); delete it to redo the job"
            ) from error
        if stored.get("name", name) != name:
            raise ValueError(f"{path} holds job {stored['name']!r}, not {name!r}: rename one")
        if stored_settings != current:
            missing = object()  # a key on one side only differs even when the other holds None
            changed = sorted(
                k
                for k in {*stored_settings, *current}
                if stored_settings.get(k, missing) != current.get(k, missing)
            )
            print(
                f"job {name}: stored with other {', '.join(changed)}; redoing it", file=sys.stderr
            )
            return None
        return _decode(result) | {"cpu": stored.get("cpu", "not recorded")}

    def save(self, name: str, settings: dict[str, Any], result: dict[str, Any]) -> Path:
        """Store ``result`` of job ``name`` with its ``settings`` and this machine's CPU (every
        timing names its CPU); written whole or not at all. Non-finite numbers in the result
        (a diverged fit's KL) are kept as ``{"non_finite": "inf"}`` and read back as floats.

        Raises:
            ValueError: the settings or result hold something JSON cannot (a tensor, a path),
                named with the job, before anything is written.
        """
        path = self.path(name)
        record = {"name": name, "settings": _as_json(settings, name), "cpu": cpu_description()}
        try:
            text = json.dumps({**record, "result": _encode(result)}, indent=1, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"job {name}: the result cannot be stored as JSON ({error})"
            ) from error
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".json.partial")
        partial.write_text(text + "\n")
        partial.replace(path)
        return path

    def run_name(self, name: str, settings: dict[str, Any]) -> str:
        """A run folder name for job ``name``: the name and a digest of its settings, so a run
        cut short resumes in its folder and a run with other settings gets another one (rather
        than being refused by the folder's config check)."""
        text = json.dumps(_as_json(settings, name), sort_keys=True).encode()
        return self.path(name).stem + "-" + hashlib.sha256(text).hexdigest()[:8]

    def names(self) -> list[str]:
        """The stored jobs' file names without ``.json`` (``:`` and ``/`` as ``_``), sorted."""
        return sorted(p.stem for p in self.folder.glob("*.json"))


def _as_json(settings: dict[str, Any], name: str) -> Any:
    """The settings as JSON reads them back (tuples become lists), so stored and current
    settings compare equal; non-finite numbers and values JSON cannot hold are refused."""
    try:
        return json.loads(json.dumps(settings, allow_nan=False))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"job {name}: settings must be JSON values with finite numbers ({error})"
        ) from error


def _encode(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {"non_finite": repr(value)}  # 'nan', 'inf' or '-inf'
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if value.keys() == {"non_finite"}:
            return float(value["non_finite"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value
