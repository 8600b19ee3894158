"""Switching the log-det estimator of every residual block of a model, e.g. to score it exactly.

A Residual Flow trained with one estimator can be evaluated with another: the exact log-det
(``slogdet`` of the Jacobian, small inputs only) scores a model trained with the truncated
series honestly (Chen et al. 2019, Figure 2 and Table 3: the i-ResNet's truncated series
over-reports its likelihood by a bias that grows with the Lipschitz coefficient), and the bias
of each estimator can be measured on the same weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..transforms import ResidualBlock
from ..transforms.residual import check_block_options

__all__ = ["LOGDET_SETTINGS", "logdet_settings", "residual_blocks"]

#: Keyword → the block attribute it sets (``poisson_rate`` and ``geometric_p`` are buffers).
LOGDET_SETTINGS = {
    "logdet": "logdet_estimator",
    "n_terms": "n_terms",
    "eval_n_terms": "eval_n_terms",
    "distribution": "distribution",
    "poisson_rate": "poisson_rate",
    "geometric_p": "geometric_p",
    "probe": "probe",
    "n_probes": "n_probes",
    "grad": "grad_mode",
    "memory_efficient": "memory_efficient",
}
_INTEGERS = ("n_terms", "eval_n_terms", "n_probes")


def residual_blocks(model: nn.Module) -> list[ResidualBlock]:
    """Every :class:`~hybridflow.transforms.ResidualBlock` of ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, ResidualBlock)]


def _check(settings: dict[str, Any]) -> None:
    unknown = set(settings) - set(LOGDET_SETTINGS)
    if unknown:
        known = ", ".join(LOGDET_SETTINGS)
        raise ValueError(f"unknown log-det settings {sorted(unknown)}; known: {known}")
    check_block_options(**settings)


@contextmanager
def logdet_settings(model: nn.Module, **settings: Any) -> Iterator[list[ResidualBlock]]:
    """Give every residual block of ``model`` other log-det settings; restore them on exit.

    Example: the exact test bits/dim of a model trained with the truncated series::

        with logdet_settings(model, logdet="exact"):
            bpd = model.bits_per_dim(x)

    Args:
        model: Any module holding :class:`~hybridflow.transforms.ResidualBlock` s.
        **settings: Keywords of the block (``logdet``, ``n_terms``, ``eval_n_terms``,
            ``distribution``, ``poisson_rate``, ``geometric_p``, ``probe``, ``n_probes``,
            ``grad``, ``memory_efficient``), checked as the block checks them. ``n_terms``
            alone sets ``eval_n_terms`` too (the count a block in eval mode uses), so the switch
            holds in both modes; give both to differ.

    Yields:
        The blocks switched.

    Raises:
        ValueError: An unknown setting or value, or a model without residual blocks.
    """
    _check(settings)
    if "n_terms" in settings and "eval_n_terms" not in settings:
        # a block in eval mode reads eval_n_terms: n_terms alone would silently not apply there
        settings["eval_n_terms"] = settings["n_terms"]
    blocks = residual_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no residual blocks to switch")
    saved = []
    try:
        for block in blocks:
            before = {}
            for key, value in settings.items():
                attribute = LOGDET_SETTINGS[key]
                current = getattr(block, attribute)
                if isinstance(current, torch.Tensor):  # a buffer: keep it, change its value
                    before[attribute] = current.clone()
                    current.fill_(float(value))
                else:
                    before[attribute] = current
                    setattr(block, attribute, int(value) if key in _INTEGERS else value)
            saved.append((block, before))
        yield blocks
    finally:
        for block, before in reversed(saved):
            for attribute, value in before.items():
                current = getattr(block, attribute)
                if isinstance(current, torch.Tensor):
                    current.copy_(value)
                else:
                    setattr(block, attribute, value)
