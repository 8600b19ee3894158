"""Neural autoregressive flows (Huang et al. 2018, "Neural Autoregressive Flows").

A NAF keeps the autoregressive structure of MAF (Papamakarios et al. 2017) but replaces the affine
transformer by a small monotone neural network whose weights ("pseudo-parameters") come from a
:class:`~hybridflow.nets.made.MADE` conditioner (Germain et al. 2015):

* **DSF** (deep sigmoidal flow, Huang et al. 2018 eq. 8): ``y = σ⁻¹(Σ_k w_k σ(a_k x + b_k))``
  with ``a_k > 0`` and ``w = softmax(·)``.
* **DDSF** (deep dense sigmoidal flow, eq. 9): ``L`` such layers with ``K`` hidden units each,
  densely connected, ``h' = σ⁻¹(w σ(a ⊙ (u h) + b))`` with positive, row-normalised ``u`` and
  ``w`` (softmax) and ``a = softplus(·) > 0``; the per-layer Jacobians are positive matrices and
  are chained in log space (a log-semiring matrix product, i.e. ``logsumexp`` over hidden units).

Numerics. Everything runs in log space: ``log S = logsumexp_k(log w_k + log σ(C_k))`` and
``log(1 - S) = logsumexp_k(log w_k + log σ(-C_k))`` are both computed directly, so
``σ⁻¹(S) = log S - log(1 - S)`` is finite for *every* finite input, even where ``S`` rounds to 0
or 1, and grows linearly (slope ``≥ min_k a_k``) in the tails. The paper's mollifier
``σ⁻¹((1 - δ) S + δ/2)`` is therefore not needed for finiteness, and it would be harmful here: it
bounds the output to ``|y| < log(2/δ)`` (≈ 14.5 for ``δ = 1e-6``), so the map is no longer onto
``ℝ``, tail targets have no inverse and the map is flat in floating point beyond that range.
Instead ``δ`` enters as a linear leak, ``y = σ⁻¹(S) + δ·x``: it bounds the slope below by ``δ``,
which keeps the map strictly increasing in floating point even where every sigmoid saturates (e.g.
between two very steep, far-apart units), and keeps it onto ``ℝ``.

Packing of ``params`` (last dimension; ``K`` = ``num_units``; matrices are row-major):

* DSF, ``3K`` values: ``[a_raw (K) | b (K) | w_logits (K)]``; ``a = softplus(a_raw) + A_MIN``.
* DDSF, layers ``l = 1..L`` concatenated; layer ``l`` maps ``d_in`` to ``d_out`` features
  (``d_in = 1`` for ``l = 1`` else ``K``; ``d_out = 1`` for ``l = L`` else ``K``) and holds
  ``[a_raw (K) | b (K) | u_logits (K × d_in, only if d_in > 1) | w_logits (d_out × K)]``.
  ``u_logits`` rows are normalised over the ``d_in`` inputs, ``w_logits`` rows over the ``K``
  units. The first layer has no ``u`` (a softmax over one input is identically 1), so a one-layer
  DDSF is exactly a DSF and ``ddsf_num_params(K, 1) == dsf_num_params(K)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nets.made import MADE
from .base import InvertibleModule, sum_except_batch
from .bisection import monotone_bisection
from .coupling import MaskedCoupling, NetFactory, _default_factory

__all__ = [
    "A_MIN",
    "NAFCoupling",
    "NeuralAutoregressiveFlow",
    "ddsf_num_params",
    "ddsf_transform",
    "dsf_num_params",
    "dsf_transform",
    "monotone_bisection",
]

# Floor on the sigmoid pre-scales a_k: keeps the tail slope of σ⁻¹(S) away from 0 so that
# bisection brackets stay small and log-derivatives stay bounded below.
A_MIN = 1e-3
# a_raw giving a = 1 exactly: softplus⁻¹(1 - A_MIN) (used by the init offsets, see below).
_A_RAW_ONE = math.log(math.expm1(1.0 - A_MIN))


def dsf_num_params(num_units: int) -> int:
    """Pseudo-parameters per dimension of a DSF with ``num_units`` sigmoids: ``3K``."""
    if num_units < 1:
        raise ValueError(f"num_units must be >= 1, got {num_units}")
    return 3 * num_units


def _ddsf_layer_sizes(num_units: int, num_layers: int) -> list[tuple[int, int]]:
    """``(d_in, d_out)`` of every DDSF layer."""
    if num_units < 1:
        raise ValueError(f"num_units must be >= 1, got {num_units}")
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    k = num_units
    return [(1 if i == 0 else k, 1 if i == num_layers - 1 else k) for i in range(num_layers)]


def _ddsf_layer_params(num_units: int, d_in: int, d_out: int) -> int:
    return 2 * num_units + (num_units * d_in if d_in > 1 else 0) + d_out * num_units


def ddsf_num_params(num_units: int, num_layers: int) -> int:
    """Pseudo-parameters per dimension of a DDSF: ``2LK + 2(L-1)K² + K`` (``3K`` for ``L = 1``)."""
    return sum(
        _ddsf_layer_params(num_units, i, o) for i, o in _ddsf_layer_sizes(num_units, num_layers)
    )


def _check_delta(delta: float) -> None:
    if not (delta >= 0.0 and math.isfinite(delta)):
        raise ValueError(f"delta must be a finite number >= 0, got {delta}")


def _leak(x: Tensor, core: Tensor, log_dcore: Tensor, delta: float) -> tuple[Tensor, Tensor]:
    """Add the linear leak ``δ·x``: ``y = core + δ x``, ``log y' = logaddexp(log core', log δ)``."""
    if delta == 0.0:
        return core, log_dcore
    return core + delta * x, torch.logaddexp(log_dcore, log_dcore.new_tensor(math.log(delta)))


def _log_sigmoid(c: Tensor) -> Tensor:
    """``log σ(c) = -softplus(-c)``, exact to rounding for every finite ``c``.

    ``F.logsigmoid`` and ``F.log_softmax`` are avoided on purpose: on CPU they run a threaded
    kernel even for tiny tensors, which costs milliseconds per call on a busy machine, and the
    bisection calls the transformer hundreds of times. The softplus threshold is raised from 20
    to 40 because ``softplus(t) = t`` is only exact to rounding once ``e^{-t} < 2^{-53}``.
    """
    return -F.softplus(-c, threshold=40.0)


def _log_softmax(logits: Tensor) -> Tensor:
    return logits - torch.logsumexp(logits, dim=-1, keepdim=True)


def _positive_scale(a_raw: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, log a)`` with ``a = softplus(a_raw) + A_MIN``."""
    a = F.softplus(a_raw) + A_MIN
    return a, a.log()


