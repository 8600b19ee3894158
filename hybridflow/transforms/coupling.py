"""Affine coupling layers (Dinh et al. 2017, "Density estimation using Real NVP", §3.3-3.4).

A coupling splits the input into a conditioning part ``x_a`` that passes unchanged and a
transformed part ``x_b``: ``z_b = x_b * exp(s(x_a)) + t(x_a)``. The Jacobian is triangular,
so ``log|det J| = Σ s(x_a)``.

Checkerboard splits come in two layouts. ``"masked"`` (RealNVP's own, §3.4) runs the conditioner
on the whole image with the moved sites zeroed and the mask as an extra channel. ``"gathered"``
(the layout of the Flow++ reference code, Ho et al. 2019) packs each row's kept sites into an
``H × W/2`` image (:func:`checkerboard_split`), so the conditioner convolves half the positions
and its outputs need no masking: the same family at about half the cost.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..nets import MLP, ConvResNet
from .base import InvertibleModule, sum_except_batch

__all__ = [
    "CHECKERBOARD_LAYOUTS",
    "AffineCoupling",
    "MaskedCoupling",
    "checkerboard_mask",
    "checkerboard_merge",
    "checkerboard_split",
]

NetFactory = Callable[[int, int], nn.Module]

#: How a checkerboard coupling presents the kept sites to its conditioner (module docstring).
CHECKERBOARD_LAYOUTS = ("gathered", "masked")


def checkerboard_mask(height: int, width: int, parity: int, *, device=None, dtype=None) -> Tensor:
    """``[1, 1, H, W]`` mask with ones where ``(h + w + parity)`` is even (the kept sites)."""
    h = torch.arange(height, device=device).view(-1, 1)
    w = torch.arange(width, device=device).view(1, -1)
    return (
        ((h + w + parity) % 2 == 0).to(dtype or torch.get_default_dtype()).view(1, 1, height, width)
    )


def _kept_in_even_column(height: int, parity: int, device) -> Tensor:
    """``[H, 1]``: whether row ``h``'s kept sites (``h + w + parity`` even) are its even columns."""
    return ((torch.arange(height, device=device) + parity) % 2 == 0).view(height, 1)


