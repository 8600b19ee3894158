"""Watching a run: TensorBoard scalars mirroring ``metrics.csv``, and periodic sample grids.

``metrics.csv`` stays the record; TensorBoard (``pip install 'hybridflow[tb]'``) is optional and
only mirrors it. Sample grids are drawn from fixed latents with their own generator, so watching
a run never changes its random draws or its numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from ..evaluation import sample_at_temperatures
from ..models import FlowModel

__all__ = ["SAMPLE_TEMPERATURE", "TensorBoardLog", "open_tensorboard", "sample_grid"]

#: Temperature of the training sample grids (Glow's reduced-temperature sampling).
SAMPLE_TEMPERATURE = 0.8

# Columns of metrics.csv that identify a row rather than measure something.
_KEYS = ("step", "epoch", "split")


class TensorBoardLog:
    """Writes each ``metrics.csv`` row as scalars ``<split>/<column>`` at its step, plus images.

    Args:
        log_dir: The event-file folder.
        purge_step: On resume, the checkpoint's step: events logged at or after it by the killed
            attempt are hidden, as ``metrics.csv`` drops those rows.
    """

    def __init__(self, log_dir: str | Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional extra: hybridflow[tb]

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def write(self, row: Mapping[str, Any]) -> None:
        """Add every numeric value of a metrics row."""
        for key, value in row.items():
            if key not in _KEYS and isinstance(value, int | float):
                self.writer.add_scalar(f"{row['split']}/{key}", value, row["step"])
        self.writer.flush()

    def add_grid(self, tag: str, grid: Tensor, step: int) -> None:
        """Add a ``[3, H, W]`` image grid in ``[0, 1]``."""
        self.writer.add_image(tag, grid, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_tensorboard(log_dir: str | Path, purge_step: int | None = None) -> TensorBoardLog | None:
    """A :class:`TensorBoardLog`, or ``None`` with a warning when tensorboard is not installed."""
    try:
        return TensorBoardLog(log_dir, purge_step)
    except ImportError:
        warnings.warn(
            "tensorboard=true, but the tensorboard package is not installed "
            "(pip install 'hybridflow[tb]'): logging to metrics.csv only",
            stacklevel=2,
        )
        return None


def sample_grid(flow: FlowModel, n: int = 64, seed: int = 0, path: Path | None = None) -> Tensor:
    """A grid (``make_grid``) of ``n`` samples at :data:`SAMPLE_TEMPERATURE`, optionally saved
    as a PNG.

    The latents come from a generator seeded with ``seed`` (the same images are followed through
    training) and the global RNG is restored afterwards.
    """
    device = next(flow.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        samples = sample_at_temperatures(flow, (SAMPLE_TEMPERATURE,), n, seed)
    x = samples[SAMPLE_TEMPERATURE].float()
    levels = flow.num_levels
    x = x / (levels - 1) if levels is not None else (x - x.min()) / (x.max() - x.min() + 1e-12)
    grid = make_grid(x.clamp(0, 1), nrow=math.ceil(math.sqrt(n)), padding=1)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(grid, path)
    return grid
