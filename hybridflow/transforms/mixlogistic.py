"""Mixture-of-logistics CDF coupling (Ho et al. 2019, "Flow++", §3.1).

The transformed half ``x_b`` goes through the elementwise map

    ``z_b = logit(F(x_b; π, μ, s)) · exp(a) + b``,

where ``F`` is the CDF of a ``K``-component mixture of logistics whose parameters, like ``a``
and ``b``, come from a conditioner net applied to the kept half. ``F`` is strictly increasing,
so the map is invertible; its inverse has no closed form and is found by bisection
(:mod:`hybridflow.transforms.bisection`), differentiable by implicit differentiation.
All mixture maths runs in log space so that CDF values within ``1e-30`` of 0 or 1 stay exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import sum_except_batch
from .bisection import monotone_bisection
from .coupling import MaskedCoupling, NetFactory, _default_factory

__all__ = ["MixLogisticCoupling", "mixture_inverse_cdf", "mixture_log_cdf", "mixture_log_pdf"]

# Flow++'s reference code clamps log-scales from below: a logistic narrower than e^-7 makes the
# CDF a near step function whose inverse is ill-conditioned and whose log-pdf explodes.
LOG_SCALE_MIN = -7.0


def _prepare(
    x: Tensor, logit_weights: Tensor, means: Tensor, log_scales: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate shapes; return ``(standardised t, log-weights, clamped log-scales)``."""
    if not (logit_weights.shape == means.shape == log_scales.shape):
        raise ValueError(
            "logit_weights, means and log_scales must share one shape [..., K], got "
            f"{tuple(logit_weights.shape)}, {tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    if means.dim() < 1 or means.shape[-1] < 1:
        raise ValueError(f"mixture parameters need a component dimension, got {tuple(means.shape)}")
    log_scales = log_scales.clamp(min=LOG_SCALE_MIN)
    t = (x.unsqueeze(-1) - means) * torch.exp(-log_scales)
    return t, F.log_softmax(logit_weights, dim=-1), log_scales


def mixture_log_pdf(x: Tensor, logit_weights: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-density of a mixture of logistics (Ho et al. 2019, Flow++ eq. 6).

    Args:
        x: Points, shape ``[...]``.
        logit_weights: Unnormalised component log-weights, shape ``[..., K]``.
        means: Component means ``μ_k``, shape ``[..., K]``.
        log_scales: Component log-scales ``log s_k``, shape ``[..., K]`` (clamped at -7).

    Returns:
        ``log f(x)`` with the shape of ``x`` broadcast against the parameters' leading dims.
    """
    t, log_w, log_s = _prepare(x, logit_weights, means, log_scales)
    # log σ'(t) = t - 2·softplus(t): finite for any t, unlike log(σ(t)·(1-σ(t))).
    log_pdf_k = t - 2.0 * F.softplus(t) - log_s
    return torch.logsumexp(log_w + log_pdf_k, dim=-1)


def mixture_log_cdf(
    x: Tensor, logit_weights: Tensor, means: Tensor, log_scales: Tensor
) -> tuple[Tensor, Tensor]:
    """Log-CDF and log-survival of a mixture of logistics (Ho et al. 2019, Flow++ §3.1).

    Args:
        x: Points, shape ``[...]``.
        logit_weights: Unnormalised component log-weights, shape ``[..., K]``.
        means: Component means, shape ``[..., K]``.
        log_scales: Component log-scales, shape ``[..., K]`` (clamped at -7).

    Returns:
        ``(log F(x), log(1 - F(x)))``. Both are computed directly per component
        (``log σ(t) = -softplus(-t)``, ``log(1-σ(t)) = -softplus(t)``), so neither loses
        precision when ``F`` is within rounding of 0 or 1.
    """
    t, log_w, _ = _prepare(x, logit_weights, means, log_scales)
    return _log_cdf_and_sf(t, log_w)


def _log_cdf_and_sf(t: Tensor, log_w: Tensor) -> tuple[Tensor, Tensor]:
    """``(log F, log(1 - F))`` from standardised points ``t`` and normalised log-weights."""
    log_cdf = torch.logsumexp(log_w - F.softplus(-t), dim=-1)
    log_sf = torch.logsumexp(log_w - F.softplus(t), dim=-1)
    return log_cdf, log_sf


def _logit_cdf_and_log_slope(
    x: Tensor, logit_weights: Tensor, means: Tensor, log_scales: Tensor
) -> tuple[Tensor, Tensor]:
    """``(logit F(x), log d logit F / dx)``; ``d logit F/dx = f / (F (1 - F))``."""
    log_cdf, log_sf = mixture_log_cdf(x, logit_weights, means, log_scales)
    log_pdf = mixture_log_pdf(x, logit_weights, means, log_scales)
    return log_cdf - log_sf, log_pdf - log_cdf - log_sf


def mixture_inverse_cdf(
    u_logit: Tensor,
    logit_weights: Tensor,
    means: Tensor,
    log_scales: Tensor,
    tol: float = 1e-6,
    max_iter: int = 100,
) -> Tensor:
    """Solve ``logit(F(x)) = u_logit`` for ``x`` by vectorised bisection (Ho et al. 2019).

    The target is given as a logit so that CDF values extremely close to 0 or 1 are still
    distinguishable. Each logistic component has ``logit F_k(x) = (x - μ_k) / s_k``, and the
    mixture CDF is a convex combination of the ``F_k``, so ``logit F(x)`` lies between the
    smallest and largest component logit (logit is monotone). Hence the root lies in
    ``[min_k(μ_k + s_k·y), max_k(μ_k + s_k·y)]``: at the left end every component logit is
    ``≤ y``, at the right end every one is ``≥ y``. The search is
    :func:`~hybridflow.transforms.bisection.monotone_bisection` on that bracket.

    With autograd on, ``x`` is differentiable in ``u_logit`` and every mixture parameter by
    implicit differentiation, ``dx/dθ = -(∂ logit F/∂θ) / (∂ logit F/∂x)`` (first derivatives
    only; second derivatives through the inverse are not provided).

    Args:
        u_logit: Target logits ``y``, shape ``[...]``.
        logit_weights: Unnormalised component log-weights, shape ``[..., K]``.
        means: Component means, shape ``[..., K]``.
        log_scales: Component log-scales, shape ``[..., K]`` (clamped at -7).
        tol: Stop once every bracket is at most this wide (absolute, in ``x`` units) or its
            midpoint is no longer representable.
        max_iter: Upper bound on bisection steps.

    Returns:
        ``x`` of the broadcast shape.

    Raises:
        ValueError: non-finite targets, a bracket that overflows, or NaN from the mixture.
    """
    params = (logit_weights, means, log_scales)
    with torch.no_grad():
        # Everything that does not depend on x is computed once, not at every bisection step
        # (the same operations as _prepare, so the search sees bitwise the same values).
        _, log_w, log_s = _prepare(u_logit.detach(), *(p.detach() for p in params))
        means_, inv_scales = means.detach(), torch.exp(-log_s)
        ends = means_ + log_s.exp() * u_logit.detach().unsqueeze(-1)
        bracket = ends.min(dim=-1).values, ends.max(dim=-1).values

    def search(x: Tensor) -> Tensor:  # logit F(x), standardised as _prepare does
        log_cdf, log_sf = _log_cdf_and_sf((x.unsqueeze(-1) - means_) * inv_scales, log_w)
        return log_cdf - log_sf

    return monotone_bisection(
        lambda x: _logit_cdf_and_log_slope(x, *params),
        u_logit,
        tol,
        max_iter,
        bracket=bracket,
        search_fn=search,
    )


class MixLogisticCoupling(MaskedCoupling):
    """Flow++ logistic-mixture CDF coupling (Ho et al. 2019, §3.1).

    The conditioner outputs, per transformed element, a log-scale ``a`` (bounded as
    ``scale·tanh``), a shift ``b`` and ``K`` mixture weight logits, means and log-scales.
    Masking and layouts follow :class:`~hybridflow.transforms.coupling.AffineCoupling`.

    Args:
        num_channels: Channels ``C`` of the input (features for vector inputs).
        num_components: Mixture components ``K``.
        mask: ``"checkerboard"`` (images) or ``"channel"`` (splits dimension 1 in halves).
        parity: 0 or 1, which half is kept.
        net_factory: ``(in_channels, out_channels) -> nn.Module``; defaults as in AffineCoupling.
            A zero-initialised last layer makes the layer start as the identity.
        spatial: Whether inputs are images (``True``) or vectors (``False``).
        float64_mixture: Evaluate the mixture CDF/pdf and its inverse in float64.
        context_channels: Channels of a conditioning input (0: unconditional); variational
            dequantization conditions its couplings on features of the data this way.
        checkerboard_layout: ``"gathered"`` or ``"masked"``, see
            :class:`~hybridflow.transforms.coupling.MaskedCoupling`.
        inverse_tol: Bisection tolerance (in ``x`` units) of :meth:`inverse`.
        inverse_max_iter: Maximum bisection steps of :meth:`inverse`.
    """

    def __init__(
        self,
        num_channels: int,
        num_components: int = 4,
        mask: str = "checkerboard",
        parity: int = 0,
        net_factory: NetFactory | None = None,
        *,
        spatial: bool = True,
        float64_mixture: bool = False,
        inverse_tol: float = 1e-6,
        inverse_max_iter: int = 100,
        context_channels: int = 0,
        checkerboard_layout: str = "gathered",
    ) -> None:
        super().__init__(num_channels, mask, parity, spatial, context_channels, checkerboard_layout)
        if num_components < 1:
            raise ValueError(f"num_components must be >= 1, got {num_components}")
        self.num_components = num_components
        self.float64_mixture = float64_mixture
        self.inverse_tol, self.inverse_max_iter = inverse_tol, inverse_max_iter
        factory = net_factory or _default_factory(spatial)
        c_in, c_out = self._conditioner_channels()
        self.c_out = c_out
        self.net = factory(c_in, c_out * (2 + 3 * num_components))
        # Same bounded "scale · tanh" log-scale as AffineCoupling, for early-training stability.
        self.scale = nn.Parameter(torch.ones(c_out))

    def _params(
        self, inp: Tensor, context: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Return ``(a, b, logit_weights, means, log_scales)``; mixture params are ``[..., K]``."""
        out = self._conditioner(inp, context)
        c, k = self.c_out, self.num_components
        raw, shift, rest = out[:, :c], out[:, c : 2 * c], out[:, 2 * c :]
        view = (1, -1) + (1,) * (raw.dim() - 2)
        log_a = self.scale.view(view) * torch.tanh(raw)
        # [N, c·3K, ...] -> [N, c, ..., 3K]: component dimension last, as the mixture fns expect.
        rest = rest.reshape(out.shape[0], c, 3 * k, *out.shape[2:]).movedim(2, -1)
        logits, means, log_scales = rest.split(k, dim=-1)
        return log_a, shift, logits, means, log_scales

    def _mix_dtype(self, *ts: Tensor) -> list[Tensor]:
        return [t.double() for t in ts] if self.float64_mixture else list(ts)

    def _transform(self, x2: Tensor, params) -> tuple[Tensor, Tensor]:
        """Elementwise forward map of the transformed part and its log-derivative."""
        log_a, shift, logits, means, log_scales = params
        xm, lw, mu, ls = self._mix_dtype(x2, logits, means, log_scales)
        logit, log_deriv = _logit_cdf_and_log_slope(xm, lw, mu, ls)
        return logit.to(x2.dtype) * log_a.exp() + shift, log_deriv.to(x2.dtype) + log_a

    def _untransform(self, y2: Tensor, params) -> Tensor:
        log_a, shift, logits, means, log_scales = params
        u = (y2 - shift) * (-log_a).exp()
        um, lw, mu, ls = self._mix_dtype(u, logits, means, log_scales)
        x2 = mixture_inverse_cdf(
            um, lw, mu, ls, tol=self.inverse_tol, max_iter=self.inverse_max_iter
        )
        return x2.to(y2.dtype)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        context = self._context_for(x, context)
        if self.masked:
            m, inp = self._mask_input(x)
            y, ld = self._transform(x, self._params(inp, context))
            # Kept sites pass through and contribute nothing to log|det J|.
            return x * m + (1 - m) * y, sum_except_batch(ld * (1 - m))
        kept, moved = self._split(x)
        y, ld = self._transform(moved, self._params(kept, context))
        return self._merge(kept, y), sum_except_batch(ld)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(z)
        context = self._context_for(z, context)
        if self.masked:
            m, inp = self._mask_input(z)
            x = self._untransform(z, self._params(inp, context))
            return z * m + (1 - m) * x
        kept, moved = self._split(z)
        return self._merge(kept, self._untransform(moved, self._params(kept, context)))
