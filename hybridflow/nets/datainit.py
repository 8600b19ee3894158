"""The ``initialized`` flag of layers with data-dependent initialization (ActNorm, WNConv2d)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DataInitFlag"]


class DataInitFlag(nn.Module):
    """Mixin: an ``initialized`` buffer whose ``True`` state is remembered on the Python side.

    Reading the buffer (``bool(self.initialized)``) in every training forward is a host
    synchronisation on GPU and a graph break under ``torch.compile``, once per layer. The flag
    only ever goes from ``False`` to ``True`` during training, so once a read saw ``True`` the
    answer is cached; loading a state dict forgets the cache (the loaded flag may be ``False``).
    Values are unchanged: this only skips a read whose answer is known.
    """

    initialized: torch.Tensor

    def _init_pending(self) -> bool:
        """Whether the layer still has to initialise itself on its next training forward."""
        if getattr(self, "_seen_initialized", False):
            return False
        seen = bool(self.initialized)
        self._seen_initialized = seen
        return not seen

    def _mark_initialized(self) -> None:
        """Set the flag (after the layer initialised itself)."""
        self.initialized.fill_(True)
        self._seen_initialized = True

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._seen_initialized = False
        super()._load_from_state_dict(*args, **kwargs)
