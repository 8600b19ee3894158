"""LipSwish with fused first and second derivatives, for residual flows' log-det estimators.

A Residual Flow's training step differentiates through vector–Jacobian products of its branch
(Chen et al. 2019, "Residual Flows for Invertible Generative Modeling", §3: the power series and
the Neumann gradient), so LipSwish ``f(x) = x·σ(βx)/1.1`` is differentiated twice. Left to
autograd, ``silu``'s double backward is a dozen elementwise kernels, each one pass over a
``[N, C, H, W]`` map: on 2 CPU cores they took half of a ``resflow-cpu`` step
(``benchmarks/resflow_cpu_step.py``). Here both derivatives are written out by hand,

    f_x = (σ + t σ') / 1.1,  f_β = x² σ' / 1.1,  f_xx = β h,  f_xβ = x h,  f_ββ = x³ σ'' / 1.1,

with ``t = βx``, ``σ' = σ(1 - σ)``, ``σ'' = σ'(1 - 2σ)`` and ``h = (2σ' + t σ'') / 1.1``, and each
derivative is one kernel compiled by ``torch.compile`` (TorchInductor; the first step of a
process compiles them, ~20 s on 2 CPU cores, later processes read Inductor's cache). Where
compiling fails (no C++ toolchain) the same formulas run as eager ops after one warning.
The path is on by default (since issue 25: a ``resflow-cpu`` training step takes 0.68× the
time); ``HYBRIDFLOW_FUSED_KERNELS=0`` in the environment, or :func:`set_fused_kernels`, turns it
off (the derivatives round differently from autograd's, so trained numbers differ within seed
noise). Off, or for maps smaller than :data:`MIN_FUSED_NUMEL` elements or dtypes other than
float32 and bfloat16, :class:`~hybridflow.nets.LipSwish` differentiates ``silu`` with autograd.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd import Function

__all__ = [
    "MIN_FUSED_NUMEL",
    "SWISH_LIPSCHITZ",
    "LipSwishFunction",
    "fused_kernels_enabled",
    "lipswish_vjp",
    "lipswish_vjp_backward",
    "set_fused_kernels",
    "use_fused_lipswish",
]

# sup_z d/dz [z·sigmoid(z)] ≈ 1.0998, attained at z ≈ 2.4; dividing by 1.1 makes Swish
# 1-Lipschitz for every beta because the derivative depends on x only through beta·x.
SWISH_LIPSCHITZ = 1.1

#: Below this many elements a map takes autograd's path: launch and dispatch costs dominate
#: there, and small models (tests, 8×8 digits at small batches) need no compiler.
MIN_FUSED_NUMEL = 1 << 15

_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_state = {"enabled": os.environ.get("HYBRIDFLOW_FUSED_KERNELS", "1") != "0"}
_compiled: dict[Callable, Callable] = {}


def fused_kernels_enabled() -> bool:
    """Whether :class:`~hybridflow.nets.LipSwish` uses the fused derivatives where it can."""
    return _state["enabled"]


def set_fused_kernels(enabled: bool) -> None:
    """Turn the fused LipSwish derivatives on or off for this process."""
    _state["enabled"] = bool(enabled)


def use_fused_lipswish(x: Tensor) -> bool:
    """Whether a LipSwish on ``x`` takes the fused path (see the module docstring)."""
    return (
        _state["enabled"]
        and x.dtype in _FUSED_DTYPES
        and x.numel() >= MIN_FUSED_NUMEL
        and not torch.compiler.is_compiling()
    )


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def lipswish_vjp(g: Tensor, x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """``(g·f_x, Σ g·f_β)``: LipSwish's vector–Jacobian product for ``x`` and ``β``.

    Computed in at least float32 (bfloat16 maps are upcast inside the kernel); the first result
    has ``x``'s dtype, the second ``beta``'s.
    """
    dtype = _compute_dtype(x)
    g_, x_, b = g.to(dtype), x.to(dtype), beta.to(dtype)
    t = b * x_
    s = torch.sigmoid(t)
    ds = s * (1 - s)
    gx = g_ * (s + t * ds) * (1 / SWISH_LIPSCHITZ)
    gbeta = (g_ * x_ * x_ * ds).sum() * (1 / SWISH_LIPSCHITZ)
    return gx.to(x.dtype), gbeta.to(beta.dtype)


def lipswish_vjp_backward(
    grad_gx: Tensor, grad_gbeta: Tensor, g: Tensor, x: Tensor, beta: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Derivatives of :func:`lipswish_vjp`'s outputs, weighted by ``(grad_gx, grad_gbeta)``,
    with respect to ``(g, x, β)`` (the second derivatives of the module docstring)."""
    dtype = _compute_dtype(x)
    ggx, ggb = grad_gx.to(dtype), grad_gbeta.to(dtype)
    g_, x_, b = g.to(dtype), x.to(dtype), beta.to(dtype)
    t = b * x_
    s = torch.sigmoid(t)
    ds = s * (1 - s)
    d2s = ds * (1 - 2 * s)
    inv = 1 / SWISH_LIPSCHITZ
    gh = g_ * (2 * ds + t * d2s) * inv
    d_g = ggx * (s + t * ds) * inv + ggb * x_ * x_ * ds * inv
    d_x = (ggx * b + ggb * x_) * gh
    d_beta = (ggx * gh * x_).sum() + ggb * (g_ * x_ * x_ * x_ * d2s).sum() * inv
    return d_g.to(g.dtype), d_x.to(x.dtype), d_beta.to(beta.dtype)


def _run(fn: Callable, *args: Tensor):
    """``fn(*args)`` through its compiled kernel, or eagerly once compiling has failed."""
    if _state["enabled"]:
        try:
            if fn not in _compiled:
                _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
            return _compiled[fn](*args)
        except Exception as err:
            _state["enabled"] = False
            warnings.warn(
                f"fused LipSwish kernels are unavailable ({type(err).__name__}: "
                f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); using eager "
                "ops (slower, same results). Set HYBRIDFLOW_FUSED_KERNELS=0 to skip the attempt.",
                RuntimeWarning,
                stacklevel=3,
            )
    return fn(*args)


class LipSwishFunction(Function):
    """``x·σ(βx)/1.1`` whose backward is :class:`_LipSwishVJP` (differentiable once more)."""

    @staticmethod
    def forward(ctx, x: Tensor, beta: Tensor) -> Tensor:
        ctx.save_for_backward(x, beta)
        return F.silu(beta * x) * (1.0 / (SWISH_LIPSCHITZ * beta))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        x, beta = ctx.saved_tensors
        return _LipSwishVJP.apply(grad, x, beta)


class _LipSwishVJP(Function):
    """LipSwish's vector–Jacobian product as a node of its own, so that the series' graphs
    (``create_graph=True``) differentiate it with :func:`lipswish_vjp_backward`."""

    @staticmethod
    def forward(ctx, g: Tensor, x: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
        ctx.save_for_backward(g, x, beta)
        return _run(lipswish_vjp, g, x, beta)

    @staticmethod
    def backward(ctx, grad_gx: Tensor, grad_gbeta: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        g, x, beta = ctx.saved_tensors
        if torch.is_grad_enabled():
            # A third derivative was asked for (create_graph=True): eager ops keep the graph.
            return lipswish_vjp_backward(grad_gx, grad_gbeta, g, x, beta)
        return _run(lipswish_vjp_backward, grad_gx, grad_gbeta, g, x, beta)
