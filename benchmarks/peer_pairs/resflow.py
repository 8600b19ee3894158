"""Residual Flows: our ``resflow-cpu`` hybrid against the reference code (Chen et al. 2019).

``resflow-cpu/residual-flows``: the CPU comparison configuration of
``benchmarks/resflow_cpu_step.py`` on 1×28×28 MNIST levels (the first examples of
``mnist10k.npz`` and their labels; seeded random levels and labels without it): dequantization
``(x + u) / 256``, logit preprocessing (α = 1e-3 on both sides; ``train_img.py`` uses 1e-6 for
MNIST), 3 scales × 2 residual blocks without
factor-out, width 64, kernels 3-1-3, LipSwish, 2-norm spectral normalisation (c = 0.98, one power
iteration per layer and training step), 4 fully connected end blocks of width 128, ActNorm,
Poisson roulette with 2 exact terms, Neumann gradients computed in the forward (memory
efficient), and the per-scale classifier head of width 256. The training loss is the λ = 1/D
hybrid ``CE + NLL / D`` (nats); Adam.

The reference is not installable: pass a checkout of https://github.com/rtqichen/residual-flows
with ``--peer-path residual-flows=DIR`` (it runs unmodified on torch 2.14; the package is
``resflows``, ``lib`` in old checkouts). Its ``ResidualFlow`` is built as ``train_img.py`` does
for ``--task hybrid --nblocks 2-2-2 --idim 64 --factor-out False --act swish
--n-lipschitz-iters 1 --cdim 256`` with the remaining defaults (actnorm, fc_end, vnorms 2222,
preact, first_resblock, Poisson with 2 exact terms, Neumann, mem-eff), and its training step as
``train_img.py`` does it minus logging, gradient clipping and the EMA: the reference's forward
does not update the power iterations, ``train_img.py`` calls ``update_lipschitz`` (one iteration
per layer) after each optimiser step, so the timed reference loss runs it first. Its loss is
``scale_dim``'s ``bits/dim + CE / ln 2`` times ``ln 2``: the same ``CE + NLL / D``.

Differences: the reference applies ActNorm after each block (per feature, 784 × 2 parameters,
after the fully connected ones), ours before each block and once at the end of the last scale,
per channel; its first block has no pre-activation; it keeps a Poisson rate and a geometric p
per block (parameters without gradients) and a learnable β per Swish. That is +0.6% parameters
for the reference (1,045,627 vs 1,039,494; identical heads of 92,938). In eval mode the
reference uses 20 exact terms plus the roulette, hard-coded, so ours runs with
``eval_n_terms=20`` here (its default is 10). Sampling inverts by fixed-point iteration on both
sides; the reference stops at ``|Δ|² < 1e-5 (1 + |y|)``, ours here at ``|Δ| ≤ sqrt(1e-5)`` (at
least as strict).
"""

from __future__ import annotations

import importlib
import math
import sys
from functools import lru_cache

import numpy as np
import torch
from _common import INPUT_SHAPE, NUM_CLASSES, build_hybrid, load_mnist
from torch import Tensor
from torch.nn import functional as F

from . import Case, PeerMissing, Side, peer_checkout

__all__ = ["cases"]

SEED, HEAD_WIDTH, LEVELS, ALPHA = 0, 256, 256, 1e-3
DIM = math.prod(INPUT_SHAPE)
OURS = {"eval_n_terms": 20, "inverse_atol": 1e-5**0.5, "inverse_rtol": 0.0}
HINT = "git clone https://github.com/rtqichen/residual-flows"


@lru_cache(maxsize=8)
def _mnist(batch: int) -> tuple[Tensor, Tensor]:
    x, y, _ = load_mnist(batch, seed=SEED)
    return x, y


def _make_input(batch: int) -> Tensor:
    return _mnist(batch)[0].clone()


def _labels(x: Tensor) -> Tensor:
    """The labels of ``_make_input(len(x))``: the same for both sides."""
    return _mnist(x.shape[0])[1]


def _ours(init_batch: int) -> Side:
    model = build_hybrid(OURS, seed=SEED, head_width=HEAD_WIDTH)
    model.data_init(_make_input(init_batch))
    flow = model.flow

    @torch.no_grad()
    def log_prob(x: Tensor) -> Tensor:
        model.eval()
        return flow.log_prob(x)

    @torch.no_grad()
    def sample(n: int) -> Tensor:
        model.eval()
        return flow.sample(n)

    def train_loss(x: Tensor) -> Tensor:
        model.train()
        return model.loss(x, _labels(x), "1/D")["loss"].mean()

    return Side("hybridflow resflow-cpu + ResidualFlowsHead", model, log_prob, sample, train_loss)