def dsf_transform(x: Tensor, params: Tensor, delta: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Deep sigmoidal flow transformer (Huang et al. 2018, eq. 8), elementwise.

    ``y = σ⁻¹(Σ_k w_k σ(a_k x + b_k)) + δ·x`` computed in log space (see the module docstring).

    Args:
        x: Inputs, shape ``[...]``.
        params: ``[..., 3K]`` packed as ``[a_raw | b | w_logits]``; leading dims must broadcast
            with ``x``.
        delta: Linear leak ``δ ≥ 0``; the slope is ``≥ δ`` everywhere.

    Returns:
        ``(y, log dy/dx)``, both of the broadcast shape of ``x`` and ``params[..., 0]``.
    """
    _check_delta(delta)
    if params.dim() < 1 or params.shape[-1] < 3 or params.shape[-1] % 3:
        raise ValueError(
            f"DSF params need a last dimension 3K (K >= 1), got shape {tuple(params.shape)}"
        )
    a_raw, b, w_logits = params.chunk(3, dim=-1)
    a, log_a = _positive_scale(a_raw)
    c = a * x.unsqueeze(-1) + b
    log_w = _log_softmax(w_logits)
    log_sig, log_sig_neg = _log_sigmoid(c), _log_sigmoid(-c)
    log_s = torch.logsumexp(log_w + log_sig, dim=-1)
    log_1ms = torch.logsumexp(log_w + log_sig_neg, dim=-1)
    # dS/dx = Σ_k w_k a_k σ(C_k) σ(-C_k); d σ⁻¹(S)/dS = 1 / (S (1 - S)).
    log_ds = torch.logsumexp(log_w + log_a + log_sig + log_sig_neg, dim=-1)
    x = x.expand_as(log_s)
    return _leak(x, log_s - log_1ms, log_ds - log_s - log_1ms, delta)


def ddsf_transform(
    x: Tensor, params: Tensor, num_units: int, num_layers: int, delta: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Deep dense sigmoidal flow transformer (Huang et al. 2018, eq. 9), elementwise.

    Layer ``l`` maps ``h ∈ ℝ^{d_in}`` to ``h' = σ⁻¹(w σ(a ⊙ (u h) + b)) ∈ ℝ^{d_out}``; a final
    linear leak ``δ·x`` is added to the scalar output. The log-Jacobian of each layer,
    ``log J_ij = log Σ_k w_ik a_k σ'(C_k) u_kj - log S_i - log(1 - S_i)``, is a positive matrix
    chained to the previous ones by a log-space matrix product.

    Args:
        x: Inputs, shape ``[...]``.
        params: ``[..., ddsf_num_params(K, L)]`` packed as in the module docstring.
        num_units: Hidden sigmoid units ``K`` per layer.
        num_layers: Number of sigmoidal layers ``L``.
        delta: Linear leak ``δ ≥ 0``.

    Returns:
        ``(y, log dy/dx)``, both of the broadcast shape of ``x`` and ``params[..., 0]``.
    """
    _check_delta(delta)
    sizes = _ddsf_layer_sizes(num_units, num_layers)
    want = ddsf_num_params(num_units, num_layers)
    if params.dim() < 1 or params.shape[-1] != want:
        raise ValueError(
            f"DDSF(K={num_units}, L={num_layers}) needs params [..., {want}], "
            f"got {tuple(params.shape)}"
        )
    k = num_units
    lead = torch.broadcast_shapes(x.shape, params.shape[:-1])
    h = x.expand(lead).unsqueeze(-1)  # [..., d_in]
    log_jac = torch.zeros_like(h).unsqueeze(-1)  # log dh/dx, [..., d, 1]
    start = 0
    for d_in, d_out in sizes:
        a_raw = params[..., start : start + k]
        b = params[..., start + k : start + 2 * k]
        start += 2 * k
        a, log_a = _positive_scale(a_raw)
        if d_in > 1:
            u_logits = params[..., start : start + k * d_in].unflatten(-1, (k, d_in))
            start += k * d_in
            log_u = _log_softmax(u_logits)  # [..., K, d_in]
            pre = (log_u.exp() * h.unsqueeze(-2)).sum(-1)
        else:
            log_u = params.new_zeros(()).expand(*lead, k, 1)
            pre = h.expand(*lead, k)
        w_logits = params[..., start : start + d_out * k].unflatten(-1, (d_out, k))
        start += d_out * k
        log_w = _log_softmax(w_logits)  # [..., d_out, K]
        c = a * pre + b
        log_sig, log_sig_neg = _log_sigmoid(c), _log_sigmoid(-c)
        log_s = torch.logsumexp(log_w + log_sig.unsqueeze(-2), dim=-1)  # [..., d_out]
        log_1ms = torch.logsumexp(log_w + log_sig_neg.unsqueeze(-2), dim=-1)
        h = log_s - log_1ms
        # log of a_k σ'(C_k) u_kj, [..., K, d_in], then mixed by w over k: [..., d_out, d_in].
        log_inner = (log_a + log_sig + log_sig_neg).unsqueeze(-1) + log_u
        log_layer = torch.logsumexp(log_w.unsqueeze(-1) + log_inner.unsqueeze(-3), dim=-2)
        log_layer = log_layer - (log_s + log_1ms).unsqueeze(-1)
        # Log-semiring product: log(J_layer @ J_prev), summing over the d_in axis.
        log_jac = torch.logsumexp(log_layer.unsqueeze(-1) + log_jac.unsqueeze(-3), dim=-2)
    return _leak(x.expand(lead), h[..., 0], log_jac[..., 0, 0], delta)


def _init_offsets(transformer: str, num_units: int, num_layers: int) -> Tensor:
    """Fixed offsets added to the conditioner output (which starts at zero).

    A zero conditioner output would make all ``K`` units identical, and identical units get
    identical gradients forever (the zero output layer cannot break the tie). The offsets set
    ``a = 1``, spread the biases ``b`` over ``[-1, 1]`` and, in DDSF hidden layers, give output
    ``i`` a mixing row peaked at unit ``i`` (logits ``-|i - k|``), so every unit is distinct while
    the map stays close to the identity (DSF ``σ⁻¹(mean_k σ(x + b_k))``: slope 1 in the tails and
    ≈ 0.9 at the origin; DDSF composes such layers, ≈ 0.88 for ``L = 2`` and ≈ 0.77 for ``L = 3``
    at ``K = 8`` and ``K = 4``).
    """
    k = num_units
    b = torch.linspace(-1.0, 1.0, k) if k > 1 else torch.zeros(1)
    a = torch.full((k,), _A_RAW_ONE)
    if transformer == "dsf":
        return torch.cat([a, b, torch.zeros(k)])
    parts = []
    for d_in, d_out in _ddsf_layer_sizes(k, num_layers):
        parts += [a, b]
        if d_in > 1:
            parts.append(torch.zeros(k * d_in))
        if d_out > 1:
            idx = torch.arange(k, dtype=torch.get_default_dtype())
            parts.append(-(idx[:, None] - idx[None, :]).abs().flatten())
        else:
            parts.append(torch.zeros(k))
    return torch.cat(parts)


class _Transformer(nn.Module):
    """Shared DSF/DDSF choice, parameter count, init offsets and elementwise map."""

    def __init__(self, transformer: str, num_units: int, num_layers: int, delta: float) -> None:
        super().__init__()
        if transformer not in ("dsf", "ddsf"):
            raise ValueError(f"transformer must be 'dsf' or 'ddsf', got {transformer!r}")
        _check_delta(delta)
        self.transformer, self.num_units, self.num_layers, self.delta = (
            transformer,
            num_units,
            num_layers,
            delta,
        )
        self.num_params = (
            dsf_num_params(num_units)
            if transformer == "dsf"
            else ddsf_num_params(num_units, num_layers)
        )
        self.register_buffer("offset", _init_offsets(transformer, num_units, num_layers))

    def forward(self, x: Tensor, raw: Tensor) -> tuple[Tensor, Tensor]:
        params = raw + self.offset
        if self.transformer == "dsf":
            return dsf_transform(x, params, self.delta)
        return ddsf_transform(x, params, self.num_units, self.num_layers, self.delta)


class NeuralAutoregressiveFlow(InvertibleModule):
    """Neural autoregressive flow on vectors (Huang et al. 2018), density direction.

    ``z_i = τ(x_i; θ_i(x_<i))`` with a DSF or DDSF transformer ``τ`` whose pseudo-parameters
    ``θ_i`` come from one MADE pass; ``log|det dz/dx| = Σ_i log τ'(x_i)`` (triangular Jacobian).
    :meth:`inverse` needs ``D`` sequential MADE passes, each solving the next coordinate in the
    autoregressive order by :func:`monotone_bisection`. With autograd on it is differentiable in
    ``z``, the context and the MADE weights by implicit differentiation (first derivatives only),
    so the IAF-style variant (cheap sampling) ``Inverse(NeuralAutoregressiveFlow(...))`` trains.

    Initialisation: the MADE output layer is zero, so ``θ`` equals fixed offsets (see
    :func:`_init_offsets`): every ``τ`` starts as ``σ⁻¹(mean_k σ(x + b_k))`` with ``b`` spread
    over ``[-1, 1]`` (DSF; DDSF is built from such layers), slope in ``[≈0.8, 1]``, i.e. close to
    the identity and well conditioned, but with distinct units so training can separate them.

    Args:
        features: Dimension ``D``.
        transformer: ``"dsf"`` or ``"ddsf"``.
        num_units: Sigmoid units ``K`` (per layer for DDSF).
        num_layers: DDSF layers ``L`` (ignored for DSF).
        hidden_features: Hidden widths of the MADE.
        order: Autoregressive order of the MADE (``"natural"``, ``"reversed"``, ``"random"`` or a
            permutation).
        context_features: Size of an optional conditioning vector (0: unconditional).
        seed: MADE seed (random order / degrees).
        delta: Linear leak of the transformer (slope ``≥ δ``).
        inverse_tol: Bisection tolerance (absolute, in ``x`` units) of :meth:`inverse`.
        inverse_max_iter: Maximum bisection steps per coordinate.
    """

    def __init__(
        self,
        features: int,
        transformer: str = "dsf",
        num_units: int = 8,
        num_layers: int = 2,
        hidden_features: Sequence[int] = (64, 64),
        *,
        order: str | Sequence[int] | Tensor = "natural",
        context_features: int = 0,
        seed: int = 0,
        delta: float = 1e-6,
        inverse_tol: float = 1e-6,
        inverse_max_iter: int = 100,
    ) -> None:
        super().__init__()
        self.tau = _Transformer(transformer, num_units, num_layers, delta)
        self.features = features
        self.context_features = context_features
        self.inverse_tol, self.inverse_max_iter = inverse_tol, inverse_max_iter
        self.made = MADE(
            features,
            self.tau.num_params,
            hidden_features,
            order=order,
            context_features=context_features,
            seed=seed,
            zero_init_output=True,
        )

    def _check(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.features:
            raise ValueError(
                f"NeuralAutoregressiveFlow expects [N, {self.features}], got {tuple(x.shape)}"
            )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        # The MADE may run in bf16 under autocast; its output enters the flow in x's dtype.
        z, log_d = self.tau(x, self.made(x, context).to(x.dtype))
        return z, log_d.sum(dim=1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(z)
        x = torch.zeros_like(z)
        columns = torch.arange(self.features, device=z.device)
        # Column solved at each position of the autoregressive order (no host sync per step).
        solve_order = torch.argsort(self.made.order)
        for position in range(self.features):
            j = solve_order[position : position + 1]
            # θ of the coordinate at this position depends only on already-solved coordinates.
            raw = self.made(x, context)[:, j].to(z.dtype)
            x_j = monotone_bisection(
                lambda t, raw=raw: self.tau(t, raw),
                z[:, j],
                tol=self.inverse_tol,
                max_iter=self.inverse_max_iter,
            )
            # Out of place: earlier MADE passes saved x for backward, and x_j carries the
            # implicit gradient through θ(x_<j), which chains into the exact triangular solve.
            x = torch.where(columns == j, x_j, x)
        return x


class NAFCoupling(MaskedCoupling):
    """Coupling layer with an elementwise DSF transformer (Huang et al. 2018, §3; Dinh et al. 2017).

    The transformed part goes through ``z = DSF(x; θ(x_kept))``; the conditioner output has
    ``3K`` channels per transformed channel, reshaped to ``[..., 3K]`` in the DSF packing.
    Masking follows :class:`~hybridflow.transforms.mixlogistic.MixLogisticCoupling` exactly. The
    conditioner's last layer starts at zero, so at init ``θ`` equals the offsets of
    :class:`NeuralAutoregressiveFlow` (near-identity, distinct units). :meth:`inverse` solves all
    transformed elements in one vectorised bisection, differentiable by implicit differentiation.

    Args:
        num_channels: Channels ``C`` of the input (features for vector inputs).
        num_units: Sigmoid units ``K``.
        mask: ``"checkerboard"`` (images) or ``"channel"`` (splits dimension 1 in halves).
        parity: 0 or 1, which half is kept.
        net_factory: ``(in_channels, out_channels) -> nn.Module``; defaults as in AffineCoupling.
        spatial: Whether inputs are images (``True``) or vectors (``False``).
        delta: Linear leak of the DSF (slope ``≥ δ``).
        inverse_tol: Bisection tolerance (absolute) of :meth:`inverse`.
        inverse_max_iter: Maximum bisection steps of :meth:`inverse`.
        context_channels: Channels of a conditioning input (0: unconditional).
        checkerboard_layout: ``"gathered"`` or ``"masked"``, see
            :class:`~hybridflow.transforms.coupling.MaskedCoupling`.
    """

    def __init__(
        self,
        num_channels: int,
        num_units: int = 8,
        mask: str = "checkerboard",
        parity: int = 0,
        net_factory: NetFactory | None = None,
        *,
        spatial: bool = True,
        delta: float = 1e-6,
        inverse_tol: float = 1e-6,
        inverse_max_iter: int = 100,
        context_channels: int = 0,
        checkerboard_layout: str = "gathered",
    ) -> None:
        super().__init__(num_channels, mask, parity, spatial, context_channels, checkerboard_layout)
        self.tau = _Transformer("dsf", num_units, 1, delta)
        self.num_units = num_units
        self.inverse_tol, self.inverse_max_iter = inverse_tol, inverse_max_iter
        factory = net_factory or _default_factory(spatial)
        c_in, c_out = self._conditioner_channels()
        self.c_out = c_out
        self.net = factory(c_in, c_out * self.tau.num_params)

    def _raw(self, inp: Tensor, context: Tensor | None) -> Tensor:
        """Conditioner output ``[N, c, ..., 3K]`` (parameter axis last)."""
        out = self._conditioner(inp, context)
        return out.reshape(out.shape[0], self.c_out, self.tau.num_params, *out.shape[2:]).movedim(
            2, -1
        )

    def _solve(self, y: Tensor, raw: Tensor) -> Tensor:
        return monotone_bisection(
            lambda t: self.tau(t, raw), y, tol=self.inverse_tol, max_iter=self.inverse_max_iter
        )

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        context = self._context_for(x, context)
        if self.masked:
            m, inp = self._mask_input(x)
            y, ld = self.tau(x, self._raw(inp, context))
            # Kept sites pass through and contribute nothing to log|det J|.
            return x * m + (1 - m) * y, sum_except_batch(ld * (1 - m))
        kept, moved = self._split(x)
        y, ld = self.tau(moved, self._raw(kept, context))
        return self._merge(kept, y), sum_except_batch(ld)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        self._check(z)
        context = self._context_for(z, context)
        if self.masked:
            m, inp = self._mask_input(z)
            x = self._solve(z, self._raw(inp, context))
            return z * m + (1 - m) * x
        kept, moved = self._split(z)
        return self._merge(kept, self._solve(moved, self._raw(kept, context)))
