"""Flows as variational distributions: ``q(x)``, sampled and scored in one pass (IAF-style).

Reverse-KL fitting (:func:`~hybridflow.training.fit_target`) and flow posteriors of VAEs draw
``x = T⁻¹(z; h)`` with ``z ~ N(0, I)`` and need ``log q(x | h) = log N(z) − log|det ∂x/∂z|`` of
the same draw (Rezende & Mohamed 2015; Kingma et al. 2016, "Improved Variational Inference with
Inverse Autoregressive Flow"; Huang et al. 2018, "Neural Autoregressive Flows", §5.2).
:class:`VariationalFlow` wraps any :class:`~hybridflow.transforms.InvertibleModule` (data →
latent, as every flow here) and uses its :meth:`inverse_and_logdet`. :func:`iaf_flow` builds the
NAF paper's posteriors: affine IAF layers or IAF-DSF/DDSF layers
(``Inverse(NeuralAutoregressiveFlow)``: the DSF applied in the sampling direction, one MADE pass),
with reversed orders in between and an optional context ``h``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..transforms import (
    Inverse,
    InverseAutoregressiveFlow,
    InvertibleModule,
    InvertibleSequential,
    MaskedAutoregressiveFlow,
    MixLogisticCoupling,
    NAFCoupling,
    NeuralAutoregressiveFlow,
    Permutation,
    ResidualBlock,
    standard_normal_log_prob,
)

__all__ = ["IAF_TRANSFORMERS", "VariationalFlow", "iaf_flow", "iterative_sampling_layers"]

#: Transformers of :func:`iaf_flow`.
IAF_TRANSFORMERS = ("affine", "dsf", "ddsf")


def _iterative_inverse(module: nn.Module) -> bool:
    """Whether ``module.inverse`` solves iteratively (D sequential passes, bisection, fixed
    point) rather than evaluating a closed form."""
    iterative = (
        MaskedAutoregressiveFlow,
        NeuralAutoregressiveFlow,
        NAFCoupling,
        ResidualBlock,
        MixLogisticCoupling,
    )
    return isinstance(module, iterative)


def iterative_sampling_layers(transform: nn.Module) -> list[str]:
    """Names of the layers of ``transform`` whose sampling direction (``inverse``) is iterative:
    MAF, NAF, residual and mixture-of-logistics layers, and ``Inverse`` of an IAF. Empty for
    flows that sample in one pass (IAF, IAF-DSF, couplings)."""
    slow: list[str] = []

    def walk(module: nn.Module, name: str, flipped: bool) -> None:
        if isinstance(module, Inverse):
            walk(module.layer, f"{name}.layer" if name else "layer", not flipped)
            return
        if flipped and isinstance(module, InverseAutoregressiveFlow):
            slow.append(f"{name or 'transform'} (Inverse of an IAF: sequential)")
            return
        if not flipped and _iterative_inverse(module):
            slow.append(f"{name or 'transform'} ({type(module).__name__})")
            return
        for child_name, child in module.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name, flipped)

    walk(transform, "", False)
    return slow


class VariationalFlow(nn.Module):
    """``q(x | h)``: a standard normal pushed through ``transform``'s inverse.

    Args:
        transform: Data → latent flow on ``[N, dim]`` vectors (its ``inverse`` samples).
        dim: Dimension ``D``.
    """

    def __init__(self, transform: InvertibleModule, dim: int) -> None:
        super().__init__()
        self.transform, self.dim = transform, dim

    def rsample_and_log_prob(
        self,
        n: int,
        context: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``n`` reparameterized draws ``x`` and their ``log q(x | h)``, differentiable in the
        flow's parameters and the context (one draw per context row when one is given)."""
        param = next(self.parameters())
        if context is not None and context.shape[0] != n:
            raise ValueError(f"context has {context.shape[0]} rows for {n} draws")
        z = torch.randn(n, self.dim, generator=generator, device=param.device, dtype=param.dtype)
        x, logdet = self.transform.inverse_and_logdet(z, context)
        return x, standard_normal_log_prob(z) - logdet

    def log_prob(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """``log q(x | h)`` of given points (the density direction: sequential for an IAF)."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected [N, {self.dim}] points, got {tuple(x.shape)}")
        z, logdet = self.transform(x, context)
        return standard_normal_log_prob(z) + logdet

    @torch.no_grad()
    def sample(
        self, n: int, context: Tensor | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``n`` draws of ``q`` (no gradient)."""
        return self.rsample_and_log_prob(n, context, generator)[0]


def iaf_flow(
    dim: int,
    num_flows: int = 4,
    transformer: str = "affine",
    hidden_features: Sequence[int] = (64, 64),
    context_features: int = 0,
    num_units: int = 8,
    num_layers: int = 2,
    seed: int = 0,
) -> VariationalFlow:
    """The NAF paper's IAF posteriors: ``num_flows`` IAF layers with reversed orders between.

    Args:
        dim: Dimension ``D``.
        num_flows: Autoregressive layers.
        transformer: ``"affine"`` (IAF, Kingma et al. 2016), ``"dsf"`` or ``"ddsf"`` (IAF-DSF /
            IAF-DDSF, Huang et al. 2018: the sigmoidal flow in the sampling direction).
        hidden_features: MADE widths.
        context_features: Size of the conditioning vector ``h`` (0: unconditional).
        num_units, num_layers: DSF/DDSF units and DDSF layers.
        seed: MADE seeds (``seed + i`` for the ``i``-th layer).
    """
    if transformer not in IAF_TRANSFORMERS:
        raise ValueError(f"transformer must be one of {IAF_TRANSFORMERS}, got {transformer!r}")
    if num_flows < 1 or dim < 1:
        raise ValueError(f"need dim >= 1 and num_flows >= 1, got {dim} and {num_flows}")
    layers: list[InvertibleModule] = []
    for i in range(num_flows):
        if i > 0 and dim > 1:
            layers.append(Permutation.reversed(dim))
        if transformer == "affine":
            layers.append(
                InverseAutoregressiveFlow(
                    dim, hidden_features, context_features=context_features, seed=seed + i
                )
            )
        else:
            naf = NeuralAutoregressiveFlow(
                dim,
                transformer,
                num_units,
                num_layers,
                hidden_features,
                context_features=context_features,
                seed=seed + i,
            )
            layers.append(Inverse(naf))
    return VariationalFlow(InvertibleSequential(layers), dim)
