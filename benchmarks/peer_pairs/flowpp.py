"""Flow++: our ``flowpp-cpu`` against chrischute/flowplusplus (a PyTorch port of Ho et al. 2019).

Both sides are density models of 8-bit levels: uniform dequantization ``(x + u) / 256``, the
logit preprocessing of the Flow++ code, ``logit(0.05 + 0.9 y)`` (ours ``logit_alpha=0.05``, the
peer's ``bounds = 0.9``), and ``log_prob = log N(z; 0, I) + log|det| - D log 256`` in nats (the
peer's ``NLLLoss``). The peer reads ``levels / 255`` in [0, 1], as ``train.py`` feeds it, and
dequantizes ``x·255 + u`` itself. Sampling: ours ``FlowModel.sample`` (levels), the peer's as
``train.py`` (``sigmoid`` of the inverse). Both invert the logistic-mixture CDF by bisection
(≤ 100 steps); the peer stops at ``max |Δx| ≤ 1e-10``, i.e. brackets 2e-10 wide, so ours runs
with ``inverse_tol=2e-10`` (default 1e-6). Layout on both sides: 2 checkerboard couplings,
squeeze, 2 channel + 2 checkerboard couplings (peer ``scales=((0, 2), (2, 2))``), each step
ActNorm → 1×1 conv → mixture-of-logistics coupling (4 logistics), conditioners of 2 blocks of
gated conv + 4-head gated attention, no dropout. Our conditioners' output convolutions start at
zero: identity couplings, whose bisection bracket is a single point (sampling would take no
steps), so the builder gives them PyTorch's default initialisation, as the peer's have; then
ActNorms (and our weight-norm convolutions) are data-initialised on 16 inputs (2 when tiny).

The peer is a checkout (``--peer-path flowplusplus=DIR``); its top-level packages ``models`` and
``util`` are imported with the checkout first on ``sys.path`` and removed from ``sys.modules``
afterwards. On torch 2.14 it needs one change, in ``models/flowplusplus/nn.py``
(``GatedAttn.forward``): ``q *= key_depth_per_head ** -0.5`` becomes
``q = q * key_depth_per_head ** -0.5`` (``q`` is a view of a ``split`` output; autograd refuses
in-place changes to such views).

Parameter counts (our default gathered checkerboards). At the same nominal settings (3×32×32,
width 32, 2 blocks, 4 logistics, attention, the paper's 4 + 2 + 3 couplings, uniform
dequantization) ours has 865,820, the peer 665,424. Per submodule, ours / peer: learned
positional encodings 94,208 / 0 (ours one ``[width, H, W/2]`` per checkerboard conditioner and
``[width, H, W]`` per channel conditioner, as in the official TF code; the peer adds fixed
sinusoids); output and input convs: after the squeeze the peer factors out half the channels
(``x.chunk(2)``), so its 5 half-resolution couplings model 6 of the 12 channels and predict
``2 + 3K`` values for half as many, while ours (like the official code) keeps all 12; attention
q/k/v (bias on ours), 1×1 convs, ActNorm, scale / rescale differ by less; identical: gated convs,
attention gates, LayerNorms. (Our former masked layout had 945,660: positions over the full H × W
and a mask input channel.) At the paper's CIFAR-10 settings (width 96, 10 blocks, 32 logistics)
the official code (``run_cifar.py``) has 31,443,440 = 27,976,464 flow + 3,466,976 dequantization
flow: the paper's 31.4 M counts the dequantizer. Ours 31,667,687 = 27,991,884
(``flowpp-cifar10``) + 3,675,803 (``dequantization="variational"``,
``FLOWPP_CIFAR10_DEQUANTIZATION``); the peer 28,784,792 = 25,630,704 + 3,154,088
(``num_dequant_blocks=2``). Ours vs the official flow, +15,420: weight-norm gains (+69,120; the
official convs are plain, data-initialised), LU 1×1 (+504), scale (+60), per-channel instead of
per-pixel ActNorm (-55,128), the rest of the difference in biases; positional encodings (H × W/2
at the checkerboards) and output convs identical. (Masked: 28,231,404, +254,940, of it +233,472
positions over the full board and +6,048 mask channel.) The peer vs the official flow,
-2,345,760: factor-out (output convs -2,030,952, input convs -19,872), no learned positions
(-282,624), per-channel ActNorm (-55,152), 1×1 (-432), weight-norm gains less the q/k/v bias
(+43,200), rescale (+72).

Equal parameters. No arguments make the two identical: the peer always factors out after the
squeeze, ours never. Both gather the kept sites of a checkerboard into ``[C, H, W/2]`` (ours by
default since issue 25; the peer rebuilds its index lists in Python on every call). The pair keeps
the layout, blocks, heads and logistics and widens the peer (widths step by 4 for 4 heads):
1×28×28 ours width 32 (444,628) vs the peer 36 (466,880), -4.8%; 3×32×32 ours 36 (699,612) vs
the peer 40 (657,888), +6.3%, the closest widths allow (ours 32 vs 36: +6.4%; 36 vs 44: -10.4%):
the larger model is ours, so its times are not flattered. Remaining differences in work: the
peer's half-resolution couplings transform half as many dimensions; each of our bisection steps
evaluates ``log F`` and ``log(1 - F)`` at every site of a checkerboard coupling, the peer's ``F``
at the moved half; the peer's ActNorm and 1×1 conv act on the concatenated halves (2C channels;
at a checkerboard its 1×1 conv mixes horizontal neighbours); its coupling is
``(logit F + b)·e^a``, ours ``logit F · e^a + b``. The parity runs (:func:`parity_cases`) were
trained with our former masked layout (``[x·mask, mask]`` over the full H × W: 477,140
parameters at 1×28×28, +2.2%) and keep it until their gathered revision has run.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import sys
import warnings
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
from _common import load_mnist
from torch import Tensor

from hybridflow.models import FlowModel, create_backbone
from hybridflow.nets import FlowppConditioner

from . import Case, PeerMissing, Side, peer_checkout, speed_targets, standard_normal_log_prob
from .parity import ParityCase, ParityData, ParitySide, TrainSettings, image_data

__all__ = ["cases", "parity_cases"]

LEVELS, ALPHA, SEED = 256, 0.05, 0
PEER_STOP = 2e-10  # the peer's bisection stops at max |Δx| ≤ 1e-10: brackets 2e-10 wide
INIT_BATCH = 16  # data-init batch
HINT = "git clone https://github.com/chrischute/flowplusplus"
SETTINGS = {(1, 28, 28): (32, 36), (3, 32, 32): (36, 40)}  # shape: (our width, peer width)


@lru_cache(maxsize=8)
def _levels(shape: tuple[int, int, int], batch: int) -> Tensor:
    if shape == (1, 28, 28):
        return load_mnist(batch, seed=SEED)[0]
    g = torch.Generator().manual_seed(SEED + batch)
    return torch.randint(0, LEVELS, (batch, *shape), generator=g).float()


def _ours(shape: tuple[int, int, int], width: int, init_batch: int) -> Side:
    backbone = create_backbone("flowpp-cpu", shape, hidden_channels=width, inverse_tol=PEER_STOP)
    for net in backbone.modules():  # leave the identity start: the peer's init (see above)
        if isinstance(net, FlowppConditioner):
            net.conv_out.reset_parameters()
    model = FlowModel(backbone, shape, num_levels=LEVELS, preprocessing="logit", logit_alpha=ALPHA)
    model.data_init(_levels(shape, init_batch))
    return Side(f"hybridflow flowpp-cpu (width {width})", model, model.log_prob, model.sample)


@lru_cache(maxsize=2)
def _peer_class(root: Path) -> type:
    """``FlowPlusPlus`` of the checkout, its generic ``models``/``util`` kept out of the way."""
    if not (root / "models" / "flowplusplus" / "flowplusplus.py").is_file():
        raise PeerMissing(f"flowplusplus: {root} is not a chrischute/flowplusplus checkout")

    def owned() -> list[str]:
        return [k for k in sys.modules if k.split(".")[0] in ("models", "util")]

    saved = {k: sys.modules.pop(k) for k in owned()}
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("models.flowplusplus.flowplusplus").FlowPlusPlus
    finally:
        sys.path.remove(str(root))
        for k in owned():
            del sys.modules[k]
        sys.modules.update(saved)


def _peer_model(
    shape: tuple[int, int, int], width: int, dequant_blocks: int = 0
) -> torch.nn.Module:
    """The peer's ``FlowPlusPlus`` at this pair's layout, no dropout; uniform dequantization
    unless ``dequant_blocks`` (its variational dequantizer's conditioner depth) is set."""
    cls = _peer_class(peer_checkout("flowplusplus", hint=HINT))
    with warnings.catch_warnings():  # torch.nn.utils.weight_norm is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        return cls(
            scales=((0, 2), (2, 2)),
            in_shape=shape,
            mid_channels=width,
            num_blocks=2,
            num_dequant_blocks=dequant_blocks,  # 0: uniform dequantization
            num_components=4,
            use_attn=True,
            drop_prob=0.0,
        ).float()  # the peer hard-codes float32 (its 1×1 convs, bounds and inverse)


