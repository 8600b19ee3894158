"""Invertible residual blocks (Behrmann et al. 2019, "Invertible Residual Networks"; Chen et al.
2019, "Residual Flows for Invertible Generative Modeling").

A block maps ``z = x + g(x)`` with ``Lip(g) < 1`` (``g`` built from the Lipschitz layers of
:mod:`hybridflow.nets.lipschitz`), so it is invertible by fixed-point iteration and

    log|det(I + J_g)| = sum_{k >= 1} (-1)^(k+1) / k · tr(J_g^k).

Log-det estimators, selected per block with ``logdet=``:

* ``"exact"``: brute-force Jacobian (D vector–Jacobian products) and ``slogdet``; small D only.
* ``"series"``: the power series truncated after ``n_terms`` terms with Hutchinson traces
  (i-ResNet; biased).
* ``"roulette"``: the unbiased Russian-roulette estimator (Residual Flows, Theorem 1): the first
  ``n_terms`` terms always, then ``K ~ Geometric(p)`` or ``Poisson(rate)`` more, each term ``k``
  reweighted by ``1 / P(N >= k)``.

Traces use Hutchinson probes ``v`` (Gaussian or Rademacher): ``tr(A) = E[vᵀ A v]``.

Gradients, selected with ``grad=``:

* ``"backprop"``: differentiate through every term of the series (memory grows with terms).
* ``"neumann"``: the Neumann-series gradient estimator (Residual Flows, Theorem 2),
  ``∂ log det(I + J) = E[ sum_{k=1}^{N} (-1)^(k+1) / P(N >= k) · vᵀ J^(k-1) (∂J) v ]``,
  obtained from one differentiable vector–Jacobian product whose left vector is built without
  a graph. With exact traces it is the gradient of the value estimate itself (a test checks
  it). The paper's statement of Theorem 2 and the reference code index one power further
  (``sum_{k=0}^{N} (-1)^k / P(N >= k) · vᵀ J^k (∂J) v``, using the ``vᵀ J^N`` the value computed
  anyway); both are unbiased, and ``benchmarks/neumann_variance.py`` measures that indexing's
  total gradient variance at 0.52× this one's on a shipped Residual Flow.

``memory_efficient=True`` computes the log-det gradient inside the forward pass (one block at a
time) and keeps only ``g``'s own graph, so peak memory does not grow with the number of terms
(Residual Flows §3.2). Unlike the reference code it stays exact when the upstream gradient of
the log-det differs between examples (per-example weights, importance weights, masks): the input
gradient is kept per example, and parameter gradients are recomputed from the stored probes in
that case.

More terms are used in eval mode (``eval_n_terms``); every estimator stays unbiased there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor, nn

from ..nets.amp import autocast_disabled
from .base import InvertibleModule, sum_except_batch

__all__ = ["InverseNotConvergedError", "InverseStats", "ResidualBlock", "check_block_options"]

LOGDET_ESTIMATORS = ("exact", "series", "roulette")
ROULETTE_DISTRIBUTIONS = ("geometric", "poisson")
PROBES = ("gaussian", "rademacher")
GRADIENTS = ("backprop", "neumann")


class InverseNotConvergedError(RuntimeError):
    """Raised by :meth:`ResidualBlock.inverse` when the fixed-point iteration does not converge
    and ``on_inverse_failure="raise"``."""


@dataclass
class InverseStats:
    """Outcome of the last fixed-point inverse: iterations used, last step and residual."""

    iterations: int
    converged: bool
    max_step: float
    max_residual: float


@dataclass
class _Draw:
    """The randomness of one log-det estimate: term weights and Hutchinson probes."""

    weights: list[float]  # weight of term k = 1..n (1 / P(N >= k))
    probes: list[Tensor]


_CHOICES = {
    "logdet": LOGDET_ESTIMATORS,
    "distribution": ROULETTE_DISTRIBUTIONS,
    "probe": PROBES,
    "grad": GRADIENTS,
    "on_inverse_failure": ("warn", "raise"),
}


def check_block_options(**options: object) -> None:
    """Validate any subset of :class:`ResidualBlock`'s estimator options (at construction, and
    when a built model is switched to other settings: :func:`~hybridflow.models.logdet_settings`).

    Raises:
        ValueError: A value outside its choices or range.
    """
    for key, choices in _CHOICES.items():
        if key in options and options[key] not in choices:
            raise ValueError(f"{key} must be one of {choices}, got {options[key]!r}")
    for key in ("n_terms", "eval_n_terms", "n_probes"):
        value = options.get(key)
        if key in options and (isinstance(value, bool) or not isinstance(value, Integral)):
            raise ValueError(f"{key} must be an integer, got {value!r}")  # 2.5 is not 2
        if key in options and value < 1:  # type: ignore[operator]
            raise ValueError(f"{key} must be >= 1, got {value}")
    if "memory_efficient" in options and not isinstance(options["memory_efficient"], bool):
        raise ValueError(
            f"memory_efficient must be True or False, got {options['memory_efficient']!r}"
        )
    if "geometric_p" in options and not 0 < options["geometric_p"] < 1:  # type: ignore[operator]
        raise ValueError(f"geometric_p must be in (0, 1), got {options['geometric_p']}")
    if "poisson_rate" in options and not options["poisson_rate"] > 0:  # type: ignore[operator]
        raise ValueError(f"poisson_rate must be > 0, got {options['poisson_rate']}")


def _check_contraction(net: nn.Module) -> None:
    """Refuse a branch whose declared Lipschitz bound (``lipschitz_bound`` of the Lipschitz nets)
    is not below 1: ``x + g(x)`` is then not invertible by fixed-point iteration and the log-det
    series need not converge (Behrmann et al. 2019, §2-3), so bits/dim would be silently wrong."""
    bounds = [m.lipschitz_bound for m in net.modules() if hasattr(m, "lipschitz_bound")]
    if bounds and not max(bounds) < 1:
        raise ValueError(
            f"the residual branch's Lipschitz bound is {max(bounds):.4g}, not < 1: a residual "
            "block is invertible and its log-det series converges only for a contraction; use "
            "a spectral-norm coefficient coeff in (0, 1)"
        )


class ResidualBlock(InvertibleModule):
    """``z = x + g(x)`` with a selectable log-det estimator and gradient mode.

    Args:
        net: The residual branch ``g``; must map a tensor to one of the same shape, act on each
            example independently and have Lipschitz constant < 1 (e.g.
            :class:`~hybridflow.nets.LipschitzConvNet`).
        logdet: ``"exact"``, ``"series"`` or ``"roulette"``.
        n_terms: Series: number of terms. Roulette: terms always computed before the random
            tail.
        eval_n_terms: The same in eval mode (more terms, lower variance).
        distribution: Roulette tail distribution, ``"poisson"`` or ``"geometric"``.
        poisson_rate: Rate of the Poisson tail.
        geometric_p: Success probability of the geometric tail (``P(K >= j) = (1-p)^j``).
        probe: Hutchinson probe distribution, ``"gaussian"`` or ``"rademacher"``.
        n_probes: Probes averaged per estimate.
        grad: ``"neumann"`` or ``"backprop"`` (ignored by ``"exact"``).
        memory_efficient: Compute the log-det gradient in the forward pass (series estimators).
        inverse_atol: Absolute tolerance of the fixed-point inverse (on every element's step).
        inverse_rtol: Relative tolerance of the fixed-point inverse.
        inverse_max_iter: Iteration cap of the fixed-point inverse.
        on_inverse_failure: ``"warn"`` or ``"raise"`` when the cap is reached.
    """

    def __init__(
        self,
        net: nn.Module,
        logdet: str = "roulette",
        n_terms: int = 2,
        eval_n_terms: int = 10,
        distribution: str = "poisson",
        poisson_rate: float = 2.0,
        geometric_p: float = 0.5,
        probe: str = "gaussian",
        n_probes: int = 1,
        grad: str = "neumann",
        memory_efficient: bool = True,
        inverse_atol: float = 1e-6,
        inverse_rtol: float = 1e-6,
        inverse_max_iter: int = 500,
        on_inverse_failure: str = "warn",
    ) -> None:
        super().__init__()
        check_block_options(
            logdet=logdet,
            n_terms=n_terms,
            eval_n_terms=eval_n_terms,
            distribution=distribution,
            poisson_rate=poisson_rate,
            geometric_p=geometric_p,
            probe=probe,
            n_probes=n_probes,
            grad=grad,
            memory_efficient=memory_efficient,
            on_inverse_failure=on_inverse_failure,
        )
        _check_contraction(net)
        self.net = net
        self.logdet_estimator = logdet
        self.n_terms, self.eval_n_terms = int(n_terms), int(eval_n_terms)
        self.distribution = distribution
        self.probe, self.n_probes = probe, int(n_probes)
        self.grad_mode = grad
        self.memory_efficient = memory_efficient
        self.inverse_atol, self.inverse_rtol = inverse_atol, inverse_rtol
        self.inverse_max_iter, self.on_inverse_failure = int(inverse_max_iter), on_inverse_failure
        # Buffers, not Parameters: they are never trained, and DDP rejects parameters that only
        # reach the loss through `.item()`.
        self.register_buffer("poisson_rate", torch.tensor(float(poisson_rate)))
        self.register_buffer("geometric_p", torch.tensor(float(geometric_p)))
        self.last_inverse: InverseStats | None = None

    def extra_repr(self) -> str:
        return (
            f"logdet={self.logdet_estimator}, n_terms={self.n_terms}, "
            f"eval_n_terms={self.eval_n_terms}, distribution={self.distribution}, "
            f"probe={self.probe}, grad={self.grad_mode}, memory_efficient={self.memory_efficient}"
        )

    # ---- randomness -------------------------------------------------------------------------

    def tail_survival(self, j: int) -> float:
        """``P(K >= j)`` of the roulette tail ``K``."""
        if j <= 0:
            return 1.0
        if self.distribution == "geometric":
            return (1.0 - float(self.geometric_p)) ** j
        rate = float(self.poisson_rate)
        cdf = sum(math.exp(-rate + i * math.log(rate) - math.lgamma(i + 1)) for i in range(j))
        return max(1.0 - cdf, 1e-300)

    def _sample_tail(self) -> int:
        if self.distribution == "geometric":
            p = float(self.geometric_p)
            u = float(torch.rand(()))
            return math.floor(math.log1p(-u) / math.log1p(-p))  # failures before a success
        return int(torch.poisson(self.poisson_rate.detach().cpu().double()).item())

    def _draw(self, x: Tensor) -> _Draw:
        n = self.n_terms if self.training else self.eval_n_terms
        if self.logdet_estimator == "roulette":
            tail = self._sample_tail()
            weights = [1.0] * n + [1.0 / self.tail_survival(j) for j in range(1, tail + 1)]
        else:
            weights = [1.0] * n
        probes = []
        for _ in range(self.n_probes):
            if self.probe == "gaussian":
                probes.append(torch.randn_like(x))
            else:
                probes.append(torch.randint_like(x, 0, 2) * 2 - 1)
        return _Draw(weights, probes)

    # ---- estimators -------------------------------------------------------------------------

    def _exact_logdet(self, g_x: Tensor, x: Tensor, create_graph: bool) -> Tensor:
        n, d = x.shape[0], x[0].numel()
        rows = []
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        for j in range(d):
            basis = eye[j].expand(n, d).reshape_as(x)
            (row,) = torch.autograd.grad(
                g_x, x, basis, retain_graph=True, create_graph=create_graph
            )
            rows.append(row.reshape(n, d))
        jac = torch.stack(rows, dim=1)  # [N, D_out, D_in] of g
        return torch.linalg.slogdet(jac + eye)[1]

    def _series(self, g_x: Tensor, x: Tensor, draw: _Draw, create_graph: bool) -> Tensor:
        """The (weighted) power series with Hutchinson traces; differentiable if asked."""
        total = x.new_zeros(x.shape[0])
        for v in draw.probes:
            w = v
            for k, weight in enumerate(draw.weights, start=1):
                (w,) = torch.autograd.grad(g_x, x, w, retain_graph=True, create_graph=create_graph)
                total = total + ((-1) ** (k + 1) * weight / k) * sum_except_batch(w * v)
        return total / len(draw.probes)

    def _neumann(self, g_x: Tensor, x: Tensor, draw: _Draw) -> tuple[Tensor, Tensor]:
        """Return ``(value, surrogate)``: the series value (no graph) and a per-example surrogate
        whose gradient is the Neumann-series estimate of the log-det gradient."""
        value = x.new_zeros(x.shape[0])
        surrogate = x.new_zeros(x.shape[0])
        n = len(draw.weights)
        for v in draw.probes:
            w = v
            left = draw.weights[0] * v  # sum_k (-1)^(k+1) c_k vᵀ J^(k-1), built without a graph
            for k in range(1, n + 1):
                (w,) = torch.autograd.grad(g_x, x, w, retain_graph=True)
                value = value + ((-1) ** (k + 1) * draw.weights[k - 1] / k) * sum_except_batch(
                    w * v
                )
                if k < n:
                    left = left + ((-1) ** k * draw.weights[k]) * w
            (left_j,) = torch.autograd.grad(g_x, x, left, retain_graph=True, create_graph=True)
            surrogate = surrogate + sum_except_batch(left_j * v)
        return value / len(draw.probes), surrogate / len(draw.probes)

    def _value_and_surrogate(self, g_x: Tensor, x: Tensor, draw: _Draw) -> tuple[Tensor, Tensor]:
        """Estimate with a graph: ``(value, s)`` where ``∂s`` estimates ``∂ log|det|``."""
        if self.grad_mode == "neumann":
            return self._neumann(g_x, x, draw)
        estimate = self._series(g_x, x, draw, create_graph=True)
        return estimate.detach(), estimate

    # ---- forward / inverse ------------------------------------------------------------------

    def _g(self, x: Tensor) -> Tensor:
        """The residual branch ``g(x)`` in ``x``'s dtype.

        Under bf16 autocast ``g`` (and every vector–Jacobian product through it) computes in
        bfloat16 while its weights are normalized in float32 (see
        :mod:`hybridflow.nets.lipschitz`); the cast makes the identity path ``x + g(x)``, the
        Hutchinson probes and every series accumulation float32. A no-op without autocast.
        """
        return self.net(x).to(x.dtype)

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"ResidualBlock expects batched inputs [N, ...], got {tuple(x.shape)}")

    # Eager under torch.compile: the log-det estimators differentiate through g twice
    # (create_graph=True vector-Jacobian products, the memory-efficient backward), which
    # aot_autograd cannot compile ("does not currently support double backward"), and the
    # roulette's term count is data-dependent. Outside torch.compile this is a plain call.
    @torch.compiler.disable
    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x)
        # One walk over g's modules per call (it was two: ~7% of a resflow-digits step), and
        # none without autograd (evaluation and sampling).
        grad_on = torch.is_grad_enabled()
        params = [p for p in self.net.parameters() if p.requires_grad] if grad_on else []
        needs_grad = grad_on and (x.requires_grad or bool(params))
        if self.logdet_estimator == "exact":
            with torch.enable_grad():
                x_in = x if x.requires_grad else x.detach().requires_grad_(True)
                g_x = self._g(x_in)
                logdet = self._exact_logdet(g_x, x_in, create_graph=needs_grad)
            if not needs_grad:
                return (x + g_x).detach(), logdet.detach()
            return x + g_x, logdet
        draw = self._draw(x)
        if not needs_grad:
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                g_x = self._g(x_in)
                logdet = self._series(g_x, x_in, draw, create_graph=False)
            return x + g_x.detach(), logdet.detach()
        if self.memory_efficient:
            return _MemoryEfficientLogDet.apply(self, draw, len(params), x, *params)
        x_in = x if x.requires_grad else x.detach().requires_grad_(True)
        g_x = self._g(x_in)
        value, surrogate = self._value_and_surrogate(g_x, x_in, draw)
        # The value carries the estimate; the surrogate carries the gradient.
        return x + g_x, value + (surrogate - surrogate.detach())

    def inverse(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        """Solve ``x + g(x) = z`` by the fixed-point iteration ``x ← z - g(x)``.

        Stops when every element's step is ≤ ``inverse_atol + inverse_rtol·|x|`` (the step
        itself, not its square). Converges geometrically at rate ``Lip(g)``. The iteration runs
        without a graph and with power iterations frozen (``g`` in eval mode), so it never
        changes state. Statistics of the last call are kept in :attr:`last_inverse`.

        With autograd on (and ``z`` or ``g``'s parameters requiring gradients) the result is
        differentiable by implicit differentiation, as in Deep Equilibrium Models (Bai et al.
        2019): ``dx = (I + J_g)⁻¹ (dz - ∂g/∂θ dθ)``, so the incoming gradient ``u`` is mapped to
        ``v = (I + J_g)⁻ᵀ u`` by the fixed-point iteration ``v ← u - J_gᵀ v`` (vector–Jacobian
        products at the solution, same tolerances, convergent since ``Lip(g) < 1``). The value
        is the fixed-point solution itself. Second derivatives through the inverse are not
        provided. Under ``no_grad`` (sampling) none of this runs.
        """
        self._check(z)
        needs_grad = torch.is_grad_enabled() and (
            z.requires_grad or any(p.requires_grad for p in self.net.parameters())
        )
        # In z's dtype even under autocast: a bf16 g is a quantized map, whose fixed-point
        # iteration stalls at bf16 resolution, far above the tolerances.
        with self._frozen(), autocast_disabled(z):
            with torch.no_grad():
                x = self._fixed_point(z)
            return self._attach_implicit_gradient(z, x) if needs_grad else x

    @contextmanager
    def _frozen(self) -> Iterator[None]:
        """Run ``g`` with power iterations frozen (eval mode): the map the inverse solves."""
        was_training = self.net.training
        self.net.eval()
        try:
            yield
        finally:
            self.net.train(was_training)

    def _converged(self, delta: Tensor, x: Tensor) -> bool:
        return bool((delta <= self.inverse_atol + self.inverse_rtol * x.abs()).all())

    def _not_converged(self, message: str) -> None:
        if self.on_inverse_failure == "raise":
            raise InverseNotConvergedError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _fixed_point(self, z: Tensor) -> Tensor:
        """The fixed-point solve of :meth:`inverse` (``g`` frozen); records :attr:`last_inverse`."""
        x = z - self.net(z)
        converged, step = False, float("inf")
        iterations = 1
        while iterations < self.inverse_max_iter:
            x_next = z - self.net(x)
            delta = (x_next - x).abs()
            x = x_next
            iterations += 1
            step = float(delta.max()) if delta.numel() else 0.0
            if self._converged(delta, x):
                converged = True
                break
        residual = float((x + self.net(x) - z).abs().max()) if z.numel() else 0.0
        self.last_inverse = InverseStats(iterations, converged, step, residual)
        if not converged:
            self._not_converged(
                f"fixed-point inverse did not converge in {iterations} iterations: last step "
                f"{step:.3g}, residual max|x + g(x) - z| = {residual:.3g} (atol "
                f"{self.inverse_atol:g}, rtol {self.inverse_rtol:g}); is Lip(g) < 1?"
            )
        return x

    def _attach_implicit_gradient(self, z: Tensor, x: Tensor) -> Tensor:
        """``x`` (same value) with DEQ implicit gradients to ``z`` and ``g``'s parameters."""
        x_in = x.detach().requires_grad_(True)
        g_x = self.net(x_in)
        h = z - g_x  # one more fixed-point step: the graph to z and θ

        def adjoint(u: Tensor) -> Tensor:
            # v = u - J_gᵀ v, i.e. v = (I + J_g)⁻ᵀ u; the graph of g_x is kept for reuse.
            v = u
            for _ in range(self.inverse_max_iter):
                (jv,) = torch.autograd.grad(g_x, x_in, v, retain_graph=True, allow_unused=True)
                v_next = u if jv is None else u - jv
                done = self._converged((v_next - v).abs(), v_next)
                v = v_next
                if done:
                    return v
            self._not_converged(
                f"implicit gradient of the fixed-point inverse did not converge in "
                f"{self.inverse_max_iter} iterations; is Lip(g) < 1?"
            )
            return v

        h.register_hook(adjoint)
        # Value exactly the fixed-point solution; gradient that of h, as mapped by the hook.
        return x + (h - h.detach())


class _MemoryEfficientLogDet(torch.autograd.Function):
    """``(x + g(x), log|det|)`` with the log-det gradient computed during the forward pass.

    Saved: ``g``'s graph (needed for the output path anyway), the per-example input gradient
    and the batch-summed parameter gradient of the log-det estimate. The series graph is freed
    before the next block runs. In backward, a uniform upstream gradient (a batch mean) scales
    the saved gradients; a non-uniform one recomputes the parameter gradient with the same
    probes and term weights, so per-example weighting stays exact.
    """

    @staticmethod
    def forward(ctx, block: ResidualBlock, draw: _Draw, n_params: int, x: Tensor, *params: Tensor):
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            g_x = block._g(x_in)
            value, surrogate = block._value_and_surrogate(g_x, x_in, draw)
            grads = torch.autograd.grad(
                surrogate.sum(), (x_in, *params), retain_graph=True, allow_unused=True
            )
        ctx.block, ctx.draw, ctx.params = block, draw, params
        ctx.x_in, ctx.g_x = x_in, g_x
        ctx.logdet_grads = grads
        return x + g_x.detach(), value.detach()

    @staticmethod
    def backward(ctx, grad_z: Tensor | None, grad_logdet: Tensor | None):
        x_in, g_x, params = ctx.x_in, ctx.g_x, ctx.params
        grad_x = torch.zeros_like(x_in) if grad_z is None else grad_z.clone()
        grad_params: list[Tensor | None] = [None] * len(params)
        if grad_logdet is not None and bool(grad_logdet.ne(0).any()):
            dx_saved, *dp_saved = ctx.logdet_grads
            weights = grad_logdet.reshape(-1, *([1] * (x_in.dim() - 1)))
            if dx_saved is not None:
                grad_x = grad_x + weights * dx_saved
            if bool(grad_logdet.eq(grad_logdet[0]).all()):
                scale = grad_logdet[0]
                grad_params = [None if g is None else scale * g for g in dp_saved]
            elif params:
                with torch.enable_grad():
                    _, surrogate = ctx.block._value_and_surrogate(g_x, x_in, ctx.draw)
                    grad_params = list(
                        torch.autograd.grad(
                            (surrogate * grad_logdet).sum(),
                            params,
                            retain_graph=True,
                            allow_unused=True,
                        )
                    )
        if grad_z is not None:
            out = torch.autograd.grad(g_x, (x_in, *params), grad_z, allow_unused=True)
            if out[0] is not None:
                grad_x = grad_x + out[0]
            grad_params = [
                b if a is None else (a if b is None else a + b)
                for a, b in zip(out[1:], grad_params, strict=True)
            ]
        ctx.g_x = ctx.x_in = ctx.logdet_grads = None  # free the graph
        return (None, None, None, grad_x, *grad_params)
