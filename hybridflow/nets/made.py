"""Masked autoencoder for distribution estimation (Germain et al. 2015, "MADE").

A MADE is an MLP whose weights are multiplied by binary masks so that output ``i`` depends only on
inputs that come before ``i`` in a fixed autoregressive order. It is the conditioner of masked
autoregressive flows (Papamakarios et al. 2017), inverse autoregressive flows (Kingma et al.
2016) and neural autoregressive flows (Huang et al. 2018): one pass gives the pseudo-parameters
of every dimension at once.

Degrees (Germain et al. 2015, §4): input ``j`` gets degree ``order[j] + 1`` (``1..D``), hidden
units get degrees in ``[1, D - 1]``, a hidden unit sees every unit of the previous layer with a
degree ``<=`` its own, and the outputs of dimension ``i`` see the last hidden layer's units with a
degree ``<`` ``order[i] + 1`` (strict, so no output sees its own input).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["MADE", "MaskedLinear"]


class MaskedLinear(nn.Linear):
    """Linear layer whose weight is multiplied by a fixed binary mask.

    Args:
        in_features: Input size.
        out_features: Output size.
        mask: ``[out_features, in_features]`` tensor; nonzero entries are the kept connections.
        bias: Whether to learn an additive bias.
    """

    def __init__(
        self, in_features: int, out_features: int, mask: Tensor, bias: bool = True
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if tuple(mask.shape) != (out_features, in_features):
            raise ValueError(
                f"mask must have shape {(out_features, in_features)}, got {tuple(mask.shape)}"
            )
        # A bool buffer: it moves with the module across devices but never changes dtype.
        self.register_buffer("mask", mask.detach().to(torch.bool).clone())

    @property
    def masked_weight(self) -> Tensor:
        """The weight with the masked connections zeroed (what the layer applies)."""
        return self.weight * self.mask

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.masked_weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, connections={int(self.mask.sum())}"


def _resolve_order(order: str | Sequence[int] | Tensor, features: int, seed: int) -> Tensor:
    """``order[j]`` = position of input ``j`` in the autoregressive order, as a LongTensor."""
    if isinstance(order, str):
        if order == "natural":
            return torch.arange(features)
        if order == "reversed":
            return torch.arange(features - 1, -1, -1)
        if order == "random":
            return torch.randperm(features, generator=torch.Generator().manual_seed(seed))
        raise ValueError(
            f"order must be 'natural', 'reversed', 'random' or a permutation, got {order!r}"
        )
    values = torch.as_tensor(order)
    if values.dim() != 1 or values.numel() != features:
        raise ValueError(
            f"an explicit order must list {features} positions, got shape {tuple(values.shape)}"
        )
    if values.is_floating_point() or values.dtype == torch.bool:
        raise ValueError(f"an explicit order must hold integers, got {values.dtype}")
    values = values.long()
    if not torch.equal(values.sort().values, torch.arange(features)):
        raise ValueError(
            f"an explicit order must be a permutation of 0..{features - 1}, got {values.tolist()}"
        )
    return values


class MADE(nn.Module):
    """Masked MLP giving ``P`` autoregressive pseudo-parameters per dimension (Germain et al. 2015).

    ``out[:, i, :]`` depends only on ``x[:, j]`` with ``order[j] < order[i]`` and on the context;
    the first dimension in the order depends on nothing but the context and biases.

    Hidden degrees are spread cyclically over ``1..D-1`` (``k % (D - 1) + 1``), so every degree is
    present as soon as a layer has ``D - 1`` units and no allowed dependency is pruned; pass
    ``random_degrees=True`` for the uniform sampling of the paper. For ``D == 1`` every hidden unit
    gets degree 0: it sees no input but still carries the context and biases.

    The context (``context_features > 0``) is fed unmasked to *every* hidden layer and, through a
    direct linear map, to the output layer: without that skip the first dimension, whose outputs
    see no hidden unit, could not depend on the context. When ``context_features == 0`` a
    ``context`` argument is ignored, like every unconditional layer of the package does.

    Args:
        features: Number of dimensions ``D``.
        params_per_dim: Pseudo-parameters ``P`` produced per dimension.
        hidden_features: Width of each hidden layer (may be empty: a single masked linear map).
        order: ``"natural"``, ``"reversed"``, ``"random"`` (drawn from ``seed``) or an explicit
            permutation where ``order[j]`` is the position of input ``j``.
        context_features: Size of an optional conditioning vector.
        activation: Factory of the hidden nonlinearity.
        seed: Seed of the ``"random"`` order and of random hidden degrees.
        zero_init_output: Zero the output layer so flows start at the identity.
        random_degrees: Sample hidden degrees uniformly in ``[1, D - 1]`` instead of cyclically.
    """

    order: Tensor

    def __init__(
        self,
        features: int,
        params_per_dim: int,
        hidden_features: Sequence[int] = (64, 64),
        *,
        order: str | Sequence[int] | Tensor = "natural",
        context_features: int = 0,
        activation: Callable[[], nn.Module] = nn.ReLU,
        seed: int = 0,
        zero_init_output: bool = True,
        random_degrees: bool = False,
    ) -> None:
        super().__init__()
        if features < 1:
            raise ValueError(f"features must be >= 1, got {features}")
        if params_per_dim < 1:
            raise ValueError(f"params_per_dim must be >= 1, got {params_per_dim}")
        if context_features < 0:
            raise ValueError(f"context_features must be >= 0, got {context_features}")
        hidden = [int(h) for h in hidden_features]
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden widths must be >= 1, got {hidden}")
        self.features = features
        self.params_per_dim = params_per_dim
        self.context_features = context_features
        self.register_buffer("order", _resolve_order(order, features, seed))

        generator = torch.Generator().manual_seed(seed + 1)
        in_degrees = self.order + 1
        prev = in_degrees
        self.hidden = nn.ModuleList()
        self.context_layers = nn.ModuleList()
        self.activations = nn.ModuleList()
        for width in hidden:
            if features == 1:
                degrees = torch.zeros(width, dtype=torch.long)
            elif random_degrees:
                degrees = torch.randint(1, features, (width,), generator=generator)
            else:
                degrees = torch.arange(width) % (features - 1) + 1
            mask = degrees[:, None] >= prev[None, :]
            self.hidden.append(MaskedLinear(prev.numel(), width, mask))
            if context_features:
                # Bias lives in the masked layer; the context map only adds a linear term.
                self.context_layers.append(nn.Linear(context_features, width, bias=False))
            self.activations.append(activation())
            prev = degrees
        # Output unit ``i * P + p`` belongs to dimension ``i``, matching the [N, D, P] reshape.
        out_degrees = in_degrees.repeat_interleave(params_per_dim)
        self.output = MaskedLinear(
            prev.numel(), features * params_per_dim, out_degrees[:, None] > prev[None, :]
        )
        self.context_output = (
            nn.Linear(context_features, features * params_per_dim, bias=False)
            if context_features
            else None
        )
        if zero_init_output:
            nn.init.zeros_(self.output.weight)
            nn.init.zeros_(self.output.bias)
            if self.context_output is not None:
                nn.init.zeros_(self.context_output.weight)

    def _check(self, x: Tensor, context: Tensor | None) -> None:
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(f"MADE expects inputs [N, {self.features}], got {tuple(x.shape)}")
        if not self.context_features:
            return
        want = (x.shape[0], self.context_features)
        if context is None or tuple(context.shape) != want:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"MADE needs a context of shape {want}, got {got}")

    def _hidden_features(self, x: Tensor, context: Tensor | None) -> Tensor:
        self._check(x, context)
        h = x
        for i, (layer, act) in enumerate(zip(self.hidden, self.activations, strict=True)):
            h = layer(h)
            if self.context_features:
                h = h + self.context_layers[i](context)
            h = act(h)
        return h

    def forward_split(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, ...]:
        """The ``P`` pseudo-parameters as contiguous ``[N, D]`` tensors, ``forward(x)[..., p]``.

        The output layer runs once per parameter on its rows ``p::P``: the same products, but
        the elementwise maps after it read contiguous memory (on the strided ``[..., p]`` slices
        CPU kernels such as ``softplus`` run unvectorised, ~15× slower).
        """
        h = self._hidden_features(x, context)
        weight, bias, n = self.output.masked_weight, self.output.bias, self.params_per_dim
        outs = []
        for p in range(n):
            out = F.linear(h, weight[p::n], None if bias is None else bias[p::n])
            if self.context_output is not None:
                out = out + F.linear(context, self.context_output.weight[p::n])
            outs.append(out)
        return tuple(outs)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        """Return the pseudo-parameters ``[N, D, P]`` of ``x`` (``[N, D]``)."""
        h = self._hidden_features(x, context)
        out = self.output(h)
        if self.context_output is not None:
            out = out + self.context_output(context)
        return out.view(x.shape[0], self.features, self.params_per_dim)
