"""Atomic checkpoints that load with ``weights_only=True`` and fail loudly when corrupt."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CheckpointError",
    "file_sha256",
    "load_checkpoint",
    "remove_temporaries",
    "save_checkpoint",
]

#: Suffix of the file a checkpoint is written to before it atomically replaces the old one.
TMP_SUFFIX = ".tmp"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, unsafe or cannot be written."""


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (what shipped and carried files
    record, so that a damaged copy is refused)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class _File(io.FileIO):
    """A file that keeps its write error: torch's zip writer replaces it by an unrelated text."""

    error: OSError | None = None

    def write(self, data) -> int:  # type: ignore[override]
        try:
            return super().write(data)
        except OSError as err:
            self.error = err
            raise


def save_checkpoint(payload: dict[str, Any], path: str | Path) -> None:
    """Write ``payload`` to ``path`` atomically: a crash or a full disk never leaves a
    half-written ``path``, and the previous file stays intact until the new one is complete."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    f = None
    try:
        with _File(tmp, "w") as f:
            torch.save(payload, f)
            # Without fsync a power loss right after the rename can leave an empty file behind.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = (f.error if f is not None else None) or err
        reason = (
            "no space left on the device"
            if getattr(cause, "errno", None) == errno.ENOSPC
            else f"{type(cause).__name__}: {cause}"
        )
        previous = "the previous one is intact" if path.exists() else "there was no previous one"
        raise CheckpointError(f"could not write {path} ({reason}); {previous}") from cause


def remove_temporaries(folder: str | Path) -> list[Path]:
    """Delete the ``*.tmp`` files an interrupted :func:`save_checkpoint` left in ``folder``."""
    removed = []
    for tmp in Path(folder).glob(f"*{TMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint saved by :func:`save_checkpoint` with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise _corrupt(path, err) from err
        raise _unsafe(path, err) from None  # torch's own text is a page long
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise _corrupt(path, err) from err
    if not isinstance(payload, dict) or "model" not in payload or "config" not in payload:
        raise CheckpointError(
            f"{path} is not a hybridflow checkpoint (no 'model'/'config' entries)"
        )
    return payload


def _corrupt(path: Path, err: BaseException) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is corrupt or truncated ({type(err).__name__}: {err}); "
        "delete it to start over or restore a backup"
    )


def _unsafe(path: Path, err: BaseException) -> CheckpointError:
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    what = f" (e.g. {found.group(1)})" if found else ""
    where = (
        f"`hybridflow train` writes a valid {path.name} at this path (tensors and plain values "
        "only): delete the file and rerun, or, "
        if path.name in ("checkpoint.pt", "model.pt")
        else "hybridflow files hold only tensors and plain values: "
    )
    return CheckpointError(
        f"{path} holds arbitrary Python objects{what}, so it was refused for safety and nothing "
        f"in it was run; {where}if you trust it, load it with torch.load(weights_only=False) "
        "and torch.save it again as tensors and plain dicts"
    )