def checkerboard_split(x: Tensor, parity: int) -> tuple[Tensor, Tensor]:
    """Gather the kept and the moved sites of a checkerboard into two ``[..., H, W/2]`` images.

    Site ``(h, w)`` is kept where ``h + w + parity`` is even (as in :func:`checkerboard_mask`).
    Row ``h`` of each output holds that row's sites of its half, left to right; this is the
    Flow++ reference code's "collapse horizontally" split (Ho et al. 2019), written with one
    ``where`` per half instead of index lists.

    Args:
        x: ``[..., H, W]`` with even ``W``.
        parity: 0 or 1.

    Returns:
        ``(kept, moved)``, each ``[..., H, W // 2]``; :func:`checkerboard_merge` inverts it.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"a gathered checkerboard needs an even width, got {tuple(x.shape)}")
    pairs = x.unflatten(-1, (x.shape[-1] // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    kept_even = _kept_in_even_column(x.shape[-2], parity, x.device)
    return torch.where(kept_even, even, odd), torch.where(kept_even, odd, even)


def checkerboard_merge(kept: Tensor, moved: Tensor, parity: int) -> Tensor:
    """Put the halves of :func:`checkerboard_split` back on the ``[..., H, W]`` board."""
    kept_even = _kept_in_even_column(kept.shape[-2], parity, kept.device)
    even, odd = torch.where(kept_even, kept, moved), torch.where(kept_even, moved, kept)
    return torch.stack([even, odd], dim=-1).flatten(-2)


def _default_factory(spatial: bool) -> NetFactory:
    if spatial:
        return lambda c_in, c_out: ConvResNet(c_in, c_out, hidden_channels=64, num_blocks=2)
    return lambda c_in, c_out: MLP(c_in, c_out, hidden_features=64, num_layers=2)


class MaskedCoupling(InvertibleModule):
    """Shared masking of coupling layers: which part is kept, which part is transformed.

    ``"checkerboard"`` (images ``[N, C, H, W]``) in one of :data:`CHECKERBOARD_LAYOUTS`:
    ``"gathered"``, the conditioner sees the kept sites packed into ``[N, C, H, W/2]``
    (:func:`checkerboard_split`; even ``W``), or ``"masked"``, it sees ``x·mask`` and the mask
    itself at full size; ``"channel"`` (images or vectors): dimension 1 is split in halves.
    Subclasses get ``(c_in, c_out)`` for their conditioner from :meth:`_conditioner_channels`.
    With ``context_channels > 0`` the layer is conditional: ``forward(x, context)`` concatenates
    the context (``[N, context_channels, H, W]`` or ``[N, context_channels]``) to the conditioner
    input; a gathered checkerboard packs both halves of the context, ``2 · context_channels``.
    """

    def __init__(
        self,
        num_channels: int,
        mask: str,
        parity: int,
        spatial: bool,
        context_channels: int = 0,
        checkerboard_layout: str = "gathered",
    ) -> None:
        super().__init__()
        if mask not in ("checkerboard", "channel"):
            raise ValueError(f"mask must be 'checkerboard' or 'channel', got {mask!r}")
        if mask == "checkerboard" and not spatial:
            raise ValueError("a checkerboard mask needs image inputs (spatial=True)")
        if mask == "channel" and num_channels < 2:
            raise ValueError("a channel mask needs at least 2 channels")
        if parity not in (0, 1):
            raise ValueError(f"parity must be 0 or 1, got {parity}")
        self.num_channels, self.mask, self.parity, self.spatial = (
            num_channels,
            mask,
            parity,
            spatial,
        )
        if context_channels < 0:
            raise ValueError(f"context_channels must be >= 0, got {context_channels}")
        if checkerboard_layout not in CHECKERBOARD_LAYOUTS:
            raise ValueError(
                f"checkerboard_layout must be one of {CHECKERBOARD_LAYOUTS}, "
                f"got {checkerboard_layout!r}"
            )
        self.context_channels = context_channels
        self.checkerboard_layout = checkerboard_layout
        # Only a masked checkerboard runs the conditioner on the full board; the gathered one
        # and the channel split share one code path (split, transform one half, merge).
        self.masked = mask == "checkerboard" and checkerboard_layout == "masked"

    def _conditioner_channels(self) -> tuple[int, int]:
        """``(inputs the conditioner sees, channels transformed at each position)``."""
        if self.masked:
            return self.num_channels + 1 + self.context_channels, self.num_channels
        if self.mask == "checkerboard":
            return self.num_channels + 2 * self.context_channels, self.num_channels
        first = self.num_channels // 2
        rest = self.num_channels - first
        c_in, c_out = (first, rest) if self.parity == 0 else (rest, first)
        return c_in + self.context_channels, c_out

    def _context_for(self, x: Tensor, context: Tensor | None) -> Tensor | None:
        """The context as the conditioner sees it (``None`` for unconditional layers).

        Checked against the full input ``x``: ``[N, context_channels, *x.shape[2:]]``.
        """
        if not self.context_channels:
            return None
        want = (x.shape[0], self.context_channels, *x.shape[2:])
        if context is None or tuple(context.shape) != want:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"{type(self).__name__} needs a context of shape {want}, got {got}")
        if self.mask == "checkerboard" and not self.masked:
            return torch.cat(checkerboard_split(context, self.parity), dim=1)
        return context

    def _conditioner(self, inp: Tensor, context: Tensor | None) -> Tensor:
        """``self.net`` on ``inp`` (plus the context from :meth:`_context_for`), in ``inp``'s dtype.

        Under bf16 autocast the net computes in bfloat16; the cast is where its output enters
        the flow, so the coupling's own maps and log-determinants stay in float32. Without
        autocast the dtypes already agree and the cast is a no-op.
        """
        net_input = inp if context is None else torch.cat([inp, context], dim=1)
        return self.net(net_input).to(inp.dtype)

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(kept, moved)``: channel groups, or a gathered checkerboard's halves."""
        if self.mask == "checkerboard":
            return checkerboard_split(x, self.parity)
        first, second = x[:, : self.num_channels // 2], x[:, self.num_channels // 2 :]
        return (first, second) if self.parity == 0 else (second, first)

    def _merge(self, kept: Tensor, moved: Tensor) -> Tensor:
        if self.mask == "checkerboard":
            return checkerboard_merge(kept, moved, self.parity)
        return torch.cat([kept, moved] if self.parity == 0 else [moved, kept], dim=1)

    def _mask_input(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Checkerboard mask and the conditioner input ``[x·mask, mask]``."""
        m = checkerboard_mask(*x.shape[2:], self.parity, device=x.device, dtype=x.dtype)
        return m, torch.cat([x * m, m.expand(x.shape[0], 1, *x.shape[2:])], dim=1)

    def _check(self, x: Tensor) -> None:
        want = 4 if self.spatial else 2
        if x.dim() != want or x.shape[1] != self.num_channels:
            shape = "[N, C, H, W]" if self.spatial else "[N, C]"
            raise ValueError(
                f"{type(self).__name__} expects {shape} with C={self.num_channels}, "
                f"got {tuple(x.shape)}"
            )
        if self.mask == "checkerboard" and not self.masked and x.shape[-1] % 2:
            raise ValueError(
                f"{type(self).__name__}: a gathered checkerboard needs an even width, got "
                f"{tuple(x.shape)}; use checkerboard_layout='masked' for odd widths"
            )


class AffineCoupling(MaskedCoupling):
    """Affine (RealNVP, Dinh et al. 2017) or additive (NICE, Dinh et al. 2015) coupling.

    Args:
        num_channels: Channels ``C`` of the input (features for vector inputs).
        mask: ``"checkerboard"`` (images ``[N, C, H, W]``) or ``"channel"`` (images or vectors;
            splits dimension 1 in halves).
        parity: 0 or 1, which half is kept; alternate it between consecutive couplings.
        net_factory: ``(in_channels, out_channels) -> nn.Module``; defaults to a small
            :class:`~hybridflow.nets.ConvResNet` for images and :class:`~hybridflow.nets.MLP`
            for vectors. The net's output should start at zero so the layer starts as identity.
        spatial: Whether inputs are images (``True``) or vectors (``False``).
        additive: Shift only (volume preserving, log-det 0), as in NICE.
        context_channels: Channels of a conditioning input (0: unconditional).
        checkerboard_layout: ``"gathered"`` (the conditioner convolves the kept sites packed
            into ``H × W/2``; even ``W``) or ``"masked"`` (the full board with the moved sites
            zeroed and the mask as a channel), see :class:`MaskedCoupling`.
    """

    def __init__(
        self,
        num_channels: int,
        mask: str = "checkerboard",
        parity: int = 0,
        net_factory: NetFactory | None = None,
        *,
        spatial: bool = True,
        additive: bool = False,
        context_channels: int = 0,
        checkerboard_layout: str = "gathered",
    ) -> None:
        super().__init__(num_channels, mask, parity, spatial, context_channels, checkerboard_layout)
        self.additive = additive
        factory = net_factory or _default_factory(spatial)
        c_in, c_out = self._conditioner_channels()
        self.net = factory(c_in, c_out if additive else 2 * c_out)
        if not additive:  # an unused parameter would break multi-process training
            # RealNVP's "scale · tanh" keeps log-scales bounded early in training.
            self.scale = nn.Parameter(torch.ones(c_out))

    def _params(self, kept: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor]:
        out = self._conditioner(kept, context)
        if self.additive:
            return out, torch.zeros_like(out)
        shift, raw = out.chunk(2, dim=1)
        view = (1, -1) + (1,) * (raw.dim() - 2)
        log_s = self.scale.view(view) * torch.tanh(raw)
        return shift, log_s

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        context = self._context_for(x, context)
        if self.masked:
            m, inp = self._mask_input(x)
            shift, log_s = self._params(inp, context)
            log_s = log_s * (1 - m)
            z = x * m + (1 - m) * (x * log_s.exp() + shift)
            return z, sum_except_batch(log_s)
        kept, moved = self._split(x)
        shift, log_s = self._params(kept, context)
        return self._merge(kept, moved * log_s.exp() + shift), sum_except_batch(log_s)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(z)
        context = self._context_for(z, context)
        if self.masked:
            m, inp = self._mask_input(z)
            shift, log_s = self._params(inp, context)
            return z * m + (1 - m) * ((z - shift) * (-log_s).exp())
        kept, moved = self._split(z)
        shift, log_s = self._params(kept, context)
        return self._merge(kept, (moved - shift) * (-log_s).exp())
