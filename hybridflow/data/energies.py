"""Unnormalized 2-D targets for variational inference with flows, with known normalizers.

Reverse-KL fitting (:func:`~hybridflow.training.fit_target`) needs only ``log p̃(x)``; reporting
the true KL(q‖p) = log Z − ELBO needs ``log Z``, and mode coverage needs the modes. Each
:class:`Target` carries what is known:

* ``"mixture8"``: eight well-separated Gaussians (σ = 0.5) on a circle of radius 4, summed
  without their 1/8 weights, so ``log Z = log 8`` exactly; exact samples; 8 modes. A unimodal
  base pushed through an affine IAF cannot split into eight modes; a DSF can (NAF paper §5.1,
  Figure 5).
* ``"banana"``: a twisted Gaussian (Haario et al. 1999): ``x₁ ~ N(0, 2²)``,
  ``x₂ | x₁ ~ N(b(x₁² − 4), 1)`` with ``b = 0.5``; the twist has unit Jacobian, so
  ``log Z = log(2π · 2)`` exactly; exact samples; unimodal and curved.
* ``"ring"``: energy U₁ of Rezende & Mohamed (2015, Table 1),
  ``U₁(x) = ½((‖x‖ − 2)/0.4)² − log(e^{−½((x₁−2)/0.6)²} + e^{−½((x₁+2)/0.6)²})``, ``p̃ = e^{−U₁}``:
  a ring with two modes at (±2, 0). ``log Z`` by quadrature (float64, midpoint rule on
  [−5, 5]², 2,000² points; the density outside is below e^{−33}; a finer and wider grid,
  [−6, 6]² with 2,400² points, agrees to 1e-15).
* :func:`gaussian_target`: any Gaussian with a given mean and covariance, normalizer ``0``
  (what an affine flow represents exactly; the tests' target).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor

from ..naming import unknown_name_message

__all__ = [
    "TARGETS",
    "Target",
    "gaussian_target",
    "list_targets",
    "load_target",
    "quadrature_log_normalizer",
]


@dataclass(frozen=True)
class Target:
    """An unnormalized density ``p̃`` on ``R^dim`` and what is known about it.

    Attributes:
        name: Registry name.
        dim: Dimension.
        log_prob: ``[N, dim] -> [N]``: ``log p̃(x)``.
        log_normalizer: ``log ∫ p̃`` (``None``: unknown).
        modes: ``[K, dim]`` mode locations (``None``: not tracked).
        sampler: ``(n, generator) -> [n, dim]`` exact samples of ``p`` (``None``: none).
        normalizer_note: How ``log_normalizer`` was obtained.
    """

    name: str
    dim: int
    log_prob: Callable[[Tensor], Tensor]
    log_normalizer: float | None = None
    modes: Tensor | None = None
    sampler: Callable[[int, torch.Generator | None], Tensor] | None = None
    normalizer_note: str = ""

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if self.sampler is None:
            raise ValueError(f"target {self.name!r} has no exact sampler")
        return self.sampler(n, generator)


def _check_points(x: Tensor, dim: int, name: str) -> None:
    if x.dim() != 2 or x.shape[1] != dim:
        raise ValueError(f"target {name!r} expects [N, {dim}] points, got {tuple(x.shape)}")


# ---------------------------------------------------------------------------- mixture of 8

_MIX_RADIUS, _MIX_SIGMA, _MIX_K = 4.0, 0.5, 8
_MIX_CENTRES = torch.tensor(
    [
        [
            _MIX_RADIUS * math.cos(2 * math.pi * k / _MIX_K),
            _MIX_RADIUS * math.sin(2 * math.pi * k / _MIX_K),
        ]
        for k in range(_MIX_K)
    ],
    dtype=torch.float64,
)


def _mixture_log_prob(x: Tensor) -> Tensor:
    _check_points(x, 2, "mixture8")
    centres = _MIX_CENTRES.to(x)
    sq = (x[:, None, :] - centres[None]).pow(2).sum(-1)
    log_n = -sq / (2 * _MIX_SIGMA**2) - math.log(2 * math.pi * _MIX_SIGMA**2)
    return torch.logsumexp(log_n, dim=1)


def _mixture_sample(n: int, generator: torch.Generator | None) -> Tensor:
    k = torch.randint(0, _MIX_K, (n,), generator=generator)
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return (_MIX_CENTRES[k] + _MIX_SIGMA * eps).to(torch.get_default_dtype())


# ---------------------------------------------------------------------------- banana

_BANANA_S1, _BANANA_B = 2.0, 0.5


def _banana_log_prob(x: Tensor) -> Tensor:
    _check_points(x, 2, "banana")
    x1, x2 = x[:, 0], x[:, 1]
    twisted = x2 - _BANANA_B * (x1.pow(2) - _BANANA_S1**2)
    return -0.5 * (x1 / _BANANA_S1).pow(2) - 0.5 * twisted.pow(2)


def _banana_sample(n: int, generator: torch.Generator | None) -> Tensor:
    u = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    x1 = _BANANA_S1 * u[:, 0]
    x2 = u[:, 1] + _BANANA_B * (x1.pow(2) - _BANANA_S1**2)
    return torch.stack([x1, x2], dim=1).to(torch.get_default_dtype())


# ---------------------------------------------------------------------------- ring (U1)


def _ring_log_prob(x: Tensor) -> Tensor:
    _check_points(x, 2, "ring")
    radius = x.norm(dim=1)
    bumps = torch.stack(
        [-0.5 * ((x[:, 0] - 2) / 0.6).pow(2), -0.5 * ((x[:, 0] + 2) / 0.6).pow(2)], dim=1
    )
    return -0.5 * ((radius - 2) / 0.4).pow(2) + torch.logsumexp(bumps, dim=1)


@cache
def quadrature_log_normalizer(name: str, half_width: float = 5.0, points: int = 2000) -> float:
    """``log ∫ p̃`` of a registered 2-D target by the midpoint rule on ``[−w, w]²`` (float64)."""
    log_prob = TARGETS[name]().log_prob
    step = 2 * half_width / points
    axis = -half_width + step * (torch.arange(points, dtype=torch.float64) + 0.5)
    total = []
    for row in axis.split(100):  # 100 × points at a time
        grid = torch.stack(torch.meshgrid(row, axis, indexing="ij"), dim=-1).reshape(-1, 2)
        total.append(torch.logsumexp(log_prob(grid), dim=0))
    return float(torch.logsumexp(torch.stack(total), dim=0) + 2 * math.log(step))


# ---------------------------------------------------------------------------- registry


def _mixture8() -> Target:
    return Target(
        "mixture8",
        2,
        _mixture_log_prob,
        math.log(_MIX_K),
        _MIX_CENTRES.to(torch.get_default_dtype()),
        _mixture_sample,
        "exact",
    )


def _banana() -> Target:
    return Target(
        "banana",
        2,
        _banana_log_prob,
        math.log(2 * math.pi * _BANANA_S1),
        torch.tensor([[0.0, -_BANANA_B * _BANANA_S1**2]]),
        _banana_sample,
        "exact",
    )


def _ring() -> Target:
    return Target(
        "ring",
        2,
        _ring_log_prob,
        None,  # filled by load_target (quadrature)
        torch.tensor([[2.0, 0.0], [-2.0, 0.0]]),
        None,
        "quadrature: midpoint rule on [-5, 5]², 2,000² points, float64",
    )


TARGETS: dict[str, Callable[[], Target]] = {
    "mixture8": _mixture8,
    "banana": _banana,
    "ring": _ring,
}


def list_targets() -> list[str]:
    """Names of the registered targets."""
    return sorted(TARGETS)


def load_target(name: str) -> Target:
    """A registered target with its normalizer (computed by quadrature where not exact)."""
    if name not in TARGETS:
        raise ValueError(unknown_name_message("target", name, TARGETS))
    target = TARGETS[name]()
    if target.log_normalizer is None:
        target = Target(
            target.name,
            target.dim,
            target.log_prob,
            quadrature_log_normalizer(name),
            target.modes,
            target.sampler,
            target.normalizer_note,
        )
    return target


def gaussian_target(mean: Tensor, covariance: Tensor) -> Target:
    """``N(mean, covariance)`` as a target (normalized: ``log Z = 0``), with exact samples."""
    mean = torch.as_tensor(mean, dtype=torch.get_default_dtype())
    cov = torch.as_tensor(covariance, dtype=mean.dtype)
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov)
    dim = mean.numel()

    def log_prob(x: Tensor) -> Tensor:
        _check_points(x, dim, "gaussian")
        return dist.log_prob(x.to(mean)).to(x)  # evaluated on the CPU, returned on x's device

    def sampler(n: int, generator: torch.Generator | None) -> Tensor:
        eps = torch.randn(n, dim, generator=generator, dtype=mean.dtype)
        return mean + eps @ dist.scale_tril.T

    return Target("gaussian", dim, log_prob, 0.0, mean[None], sampler, "exact")
