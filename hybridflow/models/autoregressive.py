"""Affine autoregressive backbones for vector data: MAF and IAF stacks.

``maf`` (Papamakarios et al. 2017) evaluates densities in one MADE pass per layer, so it is the
natural choice for density estimation; ``iaf`` (Kingma et al. 2016) samples in one pass per layer
but needs ``D`` sequential passes per layer to evaluate a density. Consecutive layers are separated
by a fixed permutation so every dimension is eventually conditioned on every other. Images are
rejected rather than flattened silently: a fully autoregressive flow over pixels is a different
model choice (and ``D`` sequential passes for IAF densities).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..transforms import ActNorm, InvertibleSequential, MultiscaleFlow
from ..transforms.autoregressive import autoregressive_stack
from .registry import register_backbone

__all__ = ["iaf", "maf"]


def _autoregressive_flow(
    flow: str,
    input_shape: tuple[int, ...],
    num_flows: int,
    hidden_features: Sequence[int],
    permutation: str,
    actnorm: bool,
    context_features: int,
    seed: int,
    identity_init: bool,
    affine: str,
) -> MultiscaleFlow:
    if len(input_shape) != 1 or input_shape[0] < 1:
        raise ValueError(
            f"{flow} expects vector inputs (D,); got {input_shape} (flatten images explicitly)"
        )
    d = input_shape[0]
    stack = autoregressive_stack(
        d,
        num_flows,
        flow=flow,
        permutation=permutation,
        seed=seed,
        hidden_features=tuple(hidden_features),
        context_features=context_features,
        identity_init=identity_init,
        affine=affine,
    )
    layers = list(stack)
    if actnorm:
        # ActNorm after every autoregressive layer, as the vector coupling backbones do.
        layers = [m for layer in layers for m in (layer, ActNorm(d))]
    return MultiscaleFlow([InvertibleSequential(layers)], input_shape, [input_shape], False)


@register_backbone
def maf(
    input_shape: tuple[int, ...],
    num_flows: int = 5,
    hidden_features: Sequence[int] = (64, 64),
    permutation: str = "reversed",
    actnorm: bool = False,
    context_features: int = 0,
    seed: int = 0,
    identity_init: bool = False,
    affine: str = "softplus",
) -> MultiscaleFlow:
    """Masked autoregressive flow (Papamakarios et al. 2017) for vectors ``(D,)``.

    Args:
        input_shape: ``(D,)``.
        num_flows: Number of MAF layers.
        hidden_features: Hidden widths of each MADE conditioner.
        permutation: ``"reversed"``, ``"random"`` or ``"none"`` between layers.
        actnorm: Follow every layer with ActNorm (the paper's batch norm is not used, so
            log-dets never depend on the batch).
        context_features: Size of an optional conditioning vector.
        seed: Seed of random permutations.
        identity_init: Start every layer as the identity (zeroed MADE output layers); the
            default initialisation learns faster (``reports/parity/``).
        affine: ``"softplus"`` (``z = s·x + t``, ``s = softplus(raw) + 1e-3``, as nflows; the
            default for MAF) or ``"tanh"`` (``z = (x - mu)·exp(-alpha)``, soft-bounded
            log-scales; the default for IAF); see :mod:`hybridflow.transforms.autoregressive`.
    """
    return _autoregressive_flow(
        "maf",
        input_shape,
        num_flows,
        hidden_features,
        permutation,
        actnorm,
        context_features,
        seed,
        identity_init,
        affine,
    )


@register_backbone
def iaf(
    input_shape: tuple[int, ...],
    num_flows: int = 5,
    hidden_features: Sequence[int] = (64, 64),
    permutation: str = "reversed",
    actnorm: bool = False,
    context_features: int = 0,
    seed: int = 0,
    identity_init: bool = False,
    affine: str = "tanh",
) -> MultiscaleFlow:
    """Inverse autoregressive flow (Kingma et al. 2016) for vectors ``(D,)``.

    Log-densities cost ``D`` sequential MADE passes per layer; sampling costs one.

    Args: as in :func:`maf`.
    """
    return _autoregressive_flow(
        "iaf",
        input_shape,
        num_flows,
        hidden_features,
        permutation,
        actnorm,
        context_features,
        seed,
        identity_init,
        affine,
    )
