"""Statically binarized images for Bernoulli VAEs (Salakhutdinov & Murray 2008).

Each pixel becomes 1 with probability ``level / (K − 1)``, drawn once from a seeded generator,
so every run and every evaluation sees the same binary set (the "static" binarization of the
IAF and NAF papers' MNIST experiments; a fresh draw per epoch is "dynamic").
"""

from __future__ import annotations

import torch
from torch import Tensor

from .common import dataset_tensors
from .registry import load_dataset

__all__ = ["binarize", "load_binarized"]


def binarize(levels: Tensor, num_levels: int, seed: int = 0) -> Tensor:
    """``{0, 1}`` images drawn with ``P(1) = level / (num_levels − 1)`` (a seeded, fixed draw)."""
    if num_levels < 2:
        raise ValueError(f"num_levels must be at least 2, got {num_levels}")
    if levels.min() < 0 or levels.max() > num_levels - 1:
        raise ValueError(
            f"levels must lie in [0, {num_levels - 1}], got [{levels.min()}, {levels.max()}]"
        )
    gen = torch.Generator().manual_seed(seed)
    p = levels.double() / (num_levels - 1)
    return (torch.rand(p.shape, generator=gen, dtype=torch.float64) < p).to(
        torch.get_default_dtype()
    )


def load_binarized(
    name: str, split: str, binarize_seed: int = 0, **kwargs
) -> tuple[Tensor, Tensor]:
    """``(binary images, labels)`` of a level dataset's split (``kwargs`` go to
    :func:`~hybridflow.data.load_dataset`), binarized with ``binarize_seed`` (a different draw
    per split: the seed offset by the split's name)."""
    dataset = load_dataset(name, split, **kwargs)
    levels, labels = dataset_tensors(dataset)
    num_levels = getattr(dataset, "num_levels", None)
    if num_levels is None:
        raise ValueError(f"{name!r} is not an image dataset with levels")
    offset = {"train": 0, "val": 1, "test": 2}.get(split, 3)
    return binarize(levels, num_levels, binarize_seed * 10 + offset), labels
