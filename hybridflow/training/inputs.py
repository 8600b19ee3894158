"""What a training step reads: its global batch from memory or through a torch ``DataLoader``,
the random transformations of that batch drawn once for every rank, and this rank's share.

Both readers follow the same seeded :func:`~hybridflow.training.batches.epoch_batches` order, so
a run reads the same examples in the same order (and resumes in the middle of an epoch) whichever
reader it uses and however many processes share the batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..evaluation.evaluate import index_loader
from ..evaluation.evaluate import is_in_memory as in_memory
from .batches import draw_perturbation, draw_shifts, epoch_batches, perturb_levels, random_shift

__all__ = [
    "BatchDraws",
    "NoiseFeed",
    "dataset_labels",
    "draw_batch",
    "epoch_inputs",
    "in_memory",
    "read_examples",
    "to_device",
]


def read_examples(dataset: Dataset, indices: Tensor) -> Tensor:
    """The inputs of ``dataset[i]`` for ``i`` in ``indices``, stacked (for a few examples)."""
    return torch.stack([torch.as_tensor(dataset[i][0]) for i in indices.tolist()])


def dataset_labels(dataset: Dataset, batch_size: int = 512, workers: int = 0) -> Tensor:
    """Every label of ``dataset`` (int64): its ``labels`` tensor, else one pass of reading."""
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return torch.as_tensor(labels, dtype=torch.int64)
    n = len(dataset)
    ranges = [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
    parts = [torch.as_tensor(y) for _, y in index_loader(dataset, ranges, workers)]
    return torch.cat(parts).to(torch.int64) if parts else torch.zeros(0, dtype=torch.int64)


def epoch_inputs(
    dataset: Dataset,
    images: Tensor | None,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    offset: int,
    part: slice,
    workers: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """``(global batch indices, this rank's inputs)`` for the batches of ``epoch`` from ``offset``.

    ``images`` is the in-memory training tensor, or ``None`` to read ``dataset`` through a
    ``DataLoader`` whose batch sampler yields this rank's share (``part``) of the same batches.
    """
    n = len(images) if images is not None else len(dataset)  # images may be a subset
    batches = epoch_batches(n, batch_size, seed, epoch)[offset:]
    if images is not None:
        for batch_idx in batches:
            yield batch_idx, images[batch_idx[part]]
        return
    shares = [batch_idx[part].tolist() for batch_idx in batches]
    loader = index_loader(dataset, shares, workers, pin_memory)
    for batch_idx, (x, _) in zip(batches, loader, strict=True):
        yield batch_idx, x


def to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """Copy a CPU tensor to ``device``; to a GPU from pinned memory, without a host sync."""
    if device.type != "cuda":
        return tensor.to(device)
    if not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclass(frozen=True)
class BatchDraws:
    """The random transformations of one global batch, drawn alike on every rank.

    Attributes:
        shifts: Offsets of :func:`~hybridflow.training.batches.random_shift`, ``[2, B, 1]``.
        perturbation: Draws of :func:`~hybridflow.training.batches.perturb_levels`.
        dequant_noise: Uniform dequantization noise ``u``, on the training device, drawn here
            only when the batch is split (ranks or micro-batches); otherwise the model draws it.
    """

    shifts: Tensor | None = None
    perturbation: tuple[Tensor, Tensor] | None = None
    dequant_noise: Tensor | None = None

    def apply(
        self, x: Tensor, part: slice, max_shift: int, rate: float, num_levels: int | None
    ) -> Tensor:
        """Shift and perturb ``x``, the ``part`` of the global batch this rank holds."""
        if self.shifts is not None:
            x = random_shift(x, max_shift, self.shifts[:, part])
        if self.perturbation is not None and num_levels is not None:
            replace, levels = self.perturbation
            x = perturb_levels(x, rate, num_levels, draws=(replace[part], levels[part]))
        return x


def draw_batch(
    shape: tuple[int, ...],
    *,
    max_shift: int,
    perturb_rate: float,
    num_levels: int | None,
    noise: tuple[torch.dtype, torch.device] | None = None,
) -> BatchDraws:
    """Draw a global batch's transformations in the order one unsplit step consumes the RNG:
    shifts, perturbation, then (when ``noise`` gives its dtype and device) dequantization."""
    shifts = draw_shifts(shape[0], max_shift) if max_shift > 0 else None
    perturbation = None
    if perturb_rate and num_levels is not None:
        perturbation = draw_perturbation(shape, perturb_rate, num_levels)
    dequant_noise = None
    if noise is not None:  # the draw UniformDequantization makes for an unsplit batch
        dequant_noise = torch.rand(shape, dtype=noise[0], device=noise[1])
    return BatchDraws(shifts, perturbation, dequant_noise)


class NoiseFeed:
    """Hands given noise to a uniform dequantizer's ``noise=`` argument (a forward pre-hook).

    ``HybridModel.loss`` draws the dequantization noise inside the forward pass; when a batch is
    split into shares, each share must get its slice of the noise the whole batch would have
    drawn, and this passes it through without changing the model.
    """

    def __init__(self, dequantizer: nn.Module) -> None:
        self.noise: Tensor | None = None
        self._handle = dequantizer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        if self.noise is None or kwargs.get("noise") is not None:
            return None
        return args, {**kwargs, "noise": self.noise}

    @contextlib.contextmanager
    def given(self, noise: Tensor | None) -> Iterator[None]:
        """Feed ``noise`` to the forward passes inside the block (``None``: the model draws)."""
        self.noise = noise
        try:
            yield
        finally:
            self.noise = None

    def remove(self) -> None:
        """Detach the hook from the dequantizer."""
        self._handle.remove()
