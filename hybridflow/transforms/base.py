"""The transform contract shared by every invertible layer in hybridflow.

Direction convention (used everywhere in the package):

* ``forward(x, context=None) -> (z, logdet)`` maps **data to latent**. ``logdet`` has shape
  ``[N]`` and holds ``log |det dz/dx|`` for each example.
* ``inverse(z, context=None) -> x`` maps **latent to data** and is the exact inverse of
  ``forward`` (up to numerical tolerance or, for iterative inverses, a stated tolerance).

A flow's log-density therefore reads ``log p(x) = log p_Z(z) + logdet``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = [
    "Inverse",
    "InvertibleModule",
    "InvertibleSequential",
    "standard_normal_log_prob",
    "sum_except_batch",
]


def sum_except_batch(x: Tensor) -> Tensor:
    """Sum every dimension but the first, giving one value per example."""
    return x.reshape(x.shape[0], -1).sum(dim=1)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """Per-example ``log N(z; 0, I)``, summed over every dimension but the first."""
    return -0.5 * sum_except_batch(z.pow(2) + math.log(2 * math.pi))


class InvertibleModule(nn.Module):
    """Base class of invertible layers.

    Subclasses implement :meth:`forward` (data → latent, with per-example log|det J|) and
    :meth:`inverse` (latent → data). ``context`` is an optional conditioning tensor that
    conditional layers read and every other layer ignores.
    """

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map data to latent; return ``(z, logdet)`` with ``logdet`` of shape ``[N]``."""
        raise NotImplementedError

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Map latent to data."""
        raise NotImplementedError

    def inverse_and_logdet(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Map latent to data and return ``(x, log|det ∂x/∂z|)`` per example.

        The sampling direction with its log-det is what reverse-KL fitting of a flow needs
        (``log q(x) = log N(z) − log|det ∂x/∂z|``; Rezende & Mohamed 2015). The default inverts
        and evaluates :meth:`forward`'s log-det at the result (one more pass, sequential for an
        IAF); layers whose inverse yields its log-det directly override it. Call it after
        data-dependent initialisation (ActNorm): before, the inverse would run with the
        identity parameters and the forward pass would then initialise the layer.

        Returns:
            ``x`` and ``log|det ∂x/∂z|`` of shape ``[N]``.
        """
        x = self.inverse(z, context)
        _, logdet = self.forward(x, context)
        return x, -logdet

    @torch.no_grad()
    def data_init(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Run data-dependent initialisation on a batch; return the layer's output.

        The default runs :meth:`forward`; layers with data-dependent parameters (ActNorm)
        initialise themselves on their first forward, so this is enough for containers.
        """
        return self.forward(x, context)[0]


class InvertibleSequential(InvertibleModule):
    """Composition of invertible layers applied in order in the data → latent direction."""

    def __init__(self, *layers: InvertibleModule | Iterable[InvertibleModule]) -> None:
        super().__init__()
        if len(layers) == 1 and not isinstance(layers[0], nn.Module):
            layers = tuple(layers[0])
        for layer in layers:
            if not isinstance(layer, InvertibleModule):
                raise TypeError(
                    f"InvertibleSequential takes InvertibleModule layers, got {type(layer)}"
                )
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> InvertibleModule:
        return self.layers[index]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x, context)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        for layer in reversed(self.layers):
            z = layer.inverse(z, context)
        return z

    def inverse_and_logdet(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        logdet = z.new_zeros(z.shape[0])
        for layer in reversed(self.layers):
            z, ld = layer.inverse_and_logdet(z, context)
            logdet = logdet + ld
        return z, logdet


class Inverse(InvertibleModule):
    """Swap the directions of a layer: ``Inverse(f).forward`` is ``f.inverse``.

    Useful for layers whose cheap direction should be the sampling direction (IAF-style).
    The log-det is obtained from the wrapped layer's forward at the output, so it costs one
    extra forward pass.
    """

    def __init__(self, layer: InvertibleModule) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        z = self.layer.inverse(x, context)
        _, logdet = self.layer(z, context)
        return z, -logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return self.layer(z, context)[0]

    def inverse_and_logdet(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.layer(z, context)  # the wrapped layer's forward: one pass where it is cheap
