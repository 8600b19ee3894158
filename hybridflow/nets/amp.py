"""Autocast helpers for the parts of a flow that must not run in reduced precision.

Under ``torch.autocast(..., dtype=torch.bfloat16)`` matrix products and convolutions run in
bfloat16 (8 bits of mantissa). That is the point for conditioner networks and classifier heads,
but not for the flow's own arithmetic: the latent and a log-determinant summed over hundreds of
dimensions would lose whole nats. Layers whose products feed the latent or the log-det wrap them
in :func:`autocast_disabled`.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = ["autocast_disabled", "autocast_enabled"]


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (``"cpu"``, ``"cuda"``, ...) right now."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 takes no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return torch.is_autocast_enabled()


def autocast_disabled(like: Tensor) -> contextlib.AbstractContextManager:
    """Switch autocast off on ``like``'s device while it is on; otherwise a no-op context.

    Without autocast nothing is entered, so float32 and float64 numerics are untouched.
    """
    device = like.device.type
    if autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()