def _peer_log_prob(model: torch.nn.Module, levels: Tensor, u: Tensor) -> Tensor:
    """The peer's ``log p`` of levels in nats with the dequantization noise ``u`` given: its own
    ``to_logits`` (bounds 0.9) and flow, ``(x + u) / 256`` as its ``dequantize`` computes it."""
    sldj = torch.zeros(levels.shape[0])
    y, sldj = model.to_logits((levels.float() + u) / LEVELS, sldj)
    z, sldj = model.flows(y, sldj, False)
    return standard_normal_log_prob(z) + sldj - math.prod(levels.shape[1:]) * math.log(LEVELS)


def _peer(shape: tuple[int, int, int], width: int, init_batch: int) -> Side:
    np.random.seed(SEED)  # its 1×1 convs draw their noise with numpy
    model = _peer_model(shape, width)
    dim = math.prod(shape)

    def log_prob(x: Tensor) -> Tensor:
        z, sldj = model(x.float() / (LEVELS - 1), reverse=False)
        return standard_normal_log_prob(z) + sldj - dim * math.log(LEVELS)

    @torch.no_grad()
    def sample(n: int) -> Tensor:
        x, _ = model(torch.randn(n, *shape, dtype=torch.float32), reverse=True)
        return torch.sigmoid(x)

    model.train()
    with torch.no_grad():
        log_prob(_levels(shape, init_batch))  # ActNorm init on the first training call
    return Side(f"chrischute/flowplusplus FlowPlusPlus (width {width})", model, log_prob, sample)


