"""Carrying a study's training state to another machine or sitting, in a folder you can commit.

A converged study can take longer than one sitting, and a sitting's ``runs/`` folder may not
outlive it (a fresh cloud machine, a cluster scratch disk that is wiped). :func:`pack_study`
copies what a study needs to go on into a small folder: per cell its ``config.json`` and
``metrics.csv``, and ``model.pt`` for a finished cell or ``checkpoint.pt`` for one still
training. Evaluation outputs are left out (the sweep recomputes them from ``model.pt``). A
``MANIFEST.json`` records each file's SHA-256, so :func:`unpack_study` refuses a damaged copy
instead of resuming from it. Unpacking never replaces a cell that is further along here.

Typical use, at the end of a sitting and the start of the next::

    hybridflow sweep --pack state/fashion_mnist --name fashion_mnist
    hybridflow sweep --unpack state/fashion_mnist --name fashion_mnist
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from ..reports import cpu_description
from ..runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    MODEL_FILE,
    CheckpointError,
    file_sha256,
    load_checkpoint,
)

__all__ = ["MANIFEST_FILE", "pack_study", "unpack_study"]

#: The index of a packed study: files, their SHA-256, and when and where it was packed.
MANIFEST_FILE = "MANIFEST.json"
_STAGES = {"training": 1, "finished": 2}


def _progress(cell_dir: Path) -> tuple[int, int]:
    """How far a cell is: ``(2, step)`` finished, ``(1, step)`` training, ``(0, 0)`` not started."""
    if (cell_dir / MODEL_FILE).exists():
        return 2, int(load_checkpoint(cell_dir / MODEL_FILE).get("step", 0))
    if (cell_dir / CHECKPOINT_FILE).exists():
        return 1, int(load_checkpoint(cell_dir / CHECKPOINT_FILE).get("step", 0))
    return 0, 0


def pack_study(runs_dir: str | Path, dest: str | Path) -> dict[str, Any]:
    """Copy the resumable state of every cell under ``runs_dir`` into ``dest``.

    A cell already packed in ``dest`` is replaced only where ``runs_dir`` is further along
    (so packing from a machine that has not unpacked the state loses nothing).

    Args:
        runs_dir: The study's run folder (``runs/<study>``).
        dest: The state folder.

    Returns:
        The manifest written to ``dest/MANIFEST.json``: per cell its state
        (``finished`` / ``training``), step, the CPU it was packed on, its files with their
        SHA-256, and ``sittings``: every packing that advanced it (state, step, CPU, time), so
        a reader can tell which steps ran on which machine.

    Each cell is copied into a fresh folder that then replaces the packed one, and the
    manifest is rewritten (whole) around each swap, so a pack cut short leaves a state that
    still unpacks: every cell as it was before or as it is now.

    Raises:
        FileNotFoundError: ``runs_dir`` holds no cell folders.
    """
    runs_dir, dest = Path(runs_dir), Path(dest)
    cells = sorted(d for d in runs_dir.glob("*") if (d / CONFIG_FILE).exists())
    if not cells:
        raise FileNotFoundError(f"{runs_dir} holds no cell folders (none has {CONFIG_FILE})")
    manifest_path = dest / MANIFEST_FILE
    packed = json.loads(manifest_path.read_text())["cells"] if manifest_path.exists() else {}
    dest.mkdir(parents=True, exist_ok=True)
    for cell in cells:
        stage, step = _progress(cell)
        before = packed.get(cell.name)
        if stage == 0 or (before and (_STAGES[before["state"]], before["step"]) >= (stage, step)):
            continue  # nothing trained yet, or the packed state is as far along
        state = MODEL_FILE if stage == 2 else CHECKPOINT_FILE
        files = [f for f in (CONFIG_FILE, METRICS_FILE, state) if (cell / f).exists()]
        # Copy into a fresh folder, then swap it in and record it: a pack cut short (the end of
        # a sitting, a full disk) leaves every cell either as it was or as it is now, each
        # matching the manifest, never new files under old hashes.
        incoming = dest / f"{cell.name}.incoming"
        if incoming.exists():
            shutil.rmtree(incoming)
        incoming.mkdir()
        for name in files:  # copy, then hash the copy: what is recorded is what was written
            shutil.copy2(cell / name, incoming / name)
        sitting = {
            "state": "finished" if stage == 2 else "training",
            "step": step,
            "packed_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "cpu": cpu_description(),
        }
        entry = {
            **sitting,
            "files": {name: file_sha256(incoming / name) for name in files},
            # Where each stretch of steps ran: wall times from different CPUs do not compare.
            "sittings": [*(before or {}).get("sittings", []), sitting],
        }
        _write_manifest(manifest_path, {k: v for k, v in packed.items() if k != cell.name})
        target = dest / cell.name
        if target.exists():
            shutil.rmtree(target)
        incoming.rename(target)
        packed[cell.name] = entry
        _write_manifest(manifest_path, packed)
    return _write_manifest(manifest_path, packed)


def _write_manifest(path: Path, cells: dict[str, Any]) -> dict[str, Any]:
    """Write the manifest whole or not at all (a temporary file renamed over it)."""
    manifest = {"cells": dict(sorted(cells.items()))}
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(manifest, indent=2) + "\n")
    partial.replace(path)
    return manifest


def unpack_study(src: str | Path, runs_dir: str | Path) -> dict[str, str]:
    """Restore a packed study into ``runs_dir``, cell by cell, where it is further along.

    A cell is copied when ``runs_dir`` has nothing of it, or only an earlier checkpoint;
    a finished cell here, or a checkpoint here at the same or a later step, is kept.

    Returns:
        Per packed cell what happened: ``restored (finished)``, ``restored (training, step N)``
        or ``kept (...)``.

    Raises:
        FileNotFoundError: ``src`` has no ``MANIFEST.json``.
        CheckpointError: A packed file is missing or its SHA-256 differs from the manifest's
            (checked for every cell before any is restored).
    """
    src, runs_dir = Path(src), Path(runs_dir)
    manifest_path = src / MANIFEST_FILE
    if not manifest_path.exists():
        raise FileNotFoundError(f"{src} is not a packed study (no {MANIFEST_FILE})")
    manifest = json.loads(manifest_path.read_text())
    for name, entry in manifest["cells"].items():  # every file, before anything is copied
        for file, digest in entry["files"].items():
            path = src / name / file
            if not path.exists() or file_sha256(path) != digest:
                raise CheckpointError(
                    f"{path} is missing or damaged (SHA-256 differs from {manifest_path}); "
                    "restore it from version control or remove the cell from the manifest"
                )
    outcome: dict[str, str] = {}
    for name, entry in manifest["cells"].items():
        here = runs_dir / name
        stage, step = _progress(here)
        packed_stage = _STAGES[entry["state"]]
        if (stage, step) >= (packed_stage, entry["step"]):
            outcome[name] = f"kept ({'finished' if stage == 2 else f'training, step {step}'})"
            continue
        here.mkdir(parents=True, exist_ok=True)
        if packed_stage == 2:  # a finished cell replaces a partial one entirely
            (here / CHECKPOINT_FILE).unlink(missing_ok=True)
        for file in entry["files"]:
            shutil.copy2(src / name / file, here / file)
        outcome[name] = (
            "restored (finished)"
            if packed_stage == 2
            else f"restored (training, step {entry['step']})"
        )
    return outcome
