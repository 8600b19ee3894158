"""Dequantization: integer levels → continuous values (Theis et al. 2016; Ho et al. 2019).

Both dequantizers map levels ``x ∈ {0, …, K-1}^D`` to ``y = (x + u) / K`` with noise
``u ∈ [0, 1)^D`` drawn from ``q(u | x)`` and return

    logdet = -D log K - log q(u | x),

so a flow's ``log p(y) + logdet = log p_level(x + u) - log q(u | x)`` is one sample of the
variational lower bound ``E_q[log p(x + u) - log q(u | x)] ≤ log P(x)`` on the ``K``-level scale
(Flow++ eq. 12). Uniform dequantization is the case ``q = 1``. Averaging ``exp`` of ``S`` such
samples gives the importance-weighted bound ``log (1/S) Σ_s p(x + u_s) / q(u_s | x)`` (Flow++
eq. 13, Burda et al. 2016), which is ≥ the single-sample bound in expectation, non-decreasing in
``S`` and tends to ``log P(x)``; see :meth:`hybridflow.models.FlowModel.log_prob_iw`.

Neither layer is a bijection of the data: ``inverse`` rounds down to the level, so
``inverse(forward(x)) == x`` on integer data. ``forward`` takes the usual ``context`` argument for
interface compatibility; the variational dequantizer computes its own context from ``x``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor
from torch.nn import functional as F

from ..nets import FlowppConditioner
from .base import InvertibleModule, InvertibleSequential, standard_normal_log_prob, sum_except_batch
from .mixlogistic import MixLogisticCoupling

__all__ = ["Sigmoid", "UniformDequantization", "VariationalDequantization"]


def _levels_as_float(x: Tensor, num_levels: int, name: str) -> Tensor:
    """Check that ``x`` holds levels in ``[0, K-1]`` and return it as floating point."""
    x = x if x.is_floating_point() else x.to(torch.get_default_dtype())
    if bool((x < 0).any()) or bool((x > num_levels - 1).any()):
        raise ValueError(
            f"{name} expects integer levels in [0, {num_levels - 1}], got values in "
            f"[{x.min().item():g}, {x.max().item():g}]"
        )
    return x


def _draw(kind: str, like: Tensor, generator: torch.Generator | None) -> Tensor:
    """``U[0, 1)`` or ``N(0, 1)`` noise shaped like ``like``, drawn on the generator's device."""
    device = generator.device if generator is not None else like.device
    draw = torch.rand if kind == "uniform" else torch.randn
    return draw(like.shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _fixed_noise(noise: Tensor | float, like: Tensor) -> Tensor:
    u = noise.to(like) if isinstance(noise, Tensor) else torch.full_like(like, float(noise))
    if u.shape != like.shape:
        raise ValueError(
            f"noise must have the data's shape {tuple(like.shape)}, got {tuple(u.shape)}"
        )
    return u


class Sigmoid(InvertibleModule):
    """Elementwise logistic sigmoid ``ℝ → (0, 1)``; log|det J| = Σ log σ(x)(1 - σ(x))."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # log σ'(x) = -softplus(-x) - softplus(x), stable for large |x|.
        return torch.sigmoid(x), sum_except_batch(-F.softplus(-x) - F.softplus(x))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        if bool((z <= 0).any()) or bool((z >= 1).any()):
            raise ValueError(
                f"Sigmoid.inverse expects values in (0, 1), got [{z.min().item():g}, "
                f"{z.max().item():g}]"
            )
        return torch.log(z) - torch.log1p(-z)


class UniformDequantization(InvertibleModule):
    """Dequantize with ``u ~ U[0, 1)^D`` (Theis et al. 2016); ``q = 1``, logdet ``-D log K``.

    For fixed noise the map ``x ↦ (x + u) / K`` is affine with exactly that log-det.

    Args:
        num_levels: Alphabet size ``K`` (17 for scikit-learn digits, 256 for 8-bit images).
    """

    #: Marks layers whose inverse is only a left inverse on the discrete data.
    surjective = True

    def __init__(self, num_levels: int) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        self.num_levels = num_levels

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        noise: Tensor | float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Dequantize; ``noise`` fixes ``u`` (a tensor, or a constant: 0.5 gives bin centres)."""
        x = _levels_as_float(x, self.num_levels, type(self).__name__)
        if noise is None:
            u = _draw("uniform", x, generator)
        else:
            u = _fixed_noise(noise, x)
            # Checked after the cast: 1 - 1e-16 becomes 1.0 in float32, i.e. the next level.
            if bool((u < 0).any()) or bool((u >= 1).any()):
                raise ValueError(
                    f"uniform dequantization noise must lie in [0, 1) in {x.dtype}, got "
                    f"[{u.min().item():g}, {u.max().item():g}]"
                )
        logdet = x.new_full((x.shape[0],), -x[0].numel() * math.log(self.num_levels))
        return (x + u) / self.num_levels, logdet

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return torch.floor(z * self.num_levels).clamp_(0, self.num_levels - 1)


class VariationalDequantization(InvertibleModule):
    """Flow++ variational dequantization (Ho et al. 2019, §3.1).

    ``q(u | x)`` pushes ``ε ~ N(0, I)`` through conditional mixture-of-logistics CDF couplings
    and a sigmoid, ``u = σ(g(ε; c(x)))``, where the context ``c(x)`` comes from a conv-attention
    network on the levels. Sampling uses only the cheap (CDF) direction of the couplings, as in
    the paper, and ``log q(u | x) = log N(ε) - log|det ∂u/∂ε|``. As in the reference code the
    context network is convolutional only (no attention). Evaluating ``q`` at a *given*
    ``u`` (``noise=``) inverts the couplings by bisection; that ``ε`` is differentiable in the
    parameters by implicit differentiation (first derivatives), so ``log q(u | x)`` at a fixed
    ``u`` can be trained too.

    The conditional flow is exposed as :attr:`noise_flow` (ε → u) and the context network as
    :attr:`context_net`. Couplings alternate checkerboard parities, and, for two or more
    channels, channel couplings.

    Args:
        num_levels: Alphabet size ``K``.
        input_shape: ``(C, H, W)`` of one example.
        num_couplings: Couplings in the noise flow (the paper uses 4 for CIFAR-10).
        context_channels: Channels of ``c(x)`` fed to every coupling's conditioner.
        hidden_channels, num_blocks, num_heads, attention, dropout: Settings of each coupling's
            conditioner (:class:`~hybridflow.nets.FlowppConditioner`); the context network shares
            the width, depth and dropout.
        num_components: Logistics per mixture.
        float64_mixture, inverse_tol, inverse_max_iter: See :class:`MixLogisticCoupling`.
        checkerboard_layout: ``"gathered"`` or ``"masked"`` checkerboard couplings, see
            :class:`~hybridflow.transforms.coupling.MaskedCoupling` (gathered needs an even width).
    """

    surjective = True

    def __init__(
        self,
        num_levels: int,
        input_shape: tuple[int, ...],
        *,
        num_couplings: int = 4,
        context_channels: int = 16,
        hidden_channels: int = 32,
        num_blocks: int = 2,
        num_components: int = 4,
        num_heads: int = 4,
        attention: bool = True,
        dropout: float = 0.0,
        float64_mixture: bool = False,
        inverse_tol: float = 1e-6,
        inverse_max_iter: int = 100,
        checkerboard_layout: str = "gathered",
    ) -> None:
        super().__init__()
        if num_levels < 2:
            raise ValueError(f"num_levels must be >= 2, got {num_levels}")
        if len(input_shape) != 3:
            raise ValueError(
                f"VariationalDequantization needs image inputs (C, H, W), got {tuple(input_shape)}"
            )
        if num_couplings < 1 or context_channels < 1:
            raise ValueError("num_couplings and context_channels must be >= 1")
        if checkerboard_layout == "gathered" and input_shape[2] % 2:
            raise ValueError(
                f"gathered checkerboard couplings need an even width, got {tuple(input_shape)}: "
                "use checkerboard_layout='masked'"
            )
        self.num_levels, self.input_shape = num_levels, tuple(input_shape)
        c, h, w = input_shape
        net_kw = dict(
            input_size=(h, w),
            hidden_channels=hidden_channels,
            num_blocks=num_blocks,
            num_heads=num_heads,
            attention=attention,
            dropout=dropout,
        )
        self.context_net = FlowppConditioner(c, context_channels, **{**net_kw, "attention": False})

        def factory(mask: str) -> Callable[[int, int], FlowppConditioner]:
            gathered = mask == "checkerboard" and checkerboard_layout == "gathered"
            size = (h, w // 2) if gathered else (h, w)  # the positions the conditioner sees
            return partial(FlowppConditioner, **{**net_kw, "input_size": size})

        masks = [("checkerboard", 0), ("checkerboard", 1)]
        if c >= 2:
            masks += [("channel", 0), ("channel", 1)]
        couplings = [
            MixLogisticCoupling(
                c,
                num_components,
                mask,
                parity,
                factory(mask),
                context_channels=context_channels,
                float64_mixture=float64_mixture,
                inverse_tol=inverse_tol,
                inverse_max_iter=inverse_max_iter,
                checkerboard_layout=checkerboard_layout,
            )
            for mask, parity in (masks[i % len(masks)] for i in range(num_couplings))
        ]
        self.noise_flow = InvertibleSequential(*couplings, Sigmoid())

    def context(self, x: Tensor) -> Tensor:
        """Context features ``c(x)`` of levels ``x`` (scaled to ``[-0.5, 0.5]`` first)."""
        return self.context_net(x / (self.num_levels - 1) - 0.5)

    def forward(
        self,
        x: Tensor,
        context: Tensor | None = None,
        *,
        noise: Tensor | float | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Dequantize with ``u ~ q(u | x)``, or at a given ``u`` (``noise``, in ``(0, 1)``).

        Returns ``(y, -D log K - log q(u | x))``.
        """
        # Levels are exact in any float type: compute in the parameters' precision.
        x = _levels_as_float(x, self.num_levels, type(self).__name__)
        x = x.to(self.context_net.conv_out.weight.dtype)
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected levels of shape [N, {', '.join(map(str, self.input_shape))}], got "
                f"{tuple(x.shape)}"
            )
        ctx = self.context(x)
        if noise is None:
            eps = _draw("normal", x, generator)
            u, logdet = self.noise_flow(eps, ctx)
        else:
            u = _fixed_noise(noise, x)
            if bool((u <= 0).any()) or bool((u >= 1).any()):
                raise ValueError("variational dequantization evaluates q at noise in (0, 1) only")
            eps = self.noise_flow.inverse(u, ctx)
            _, logdet = self.noise_flow(eps, ctx)
        log_q = standard_normal_log_prob(eps) - logdet
        dim = x[0].numel()
        return (x + u) / self.num_levels, -dim * math.log(self.num_levels) - log_q

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        return torch.floor(z * self.num_levels).clamp_(0, self.num_levels - 1)