def cases(tiny: bool) -> list[Case]:
    init_batch = 2 if tiny else INIT_BATCH
    out = []
    for shape, (ours, peer) in SETTINGS.items():
        out.append(
            Case(
                pair="flowpp-cpu/flowplusplus",
                setting="x".join(map(str, shape)),
                make_input=lambda b, s=shape: _levels(s, b).clone(),
                build_ours=lambda s=shape, w=ours: _ours(s, w, init_batch),
                build_peer=lambda s=shape, w=peer: _peer(s, w, init_batch),
                batches=(1, 16),
                sample_batches=(1, 16),
                memory_batch=16,
                targets=speed_targets((16,), sample={"16": 0.5}),
                param_tolerance=0.07 if shape == (3, 32, 32) else 0.05,
                note=(
                    f"width {ours} (ours) vs {peer} (peer), the closest parameter counts; the peer "
                    "factors out half the channels after the squeeze, ours keeps all; both "
                    "gather the checkerboard (conditioners on H×W/2); learned vs "
                    "sinusoidal positions; ours inverse_tol=2e-10 to match the peer's stop and "
                    "default-initialised output convs (not the identity start), as the peer's; "
                    "peer patched: models/flowplusplus/nn.py GatedAttn.forward "
                    "'q *= key_depth_per_head ** -0.5' -> 'q = q * key_depth_per_head ** -0.5'"
                ),
            )
        )
    return out


