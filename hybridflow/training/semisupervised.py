"""Semi-supervised hybrids: keep a few training labels per class and hide the rest.

Nalisnick et al. 2019 ("Hybrid models with deep and invertible features", §5) train the hybrid
on a labelled subset plus unlabelled data: unlabelled examples (label −1) contribute only the
λ-weighted NLL, labelled ones CE + λ·NLL. :func:`keep_labels` makes such a split from a fully
labelled training set, with a seeded, stratified draw.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["keep_labels"]

# Offset of the label draw's seed: far from the seeds of the epoch orders (seed * 100003 + epoch).
_SEED_OFFSET = 1 << 62


def keep_labels(
    labels: Tensor,
    *,
    per_class: int | None = None,
    fraction: float | None = None,
    seed: int = 0,
) -> Tensor:
    """``labels`` with all but ``per_class`` labels of each class (or ``fraction`` of each) set
    to −1, the kept ones drawn with a generator seeded by ``seed``.

    Examples already unlabelled stay unlabelled; a class with fewer than ``per_class`` examples
    keeps them all; ``fraction`` keeps ``round(fraction · n_c)`` of the ``n_c`` examples of each
    class. With neither argument the labels are returned unchanged. The global torch RNG is not
    used, so the rest of the run's random draws do not depend on this choice.

    Raises:
        ValueError: If both arguments are given, or one is out of range.
    """
    if per_class is not None and fraction is not None:
        raise ValueError(
            "labelled_per_class and labelled_fraction are mutually exclusive: set only one"
        )
    if per_class is None and fraction is None:
        return labels
    if per_class is not None and per_class < 0:
        raise ValueError(f"labelled_per_class must be >= 0, got {per_class}")
    if fraction is not None and not 0.0 <= fraction <= 1.0:
        raise ValueError(f"labelled_fraction must lie in [0, 1], got {fraction}")
    gen = torch.Generator().manual_seed(_SEED_OFFSET + seed)
    kept = torch.full_like(labels, -1)
    for c in torch.unique(labels[labels >= 0]).tolist():
        members = (labels == c).nonzero().flatten()
        n = len(members)
        k = min(per_class, n) if per_class is not None else math.floor(fraction * n + 0.5)
        chosen = members[torch.randperm(n, generator=gen)[:k]]
        kept[chosen] = c
    return kept
