"""Fused LipSwish derivatives: the hand-written maths, the compiled kernels, and the fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridflow.nets import LipschitzConvNet, LipSwish, fused
from hybridflow.transforms import ResidualBlock


@pytest.fixture
def eager_kernels():
    """The fused Function with its kernels run eagerly (the maths, without a compiler)."""
    was = fused.fused_kernels_enabled()
    fused.set_fused_kernels(False)
    yield
    fused.set_fused_kernels(was)


@pytest.fixture
def fused_on():
    """The fused path switched on (whatever the environment says)."""
    was = fused.fused_kernels_enabled()
    fused.set_fused_kernels(True)
    yield
    fused.set_fused_kernels(was)


def _lipswish_autograd(x: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    return F.silu(beta * x) / (fused.SWISH_LIPSCHITZ * beta)


def test_function_matches_silu_to_second_order(eager_kernels) -> None:
    gen = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(4, 5, dtype=torch.float64, generator=gen)).requires_grad_()
    beta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(
        fused.LipSwishFunction.apply(x, beta), _lipswish_autograd(x, beta), rtol=0, atol=1e-15
    )
    assert torch.autograd.gradcheck(fused.LipSwishFunction.apply, (x, beta))
    assert torch.autograd.gradgradcheck(fused.LipSwishFunction.apply, (x, beta))


def test_third_derivative_through_the_vjp_node(eager_kernels) -> None:
    # create_graph in the second backward: the VJP node's backward must stay differentiable.
    x = torch.linspace(-4, 4, 9, dtype=torch.float64, requires_grad=True)
    beta = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)

    def third(fn):
        (d1,) = torch.autograd.grad(fn(x, beta).sum(), x, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), x, create_graph=True)
        return torch.autograd.grad(d2.sum(), (x, beta))

    for got, want in zip(
        third(fused.LipSwishFunction.apply), third(_lipswish_autograd), strict=True
    ):
        torch.testing.assert_close(got, want)


def test_compiled_kernels_match_the_eager_maths(fused_on) -> None:
    gen = torch.Generator().manual_seed(1)
    f32 = torch.float32
    g, x, ggx = (torch.randn(4, 8, 32, 32, generator=gen, dtype=f32) for _ in range(3))
    beta, ggb = torch.tensor(0.9, dtype=f32), torch.tensor(0.4, dtype=f32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a compiler failure would fall back with a warning
        compiled = fused._run(fused.lipswish_vjp, g, x, beta)
        compiled_back = fused._run(fused.lipswish_vjp_backward, ggx, ggb, g, x, beta)
    for got, want in zip(
        (*compiled, *compiled_back),
        (*fused.lipswish_vjp(g, x, beta), *fused.lipswish_vjp_backward(ggx, ggb, g, x, beta)),
        strict=True,
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _block_estimate(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    block = ResidualBlock(LipschitzConvNet(8, 16, (16, 16), coeff=0.9), n_terms=3, eval_n_terms=3)
    block = block.float()
    x = torch.randn(8, 8, 16, 16, dtype=torch.float32)
    z, logdet = block(x)
    loss = z.square().mean() - logdet.mean()
    return logdet.detach(), torch.autograd.grad(loss, [p for p in block.parameters()])


def test_residual_block_estimate_and_gradients_unchanged(fused_on) -> None:
    assert fused.use_fused_lipswish(
        torch.zeros(8, 16, 16, 16, dtype=torch.float32)
    )  # the block's maps are fused
    fused_logdet, fused_grads = _block_estimate(0)
    fused.set_fused_kernels(False)
    plain_logdet, plain_grads = _block_estimate(0)
    torch.testing.assert_close(fused_logdet, plain_logdet, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_small_maps_and_float64_take_autograds_path(fused_on) -> None:
    assert not fused.use_fused_lipswish(torch.zeros(2, 4, 8, 8, dtype=torch.float32))
    assert not fused.use_fused_lipswish(torch.zeros(64, 64, 8, 8, dtype=torch.float64))
    x = torch.randn(2, 3, requires_grad=True)
    y = LipSwish()(x)
    assert "LipSwishFunction" not in type(y.grad_fn).__name__


def test_compiler_failure_falls_back_with_one_warning(monkeypatch) -> None:
    def broken(fn, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(fused, "_compiled", {})
    monkeypatch.setitem(fused._state, "enabled", True)
    g, x, beta = torch.randn(3, 4), torch.randn(3, 4), torch.tensor(0.7)  # float64: eager anyway
    with pytest.warns(RuntimeWarning, match="no C[+][+] compiler"):
        got = fused._run(fused.lipswish_vjp, g, x, beta)
    assert not fused.fused_kernels_enabled()
    for a, b in zip(got, fused.lipswish_vjp(g, x, beta), strict=True):
        torch.testing.assert_close(a, b)


def test_environment_switch_turns_the_path_off() -> None:
    code = "from hybridflow.nets import fused; print(fused.fused_kernels_enabled())"
    for value, want in ((None, "True"), ("0", "False"), ("1", "True")):
        env = {k: v for k, v in os.environ.items() if k != "HYBRIDFLOW_FUSED_KERNELS"}
        env |= {} if value is None else {"HYBRIDFLOW_FUSED_KERNELS": value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == want, out.stderr


def test_lipswish_module_uses_the_function_on_large_maps(fused_on) -> None:
    x = torch.randn(4, 16, 32, 32, dtype=torch.float32, requires_grad=True)
    assert "LipSwishFunction" in type(nn.Sequential(LipSwish())(x).grad_fn).__name__
    fused.set_fused_kernels(False)
    assert "LipSwishFunction" not in type(LipSwish()(x).grad_fn).__name__


def test_bfloat16_maps_agree_with_autograd(fused_on) -> None:
    gen = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 16, 32, 32, generator=gen, dtype=torch.float32).bfloat16()
    act = LipSwish()
    grads = []
    for enabled in (True, False):
        was = fused.fused_kernels_enabled()
        fused.set_fused_kernels(enabled)
        try:
            x = x0.clone().requires_grad_()
            (gx,) = torch.autograd.grad(act(x).float().square().sum(), x, create_graph=True)
            grads.append((gx, *torch.autograd.grad(gx.float().sum(), (x, act.raw_beta))))
        finally:
            fused.set_fused_kernels(was)
    for got, want in zip(*grads, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