def _import_reference() -> tuple[object, object]:
    root = str(peer_checkout("residual-flows", hint=HINT))
    if root not in sys.path:
        sys.path.insert(0, root)
    for package in ("resflows", "lib"):
        try:
            return (
                importlib.import_module(f"{package}.layers"),
                importlib.import_module(f"{package}.resflow"),
            )
        except ImportError:
            continue
    raise PeerMissing(f"residual-flows: neither resflows nor lib importable from {root}")


def _peer(init_batch: int) -> Side:
    layers, resflow = _import_reference()
    torch.manual_seed(SEED)
    np.random.seed(SEED)  # the reference draws its roulette terms with numpy
    model = resflow.ResidualFlow(
        (init_batch, *INPUT_SHAPE),
        n_blocks=[2, 2, 2],
        intermediate_dim=64,
        factor_out=False,
        init_layer=layers.LogitTransform(ALPHA),
        actnorm=True,
        coeff=0.98,
        vnorms="2222",
        n_lipschitz_iters=1,
        n_power_series=None,
        n_dist="poisson",
        kernels="3-1-3",
        activation_fn="swish",
        fc_end=True,
        fc_idim=128,
        n_exact_terms=2,
        preact=True,
        neumann_grad=True,
        grad_in_forward=True,
        first_resblock=True,
        classification=True,
        classification_hdim=HEAD_WIDTH,
        n_classes=NUM_CLASSES,
    )
    base = layers.base
    kinds = (base.InducedNormConv2d, base.InducedNormLinear)
    kinds += (base.SpectralNormConv2d, base.SpectralNormLinear)
    normed = [m for m in model.modules() if isinstance(m, kinds)]

    def update_lipschitz(n_iterations: int | None = None) -> None:  # train_img.py's
        with torch.no_grad():
            for m in normed:
                m.compute_weight(update=True, n_iterations=n_iterations)

    def forward(x: Tensor, classify: bool) -> tuple[Tensor, Tensor | None]:
        """Log-likelihood of levels in nats (and logits), as ``train_img.compute_loss``."""
        out = model((x + torch.rand_like(x)) / LEVELS, 0, classify=classify)
        (z, delta_logp), logits = out if classify else (out, None)
        logpz = (-0.5 * z.pow(2) - 0.5 * math.log(2 * math.pi)).sum(1)
        return logpz - delta_logp.view(-1) - DIM * math.log(LEVELS), logits

    model.train()
    with torch.no_grad():
        forward(_make_input(init_batch), classify=True)  # ActNorm init, lazy conv u/v
    update_lipschitz(5)  # ours runs 5 power iterations at construction

    @torch.no_grad()
    def log_prob(x: Tensor) -> Tensor:
        model.eval()
        return forward(x, classify=False)[0]

    @torch.no_grad()
    def sample(n: int) -> Tensor:
        model.eval()
        x = model.inverse(torch.randn(n, DIM))
        return (x * LEVELS).floor().clamp(0, LEVELS - 1)

    def train_loss(x: Tensor) -> Tensor:
        model.train()
        update_lipschitz()
        log_px, logits = forward(x, classify=True)
        return F.cross_entropy(logits, _labels(x)) - log_px.mean() / DIM

    return Side("residual-flows ResidualFlow (rtqichen)", model, log_prob, sample, train_loss)


def cases(tiny: bool) -> list[Case]:
    init_batch = 2 if tiny else 64
    return [
        Case(
            pair="resflow-cpu/residual-flows",
            setting="1x28x28 hybrid",
            make_input=_make_input,
            build_ours=lambda: _ours(init_batch),
            build_peer=lambda: _peer(init_batch),
            batches=(1, 64),
            sample_batches=(64,),
            memory_batch=64,
            targets={"train": 0.7, "memory": 0.9},
            note=(
                "reference unmodified; ActNorm placement differs (+0.6% reference params); "
                "both eval with 20 exact terms + roulette; reference update_lipschitz timed "
                "in its step"
            ),
        )
    ]
