"""Lipschitz-constrained linear and convolutional layers for invertible residual blocks.

One idea over 500 lines: normalizing a layer's operator norm (spectral and induced, linear and
convolutional, their power iterations and the branches built from them).

A residual block ``x + g(x)`` is invertible when ``Lip(g) < 1`` (Behrmann et al. 2019,
"Invertible Residual Networks"). With 1-Lipschitz activations, ``Lip(g)`` is bounded by the
product of the layers' operator norms, so each layer rescales its weight as

    W_hat = W / max(1, sigma / coeff),

where ``sigma`` is a power-iteration estimate of ``||W||`` (Miyato et al. 2018, "Spectral
Normalization for GANs"). Convolutions are normalized by the norm of the whole convolution
*operator* on a fixed input size, not of the reshaped kernel, and layers may also use induced
mixed norms ``||W||_{p→q}`` (Chen et al. 2019, "Residual Flows for Invertible Generative
Modeling", §4).

Power-iteration vectors are buffers, so they travel with ``state_dict``/``deepcopy``; they can
be stale whenever the weight changes outside an optimizer step (e.g. EMA copies or loaded
weights), which is what :func:`refresh_lipschitz_layers` is for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .activations import create_lipschitz_activation
from .amp import autocast_disabled

__all__ = [
    "InducedNormConv2d",
    "InducedNormLinear",
    "LipschitzConvNet",
    "LipschitzMLP",
    "NormOrder",
    "PowerIteration",
    "SpectralNormConv2d",
    "SpectralNormLinear",
    "lipschitz_layers",
    "refresh_lipschitz_layers",
]

_DEFAULT_ATOL = 1e-6
_DEFAULT_RTOL = 1e-6
# Iterations run at construction so a freshly built layer used in eval mode with
# ``eval_iterations=0`` already has a meaningful estimate. Fewer than torch's spectral_norm (15):
# conv operators iterate over whole feature maps, and at the paper's MNIST size 15 iterations
# made building the model take minutes; training steps keep iterating from here.
_INIT_ITERATIONS = 5


class NormOrder(nn.Module):
    """Order ``r > 1`` of an l_r norm, shareable between consecutive layers.

    Residual Flows (Chen et al. 2019, §4) chain ``||W_1||_{p_0→p_1} ||W_2||_{p_1→p_2} …``: the
    codomain of one layer is the domain of the next, so both must read the *same* order. Sharing
    one instance keeps them tied even when the order is learned.

    Args:
        init: Initial order, finite and > 1 (the dual maps need a finite conjugate exponent).
        learnable: Parametrize as ``1 + softplus(raw)`` and train it; otherwise a fixed buffer.
    """

    def __init__(self, init: float = 2.0, learnable: bool = False) -> None:
        super().__init__()
        if not (math.isfinite(init) and init > 1.0):
            raise ValueError(f"norm order must be finite and > 1, got {init}")
        self.learnable = bool(learnable)
        if self.learnable:
            # Inverse of softplus, written stably: y + log(1 - exp(-y)).
            y = float(init) - 1.0
            self.raw = nn.Parameter(torch.tensor(y + math.log(-math.expm1(-y))))
        else:
            self.register_buffer("order", torch.tensor(float(init)))

    def forward(self) -> Tensor:
        if self.learnable:
            return 1.0 + F.softplus(self.raw)
        return self.order

    def extra_repr(self) -> str:
        return f"order={float(self().detach()):.4g}, learnable={self.learnable}"


# (domain, codomain) orders of an induced-norm layer; None stands for the spectral norm.
_Orders = tuple[NormOrder, NormOrder]


def _lp_norm(x: Tensor, order: Tensor | None) -> Tensor:
    """``||x||_r`` over all elements, differentiable in ``x`` and ``r``; ``None`` is the 2-norm."""
    if order is None:
        return torch.linalg.vector_norm(x)
    a = x.abs()
    # Dividing by the (detached) max keeps |x|^r in range for large r; it is exact because the
    # norm is absolutely homogeneous, so value and gradients are unchanged.
    scale = a.detach().amax().clamp_min(torch.finfo(a.dtype).tiny)
    a = a / scale
    positive = a > 0
    # d/dr |x|^r = |x|^r log|x| is 0·(-inf) = nan at x = 0 unless zeros are masked out.
    powered = torch.where(positive, torch.where(positive, a, 1.0).pow(order), 0.0)
    return scale * powered.sum().pow(1.0 / order)


def _dual(y: Tensor, order: Tensor | None) -> Tensor:
    """``sign(y)|y|^{r-1} / ||y||_r^{r-1}``: unit vector in the dual norm with ``<·, y> = ||y||_r``.

    Zero input gives a zero output (callers keep their previous vector then).
    """
    tiny = torch.finfo(y.dtype).tiny
    if order is None:
        return y / torch.linalg.vector_norm(y).clamp_min(tiny)
    # The map is scale invariant; normalizing by the max first avoids overflow of |y|^{r-1}.
    a = y.abs()
    a = a / a.amax().clamp_min(tiny)
    return torch.sign(y) * a.pow(order - 1) / _lp_norm(a, order).pow(order - 1).clamp_min(tiny)


def _keep_if_degenerate(new: Tensor, old: Tensor) -> Tensor:
    # A zero (or non-finite) iterate would stick forever and silently switch normalization off
    # once the weight becomes nonzero again; keep the previous vector instead. torch.where
    # avoids a host sync per iteration.
    ok = torch.isfinite(new).all() & (new.abs().amax() > 0)
    return torch.where(ok, new, old)


def _unit_or_keep(y: Tensor, old: Tensor, order: Tensor | None = None) -> Tensor:
    """``_keep_if_degenerate(_dual(y, order), old)``: the next power-iteration vector.

    For the 2-norm (``order=None``, every spectrally normalized layer at every training step)
    the same result comes from the norm alone, which is finite and positive exactly when the
    unit vector is finite and nonzero: 5 ops instead of 10.
    """
    if order is not None:
        return _keep_if_degenerate(_dual(y, order), old)
    norm = torch.linalg.vector_norm(y)
    ok = torch.isfinite(norm) & (norm > 0)
    return torch.where(ok, y / norm.clamp_min(torch.finfo(y.dtype).tiny), old)


def _check_iterations(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0 or None (until converged), got {value}")


@dataclass(frozen=True)
class PowerIteration:
    """How a norm-constrained layer estimates ``sigma`` and bounds its weight.

    Every layer and residual branch of this module takes these fields as keywords and passes
    them on unchanged (``LipschitzMLP(4, 16, coeff=0.9, train_iterations=None)``), so they are
    defined, defaulted and validated here only.

    Attributes:
        coeff: Bound on the normalized operator norm (< 1 for invertible residual blocks).
        train_iterations: Power iterations per forward in training mode (``None``: converge).
        eval_iterations: Power iterations per forward in eval mode (0: use stored vectors).
        atol: Absolute tolerance on sigma for ``None`` iterations (default 1e-6).
        rtol: Relative tolerance on sigma for ``None`` iterations (default 1e-6).
        max_iterations: Cap for ``None`` iterations.
    """

    coeff: float = 0.98
    train_iterations: int | None = 1
    eval_iterations: int | None = 0
    atol: float | None = None
    rtol: float | None = None
    max_iterations: int = 500

    def __post_init__(self) -> None:
        # coeff < 1 is what makes a residual block invertible, but the layer itself is general.
        if not (math.isfinite(self.coeff) and self.coeff > 0):
            raise ValueError(f"coeff must be a positive finite number, got {self.coeff}")
        limit = self.max_iterations
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"max_iterations must be a positive int, got {limit}")
        _check_iterations("train_iterations", self.train_iterations)
        _check_iterations("eval_iterations", self.eval_iterations)
        if (self.atol is not None and self.atol < 0) or (self.rtol is not None and self.rtol < 0):
            raise ValueError(f"atol and rtol must be >= 0, got {self.atol}, {self.rtol}")


def _as_order(order: float | NormOrder) -> NormOrder:
    return order if isinstance(order, NormOrder) else NormOrder(float(order))


def _as_orders(domain: float | NormOrder, codomain: float | NormOrder) -> _Orders:
    return _as_order(domain), _as_order(codomain)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair[0], pair[1]


class _NormalizedLayer(nn.Module):
    """Shared power iteration and weight normalization; subclasses supply the operator.

    Subclasses register ``weight`` (and ``bias``) and call :meth:`_setup_normalization` with
    validated :class:`PowerIteration` options, then
    implement ``_matvec(v, weight) = W v`` and ``_rmatvec(u, weight) = Wᵀ u`` on single-example
    tensors shaped like the buffers ``v`` (domain) and ``u`` (codomain).

    ``domain``/``codomain`` are ``None`` for the spectral norm; otherwise :class:`NormOrder`
    modules and the generalized power iteration estimates ``||W||_{p→q}``. The options become
    plain attributes (``coeff``, ``train_iterations``, ...), so a built model can be
    reconfigured by assignment, e.g. ``layer.atol = None`` (None = default, resolved at use).
    """

    weight: Tensor
    u: Tensor
    v: Tensor
    domain: NormOrder | None
    codomain: NormOrder | None
    #: Induced-norm layers also take ``domain``/``codomain`` orders (default 2.0).
    _induced: ClassVar[bool] = False

    def _parse_options(self, options: dict[str, Any]) -> tuple[_Orders | None, PowerIteration]:
        """The one place a layer reads and validates its keyword options."""
        if not self._induced:
            return None, PowerIteration(**options)
        rest = dict(options)
        orders = _as_orders(rest.pop("domain", 2.0), rest.pop("codomain", 2.0))
        return orders, PowerIteration(**rest)

    def _setup_normalization(
        self,
        options: PowerIteration,
        orders: _Orders | None,
        u_shape: tuple[int, ...],
        v_shape: tuple[int, ...],
    ) -> None:
        self.coeff = float(options.coeff)
        self.train_iterations = options.train_iterations
        self.eval_iterations = options.eval_iterations
        self.atol = options.atol
        self.rtol = options.rtol
        self.max_iterations = options.max_iterations
        self.domain, self.codomain = (None, None) if orders is None else orders
        self.register_buffer("u", self.weight.new_empty(u_shape))
        self.register_buffer("v", self.weight.new_empty(v_shape))
        self._randomize_vectors()
        self._power_iteration(_INIT_ITERATIONS, 0.0, 0.0, self.max_iterations)

    @torch.no_grad()
    def _randomize_vectors(self) -> None:
        p, q = self._orders()
        # u has unit dual-codomain norm and v unit domain norm, the invariants of the iteration.
        self.u.copy_(_dual(torch.randn_like(self.u), q))
        self.v.copy_(_dual(torch.randn_like(self.v), None if p is None else p / (p - 1)))

    # --- operator hooks ---------------------------------------------------------------------

    def _matvec(self, v: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    def _rmatvec(self, u: Tensor, weight: Tensor) -> Tensor:
        raise NotImplementedError

    # --- normalization ----------------------------------------------------------------------

    def _orders(self) -> tuple[Tensor | None, Tensor | None]:
        if self.domain is None or self.codomain is None:
            return None, None
        dtype = self.weight.dtype
        return self.domain().to(dtype), self.codomain().to(dtype)

    def _sigma(self, weight: Tensor, u: Tensor, v: Tensor) -> Tensor:
        if self.domain is None:
            # uᵀWv with detached unit u, v has gradient u vᵀ, that of the top singular value
            # (Miyato et al. 2018, §2.1); stale vectors still give a lower bound on ||W||_2.
            return (u * self._matvec(v, weight)).sum()
        p, q = self._orders()
        # ||Wv||_q / ||v||_p is a valid lower bound for any v and is differentiable in W and in
        # learnable orders; dividing by ||v||_p matters once p has moved since v was normalized.
        return _lp_norm(self._matvec(v, weight), q) / _lp_norm(v, p)

    @torch.no_grad()
    def _power_iteration(
        self, iterations: int | None, atol: float, rtol: float, max_iterations: int
    ) -> None:
        """Run ``iterations`` steps (``None``: until sigma changes ≤ atol + rtol·sigma).

        Generalized power method for ``||W||_{p→q}`` (Higham 1992; Johnston 2016):
        ``v ← dual_{p*}(Wᵀ dual_q(W v))`` with ``1/p + 1/p* = 1``; for p = q = 2 it is the
        classical power iteration on ``WᵀW``. For p ≠ 2 or q ≠ 2 it converges to a local maximum,
        so sigma is a lower-bound estimate of the true induced norm.
        """
        weight = self.weight.detach()
        p, q = self._orders()
        p_dual = None if p is None else p / (p - 1)
        u, v = self.u, self.v
        steps = max_iterations if iterations is None else iterations
        previous = float(self._sigma(weight, u, v)) if iterations is None else 0.0
        for _ in range(steps):
            v = _unit_or_keep(self._rmatvec(u, weight), v, p_dual)
            u = _unit_or_keep(self._matvec(v, weight), u, q)
            if iterations is None:
                sigma = float(self._sigma(weight, u, v))
                if abs(sigma - previous) <= atol + rtol * abs(sigma):
                    break
                previous = sigma
        # In-place update of the buffers; forward passes only ever use clones of them, so
        # graphs built earlier (not yet backpropagated) are unaffected.
        self.u.copy_(u)
        self.v.copy_(v)

    def operator_norm(self) -> Tensor:
        """Current estimate of ``||W||`` from the stored vectors (differentiable in ``W``)."""
        return self._sigma(self.weight, self.u.clone(), self.v.clone())

    def normalized_weight(self) -> Tensor:
        """``W / max(1, sigma / coeff)`` using the stored vectors (no iteration)."""
        # Only shrink, never inflate: layers already inside the ball are left unchanged
        # (Behrmann et al. 2019, Alg. 1; Gouk et al. 2018).
        factor = torch.clamp(self.operator_norm() / self.coeff, min=1.0)
        return self.weight / factor

    @torch.no_grad()
    def refresh(
        self,
        atol: float = 1e-7,
        rtol: float = 1e-7,
        max_iterations: int = 2000,
        restarts: int = 0,
    ) -> float:
        """Run the power iteration to convergence now and return the new sigma.

        Args:
            atol: Stop when sigma changes by at most ``atol + rtol * sigma``.
            rtol: See ``atol``.
            max_iterations: Cap on iterations per run.
            restarts: Extra runs from random vectors, keeping the largest sigma. Useless for the
                2-norm; for p ≠ 2 or q ≠ 2 the iteration can stop at a local maximum well below
                the true norm, and restarts make that less likely (draws from the global RNG).
        """
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 0:
            raise ValueError(f"restarts must be an int >= 0, got {restarts}")
        self._power_iteration(None, atol, rtol, max_iterations)
        best = float(self.operator_norm())
        best_u, best_v = self.u.clone(), self.v.clone()
        for _ in range(restarts):
            self._randomize_vectors()
            self._power_iteration(None, atol, rtol, max_iterations)
            sigma = float(self.operator_norm())
            if sigma > best:
                best, best_u, best_v = sigma, self.u.clone(), self.v.clone()
        self.u.copy_(best_u)
        self.v.copy_(best_v)
        return best

    def _forward_weight(self) -> Tensor:
        # Under bf16 autocast only the layer's product with its input runs in bf16: sigma, the
        # power iteration and the normalization stay in the weight's dtype, so the bound
        # ||W_hat|| <= coeff that makes the residual block invertible is not rounded away.
        with autocast_disabled(self.weight):
            iterations = self.train_iterations if self.training else self.eval_iterations
            if iterations is None or iterations > 0:
                atol = _DEFAULT_ATOL if self.atol is None else self.atol
                rtol = _DEFAULT_RTOL if self.rtol is None else self.rtol
                self._power_iteration(iterations, atol, rtol, self.max_iterations)
            return self.normalized_weight()

    def _norm_repr(self) -> str:
        return (
            f"coeff={self.coeff}, train_iterations={self.train_iterations}, "
            f"eval_iterations={self.eval_iterations}"
        )


class _LinearBase(_NormalizedLayer):
    """A normalized linear layer; the public subclasses choose the norm."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, **options: Any
    ) -> None:
        super().__init__()
        orders, power = self._parse_options(options)
        if in_features < 1 or out_features < 1:
            raise ValueError(f"features must be positive, got {in_features}, {out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        self._setup_normalization(power, orders, (out_features,), (in_features,))

    def reset_parameters(self) -> None:
        """nn.Linear's default init; call :meth:`refresh` afterwards (vectors become stale)."""
        # Deliberately not zero: a residual branch g ≡ 0 would make the flow the identity.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def _matvec(self, v: Tensor, weight: Tensor) -> Tensor:
        return weight @ v

    def _rmatvec(self, u: Tensor, weight: Tensor) -> Tensor:
        return weight.t() @ u

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__} expects input of shape (..., {self.in_features}), "
                f"got {tuple(x.shape)}"
            )
        return F.linear(x, self._forward_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, {self._norm_repr()}"
        )


