"""Vectorised bisection for elementwise increasing maps, differentiable by implicit gradients.

One routine inverts every elementwise monotone map of the package: the mixture-of-logistics CDF
of Flow++ couplings (Ho et al. 2019, "Flow++", §3.1) and the DSF/DDSF transformers of neural
autoregressive flows (Huang et al. 2018, "Neural Autoregressive Flows").

The root ``x*`` of ``f(x, θ) = y`` is found without a graph. When autograd is on, it is attached
to ``θ`` and ``y`` by the implicit function theorem, which for an elementwise map reads
``dx*/dy = 1 / f'(x*)`` and ``dx*/dθ = -(∂f/∂θ) / f'(x*)``: the map is evaluated once more at
``x*`` with the graph, and the output is ``x* + (r - r.detach())`` with the Newton step
``r = (y - f(x*, θ)) / f'(x*)`` (its slope detached). The value is exactly the bisection result
and the first derivatives are exact at the root; second derivatives through the inverse are not
provided (the slope is a constant to autograd).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["MonotoneMap", "implicit_root", "monotone_bisection"]

#: An elementwise strictly increasing map: its value, or ``(value, log d value / dx)``.
MonotoneMap = Callable[[Tensor], Tensor | tuple[Tensor, Tensor]]


def _value(out: Tensor | tuple[Tensor, Tensor]) -> Tensor:
    return out[0] if isinstance(out, tuple) else out


def _expand_bracket(
    below: Callable[[Tensor], Tensor], like: Tensor, max_expand: int
) -> tuple[Tensor, Tensor]:
    """Bracket every root: start at ``[-1, 1]``, push each failing side out by doubling steps."""
    lo, hi = -torch.ones_like(like), torch.ones_like(like)
    step = torch.ones_like(like)
    lo_ok, hi_ok = below(lo), ~below(hi)
    for _ in range(max_expand):
        if bool(lo_ok.all() and hi_ok.all()):
            break
        # The side that failed becomes the new opposite end: the root lies beyond it.
        hi = torch.where(lo_ok, hi, torch.minimum(hi, lo))
        lo = torch.where(lo_ok, lo, lo - step)
        lo = torch.where(hi_ok, lo, torch.maximum(lo, hi))
        hi = torch.where(hi_ok, hi, hi + step)
        step = 2.0 * step
        lo_ok, hi_ok = below(lo), ~below(hi)
    if not bool(lo_ok.all() and hi_ok.all()):
        raise RuntimeError(
            f"bisection could not bracket the root within ±2^{max_expand}: is the map onto ℝ?"
        )
    return lo, hi


def implicit_root(fn: MonotoneMap, x: Tensor, target: Tensor) -> Tensor:
    """Attach implicit first-order gradients to a root ``x`` of ``fn(x) = target``.

    Returns ``x`` itself under ``no_grad`` or when neither ``target`` nor the map's parameters
    need gradients; otherwise ``x + (r - r.detach())`` with ``r = (target - fn(x)) / fn'(x)``
    (value exactly ``x``; ``∂/∂target = 1/fn'`` and ``∂/∂θ = -(∂fn/∂θ)/fn'``, elementwise).
    Second derivatives through the result are not provided.

    Args:
        fn: Elementwise increasing map; if it returns only its value, the slope comes from
            autograd (one more evaluation).
        x: The root, any graph ignored.
        target: The targets (may carry a graph).

    Raises:
        ValueError: the map is not finite at the root.
    """
    x = x.detach()
    if not torch.is_grad_enabled():
        return x
    out = fn(x)
    y = _value(out)
    if not (y.requires_grad or target.requires_grad):
        return x
    if isinstance(out, tuple):
        inv_slope = torch.exp(-out[1].detach())
    else:
        x_in = x.clone().requires_grad_(True)
        (slope,) = torch.autograd.grad(fn(x_in).sum(), x_in)
        inv_slope = slope.reciprocal()
    # A map too flat for its inverse slope to be represented carries no usable gradient: give
    # those elements none rather than letting 0·∞ turn into NaN in the backward pass.
    inv_slope = torch.where(torch.isfinite(inv_slope), inv_slope, 0.0)
    step = (target - y) * inv_slope
    if not bool(torch.isfinite(step).all()):
        raise ValueError("the monotone map is not finite at the bisection solution")
    return x + (step - step.detach())


def monotone_bisection(
    fn: MonotoneMap,
    target: Tensor,
    tol: float = 1e-6,
    max_iter: int = 100,
    *,
    bracket: tuple[Tensor, Tensor] | None = None,
    search_fn: Callable[[Tensor], Tensor] | None = None,
    max_expand: int = 128,
    on_failure: str = "warn",
) -> Tensor:
    """Solve ``fn(x) = target`` elementwise for a strictly increasing elementwise ``fn``.

    The search runs without a graph. The bracket is ``bracket`` when given (e.g. the analytic
    mixture bracket of :func:`~hybridflow.transforms.mixlogistic.mixture_inverse_cdf`), else it
    starts at ``[-1, 1]`` and each side that does not yet contain the target is pushed out by
    doubling steps (``lo ← lo - 2^j``), at most ``max_expand`` times. Then at most ``max_iter``
    bisection steps halve the brackets until each one is ``≤ tol`` wide (absolute, in ``x``
    units) or its midpoint is no longer representable (the root is then known to machine
    precision). Every bracket is halved while any is still active; one host sync per step.

    With autograd on, the result is differentiable in ``target`` and in the map's parameters by
    implicit differentiation (see :func:`implicit_root`); second derivatives are not provided.

    Args:
        fn: Elementwise strictly increasing map, returning its value or ``(value, log slope)``;
            called on tensors of ``target``'s (broadcast) shape.
        target: Finite targets ``y``.
        tol: Absolute bracket width at which an element counts as solved.
        max_iter: Maximum bisection steps (bracket expansion is counted separately).
        bracket: Optional ``(lo, hi)`` known to contain every root; skips the expansion.
        search_fn: Optional cheaper value-only map for the search (``fn`` is then evaluated
            only at the solution, and only when gradients are needed).
        max_expand: Maximum doubling steps per side when bracketing.
        on_failure: ``"warn"`` (``RuntimeWarning``) or ``"raise"`` (``RuntimeError``) when the
            bisection cap is reached with a bracket wider than ``tol``.

    Returns:
        The bracket midpoints, of the broadcast shape of ``target`` and the map's output.

    Raises:
        ValueError: non-finite targets or bracket, or the map returned NaN.
        RuntimeError: no bracket within ``±2^max_expand``, or ``on_failure == "raise"`` and the
            bisection did not converge.
    """
    if on_failure not in ("warn", "raise"):
        raise ValueError(f"on_failure must be 'warn' or 'raise', got {on_failure!r}")
    if not bool(torch.isfinite(target).all()):
        raise ValueError("bisection targets must be finite")
    search = search_fn if search_fn is not None else (lambda t: _value(fn(t)))
    with torch.no_grad():
        target_ = target.detach()
        if bracket is None:

            def below(x: Tensor) -> Tensor:
                y = search(x)
                if bool(torch.isnan(y).any()):
                    raise ValueError("the monotone map returned NaN during bisection")
                return y < target_

            lo, hi = _expand_bracket(below, target_, max_expand)
        else:
            lo, hi = (b.detach() for b in bracket)
            if not bool(torch.isfinite(lo).all() and torch.isfinite(hi).all()):
                raise ValueError("the bisection bracket is not finite (targets too extreme?)")
        # The midpoint test only decides once a bracket is a few ulps wide; when tol is well
        # above the float spacing across every bracket, the width alone decides (fewer kernels).
        spacing = torch.finfo(lo.dtype).eps * torch.maximum(lo.abs(), hi.abs()).max()
        careful = bool(4 * spacing >= tol)
        # NaNs met during the search are collected without a sync and reported once at the end.
        nan_seen = torch.zeros((), dtype=torch.bool, device=lo.device)
        for _ in range(max_iter):
            mid = 0.5 * (lo + hi)
            active = (hi - lo) > tol
            if careful:
                active = active & (mid > lo) & (mid < hi)
            if not bool(active.any()):
                break
            y = search(mid)
            nan_seen = nan_seen | torch.isnan(y).any()
            # Updating finished brackets too costs nothing extra: a collapsed midpoint equals an
            # end, so its update is a no-op, and narrower-than-tol brackets only get tighter.
            go_right = y < target_
            lo = torch.where(go_right, mid, lo)
            hi = torch.where(go_right, hi, mid)
        if bool(nan_seen):
            raise ValueError("the monotone map returned NaN during bisection")
        mid = 0.5 * (lo + hi)
        unsolved = ((hi - lo) > tol) & (mid > lo) & (mid < hi)
        if bool(unsolved.any()):
            message = (
                f"bisection stopped after {max_iter} steps with {int(unsolved.sum())} brackets "
                f"wider than tol={tol} (widest {float((hi - lo).max()):.3g}); raise max_iter"
            )
            if on_failure == "raise":
                raise RuntimeError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    return implicit_root(fn, mid, target)