# --------------------------------------------------------------------------- parity (training)

PARITY_SETTINGS = TrainSettings(
    batch=16,
    lr=5e-4,
    evals=10,
    eval_batch=100,
    val_size=500,
    test_size=2000,
    iw_samples=16,
    iw_size=500,
)
# The peer's dequantizer: 4 couplings of 32 logistics (fixed in its ``_Dequantization``), an
# auxiliary network of 32 channels, conditioners of its flow's width; ``num_dequant_blocks=1``
# (the paper's CIFAR-10 model uses 2) keeps a run within a day of one core.
PEER_DEQUANT_BLOCKS = 1
OURS_DEQUANTIZATION = {  # equal parameters: the dequantizers within 4.5%, the models 0.7%
    "num_couplings": 4,
    "context_channels": 32,
    "num_components": 32,
    "num_blocks": 1,
    "hidden_channels": 28,
}


def _parity_init_batch(data: ParityData) -> tuple[Tensor, Tensor]:
    """ActNorm data-init batch of both sides: the first 16 training images, fixed noise."""
    x = data.train_x[:INIT_BATCH]
    return x, torch.rand(x.shape, generator=torch.Generator().manual_seed(INIT_BATCH))


def noise_seed(u: Tensor) -> int:
    """A seed for the base noise ``ε`` of variational dequantization, fixed by the loop's ``u``.

    Both sides draw ``ε ~ N(0, I)`` shaped like the batch from a generator with this seed (ours
    through ``generator=``, the peer's ``torch.randn_like`` from the seeded global generator:
    the same numbers), so they see the same ``ε`` at every step, and a resumed run the same as
    an uninterrupted one.
    """
    digest = hashlib.blake2b(u.numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _parity_ours(data: ParityData, seed: int, smoke: bool, variational: bool) -> ParitySide:
    torch.manual_seed(seed)
    shape = tuple(data.train_x.shape[1:])
    width = SETTINGS[shape][0]
    layout = {"checkerboard_layout": "masked"}  # these runs' layout (the default: gathered)
    extra: dict = {}
    if variational:
        extra = {
            "dequantization": "variational",
            "dequantization_args": {**OURS_DEQUANTIZATION, **layout},
        }
    model = FlowModel(
        create_backbone("flowpp-cpu", shape, hidden_channels=width, **layout),
        shape,
        num_levels=LEVELS,
        preprocessing="logit",
        logit_alpha=ALPHA,
        **extra,
    )

    def log_prob(m: FlowModel, x: Tensor, u: Tensor) -> Tensor:
        if not variational:
            return m.log_prob(x, u)
        return m.log_prob(x, generator=torch.Generator().manual_seed(noise_seed(u)))

    x, u = _parity_init_batch(data)
    with torch.no_grad():
        log_prob(model.train(), x, u)  # ActNorm and weight-norm data-init
    what = "variational" if variational else "uniform"
    return ParitySide(
        f"hybridflow flowpp-cpu (width {width}, {what} dequantization)",
        model,
        loss=lambda x, y, u: -log_prob(model, x, u).mean() / model.dim,
        score=lambda m, x, u: (log_prob(m, x, u), None),
    )


def _peer_elbo(model: torch.nn.Module, levels: Tensor, u: Tensor) -> Tensor:
    """The peer's own forward (its ``_Dequantization`` draws ``ε`` with ``torch.randn_like``)
    with the global generator seeded by :func:`noise_seed`; the caller's RNG state is kept."""
    with torch.random.fork_rng(devices=[]):  # CPU only: the peer runs on CPU here
        torch.manual_seed(noise_seed(u))
        z, sldj = model(levels.float() / (LEVELS - 1), reverse=False)
    return standard_normal_log_prob(z) + sldj - math.prod(levels.shape[1:]) * math.log(LEVELS)


def _parity_peer(data: ParityData, seed: int, smoke: bool, variational: bool) -> ParitySide:
    shape = tuple(data.train_x.shape[1:])
    width = SETTINGS[shape][1]
    torch.manual_seed(seed)
    np.random.seed(seed)  # its 1×1 convs draw their noise with numpy
    model = _peer_model(shape, width, PEER_DEQUANT_BLOCKS if variational else 0)
    log_prob = _peer_elbo if variational else _peer_log_prob
    x, u = _parity_init_batch(data)
    with torch.no_grad():
        log_prob(model.train(), x, u)  # ActNorm init on the first training call
    what = "variational" if variational else "uniform"
    return ParitySide(
        f"chrischute/flowplusplus FlowPlusPlus (width {width}, {what} dequantization)",
        model,
        loss=lambda x, y, u: -log_prob(model, x, u).mean() / data.dim,
        score=lambda m, x, u: (log_prob(m, x, u), None),
    )


def parity_cases() -> list[ParityCase]:
    """``flowpp-cpu`` against chrischute/flowplusplus on Fashion-MNIST, uniform and variational
    dequantization (the importance-weighted bound at the end)."""
    differences = (
        "layout (both): 2 checkerboard couplings, squeeze, 2 channel + 2 checkerboard "
        "couplings; ActNorm → 1×1 conv → mixture-of-logistics coupling (4 logistics); "
        "conditioners of 2 gated conv + 4-head gated attention blocks, no dropout",
        "width: ours 32, the peer 36 (equal parameters within 2.2%: the peer factors out half "
        "the channels after the squeeze, ours keeps all; see benchmarks/peer_pairs/flowpp.py)",
        "checkerboard: ours masks ([x·mask, mask], full H×W), the peer gathers the kept half",
        "positions: ours learned encodings, the peer fixed sinusoids",
        "coupling: ours logit F · e^a + b, the peer (logit F + b) · e^a",
        "initialisation: ours zero output convolutions (identity couplings at the start, our "
        "default), the peer PyTorch's defaults; both data-initialise ActNorm on the same 16 "
        "images and noise",
        f"preprocessing: the same on both sides, logit(0.05 + 0.9 y) (ours logit_alpha = "
        f"{ALPHA}, the peer's bounds 0.9), (x + u) / 256 with the loop's noise u",
    )
    variational = (
        "variational dequantization: q(u | x) = σ(g(ε; c(x))), 4 mixture-of-logistics "
        "couplings of 32 logistics and conditioners of 1 gated conv + attention block on both "
        "sides; ours 32 context channels from a conv-only context network, conditioner width 28; "
        "the peer an auxiliary network of 32 channels (conv + 3 gated convs), conditioner width "
        "36 (its flow's); dequantizers 334,272 / 350,104 parameters (-4.5%), models 811,412 / "
        "816,984 (-0.7%); the peer's dequantizer couplings act on the two checkerboard halves "
        "stacked as channels, ours alternate checkerboard parities",
        "variational noise: both sides draw ε ~ N(0, I) from a generator seeded by the loop's "
        "noise u of the batch (the same ε on both sides; training bound = one-sample ELBO)",
        "importance-weighted bound at the end: 16 draws per example on the first 500 test "
        "examples, the same draws on both sides (uniform: 16 noise draws)",
    )
    load = lambda smoke: image_data("fashion-mnist", smoke)  # noqa: E731
    return [
        ParityCase(
            "flowpp-cpu/flowplusplus",
            f"fashion-mnist {what}",
            "density",
            load,
            partial(_parity_ours, variational=what == "variational"),
            partial(_parity_peer, variational=what == "variational"),
            PARITY_SETTINGS,
            2,
            differences + (variational if what == "variational" else ()),
        )
        for what in ("uniform", "variational")
    ]