class SpectralNormLinear(_LinearBase):
    """Linear layer with ``||W_hat||_2 ≤ coeff`` (Miyato et al. 2018; Behrmann et al. 2019).

    Args:
        in_features: Input size.
        out_features: Output size.
        bias: Learn an additive bias (does not affect the Lipschitz constant).
        **options: :class:`PowerIteration` fields: ``coeff`` (default 0.98),
            ``train_iterations`` (1), ``eval_iterations`` (0), ``atol``, ``rtol`` (None: 1e-6)
            and ``max_iterations`` (500).
    """


class InducedNormLinear(_LinearBase):
    """Linear layer with ``||W_hat||_{p→q} ≤ coeff`` (Chen et al. 2019, "Residual Flows", §4).

    For p ≠ 2 or q ≠ 2 the generalized power method finds a local maximum, so sigma is a
    lower-bound estimate and the bound holds only approximately; for p = q = 2 it is the
    spectral norm.

    Args:
        Positional arguments: As in :class:`SpectralNormLinear`.
        **options: As in :class:`SpectralNormLinear`, plus ``domain``, the order p of the input
            norm (a float or a possibly shared :class:`NormOrder`; default 2.0), and
            ``codomain``, the order q of the output norm (likewise).
    """

    _induced = True


class _Conv2dBase(_NormalizedLayer):
    """A normalized convolution; the public subclasses choose the norm."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        input_size: tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | None = None,
        bias: bool = True,
        **options: Any,
    ) -> None:
        super().__init__()
        orders, power = self._parse_options(options)
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"channels must be positive, got {in_channels}, {out_channels}")
        kernel = _pair(kernel_size, "kernel_size")
        strides = _pair(stride, "stride")
        pad = (kernel[0] // 2, kernel[1] // 2) if padding is None else _pair(padding, "padding")
        size = _pair(input_size, "input_size")
        if min(kernel) < 1 or min(strides) < 1 or min(pad) < 0 or min(size) < 1:
            raise ValueError(
                f"invalid conv geometry: kernel={kernel}, stride={strides}, padding={pad}, "
                f"input_size={size}"
            )
        spans = [n + 2 * p - k for n, p, k in zip(size, pad, kernel, strict=True)]
        if min(spans) < 0:
            raise ValueError(f"kernel {kernel} larger than padded input {size} (padding {pad})")
        out_size = tuple(span // s + 1 for span, s in zip(spans, strides, strict=True))
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel
        self.stride = strides
        self.padding = pad
        self.input_size = size
        self.output_size: tuple[int, int] = (out_size[0], out_size[1])
        # For stride > 1 several input sizes map to the same output size; output_padding makes
        # conv_transpose2d (the adjoint) return exactly input_size so u and v shapes match.
        self.output_padding = (spans[0] % strides[0], spans[1] % strides[1])
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *kernel))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        self._setup_normalization(
            power, orders, (1, out_channels, *self.output_size), (1, in_channels, *size)
        )

    def reset_parameters(self) -> None:
        """nn.Conv2d's default init; call :meth:`refresh` afterwards (vectors become stale)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def _matvec(self, v: Tensor, weight: Tensor) -> Tensor:
        return F.conv2d(v, weight, None, self.stride, self.padding)

    def _rmatvec(self, u: Tensor, weight: Tensor) -> Tensor:
        return F.conv_transpose2d(u, weight, None, self.stride, self.padding, self.output_padding)

    def forward(self, x: Tensor) -> Tensor:
        expected = (self.in_channels, *self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{type(self).__name__} was built for inputs of shape (N, {expected[0]}, "
                f"{expected[1]}, {expected[2]}) (its operator norm depends on the spatial size), "
                f"got {tuple(x.shape)}"
            )
        return F.conv2d(x, self._forward_weight(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"input_size={self.input_size}, stride={self.stride}, padding={self.padding}, "
            f"bias={self.bias is not None}, {self._norm_repr()}"
        )


class SpectralNormConv2d(_Conv2dBase):
    """Conv2d whose operator on ``(in_channels, *input_size)`` inputs has 2-norm ≤ coeff.

    The norm is that of the whole (zero-padded, strided) convolution operator, estimated by power
    iteration with ``conv2d``/``conv_transpose2d`` (Gouk et al. 2018; Behrmann et al. 2019, §3);
    the reshaped-kernel norm of Miyato et al. 2018 is not a bound on it.

    Args:
        in_channels: Input channels.
        out_channels: Output channels.
        kernel_size: Kernel size.
        input_size: Spatial size ``(H, W)`` of the inputs; fixed so buffers have fixed shapes.
        stride: Stride.
        padding: Zero padding, default ``kernel_size // 2`` ("same" for odd kernels).
        bias: Learn an additive bias.
        **options: As in :class:`SpectralNormLinear`.
    """


class InducedNormConv2d(_Conv2dBase):
    """Conv2d with operator norm ``||·||_{p→q} ≤ coeff`` over whole feature maps (Chen et al. 2019).

    Norms are taken over all ``C·H·W`` entries of one example. For p ≠ 2 or q ≠ 2 sigma is a
    lower-bound (local maximum) estimate; see :class:`InducedNormLinear`.

    Args:
        Positional arguments: As in :class:`SpectralNormConv2d`.
        **options: As in :class:`InducedNormLinear` (``domain``, ``codomain`` and the
            :class:`PowerIteration` fields).
    """

    _induced = True


def refresh_lipschitz_layers(
    module: nn.Module,
    atol: float = 1e-7,
    rtol: float = 1e-7,
    max_iterations: int = 2000,
    restarts: int = 0,
) -> int:
    """Converge the power iteration of every normalized layer in ``module``; return how many.

    Call this on an EMA copy (or after loading/assigning weights) before evaluating or saving:
    copying weights does not update the copied power-iteration vectors, and stale vectors
    underestimate sigma, so the "normalized" layers can be far from contractive. ``restarts``
    is forwarded to :meth:`refresh` (only useful for induced p ≠ 2 / q ≠ 2 norms).
    """
    count = 0
    for layer in lipschitz_layers(module):
        layer.refresh(atol=atol, rtol=rtol, max_iterations=max_iterations, restarts=restarts)
        count += 1
    return count


def lipschitz_layers(module: nn.Module) -> Iterator[_NormalizedLayer]:
    """Yield every norm-constrained layer inside ``module`` (including itself), each once.

    Useful to reconfigure a built model, e.g. set ``train_iterations``/``eval_iterations``/
    ``atol``/``rtol`` on all layers.
    """
    for layer in module.modules():  # modules() visits shared layers once
        if isinstance(layer, _NormalizedLayer):
            yield layer


def _interface_orders(
    num_layers: int, norm: str, norm_ord: float, learnable_ord: bool
) -> list[NormOrder] | None:
    """Orders ``p_0, …, p_L`` between layers with ``p_L`` the same object as ``p_0``."""
    if norm == "spectral":
        return None
    if norm != "induced":
        raise ValueError(f"norm must be 'spectral' or 'induced', got {norm!r}")
    # The outer order is shared and fixed so g is contractive from one norm into the same norm,
    # which is what the Banach fixed-point inversion of x + g(x) needs (Chen et al. 2019, §4).
    outer = NormOrder(norm_ord, learnable=False)
    inner = [NormOrder(norm_ord, learnable=learnable_ord) for _ in range(num_layers - 1)]
    return [outer, *inner, outer]


def _build_branch(
    spectral: type[_NormalizedLayer],
    induced: type[_NormalizedLayer],
    layer_args: Sequence[tuple[Any, ...]],
    *,
    activation: str = "lipswish",
    preact: bool = True,
    norm: str = "spectral",
    norm_ord: float = 2.0,
    learnable_ord: bool = False,
    **options: Any,
) -> tuple[nn.Sequential, float]:
    """``[act] → layer → act → … → layer`` and its bound ``coeff ** len(layer_args)``.

    The one place the keywords of :class:`LipschitzMLP` and :class:`LipschitzConvNet` are
    defaulted; ``options`` (:class:`PowerIteration` fields) go to every layer unchanged.
    """
    num_layers = len(layer_args)
    orders = _interface_orders(num_layers, norm, norm_ord, learnable_ord)
    coeff = PowerIteration(**options).coeff  # fail before building anything
    # A fresh activation per position: LipSwish has its own learnable beta.
    modules: list[nn.Module] = [create_lipschitz_activation(activation)] if preact else []
    for i, args in enumerate(layer_args):
        if i > 0:
            modules.append(create_lipschitz_activation(activation))
        if orders is None:
            modules.append(spectral(*args, **options))
        else:
            modules.append(induced(*args, domain=orders[i], codomain=orders[i + 1], **options))
    return nn.Sequential(*modules), float(coeff) ** num_layers


class LipschitzMLP(nn.Module):
    """Residual branch ``g`` for vectors: ``[act] → Lin → act → … → Lin`` with ``Lip(g) < 1``.

    Every linear layer is normalized to ``coeff`` and every activation is 1-Lipschitz, so
    ``Lip(g) ≤ coeff^(num_hidden_layers + 1)`` (Behrmann et al. 2019; Chen et al. 2019, §4).
    Default (nonzero) init on purpose: the residual flow needs a nontrivial contraction.

    Args:
        features: Input and output size.
        hidden_features: Width of the hidden layers.
        num_hidden_layers: Number of hidden layers (linear layers = this + 1).
        **options: Keywords, all optional:

            - ``activation``: name from
              :data:`~hybridflow.nets.activations.LIPSCHITZ_ACTIVATIONS` (``"lipswish"``).
            - ``preact``: start with an activation (pre-activation residual branch; True).
            - ``norm``: ``"spectral"`` or ``"induced"`` (mixed l_p norms with shared orders).
            - ``norm_ord``: initial order of every interface norm when ``norm="induced"`` (2).
            - ``learnable_ord``: learn the inner interface orders (the outer one stays fixed).
            - :class:`PowerIteration` fields, passed to every layer: ``coeff`` (per-layer
              norm bound, 0.98), ``train_iterations``, ``eval_iterations``, ``atol``, ``rtol``,
              ``max_iterations``.
    """

    def __init__(
        self, features: int, hidden_features: int, num_hidden_layers: int = 2, **options: Any
    ) -> None:
        super().__init__()
        if num_hidden_layers < 0:
            raise ValueError(f"num_hidden_layers must be >= 0, got {num_hidden_layers}")
        widths = [features] + [hidden_features] * num_hidden_layers + [features]
        shapes = [(widths[i], widths[i + 1]) for i in range(len(widths) - 1)]
        self.net, self.lipschitz_bound = _build_branch(
            SpectralNormLinear, InducedNormLinear, shapes, **options
        )
        self.features = features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class LipschitzConvNet(nn.Module):
    """Residual branch ``g`` for images: ``[act] → conv → act → … → conv`` with ``Lip(g) < 1``.

    Channels go ``channels → hidden → … → hidden → channels`` with "same" padding, e.g. the
    3-1-3 kernels of i-ResNet / Residual Flows (Behrmann et al. 2019; Chen et al. 2019).
    ``Lip(g) ≤ coeff^len(kernel_sizes)`` on inputs of spatial size ``input_size``.

    Args:
        channels: Input and output channels.
        hidden_channels: Width of the hidden layers.
        input_size: Spatial size ``(H, W)`` of the inputs (the operator norms depend on it).
        kernel_sizes: Odd kernel size of each conv layer.
        **options: As in :class:`LipschitzMLP`.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int,
        input_size: tuple[int, int],
        kernel_sizes: tuple[int, ...] = (3, 1, 3),
        **options: Any,
    ) -> None:
        super().__init__()
        kernels = tuple(kernel_sizes)
        if not kernels or any(k < 1 or k % 2 == 0 for k in kernels):
            raise ValueError(f"kernel_sizes must be non-empty and odd ('same' pad), got {kernels}")
        widths = [channels] + [hidden_channels] * (len(kernels) - 1) + [channels]
        shapes = [(widths[i], widths[i + 1], k, input_size) for i, k in enumerate(kernels)]
        self.net, self.lipschitz_bound = _build_branch(
            SpectralNormConv2d, InducedNormConv2d, shapes, **options
        )
        self.channels = channels
        self.input_size = _pair(input_size, "input_size")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
