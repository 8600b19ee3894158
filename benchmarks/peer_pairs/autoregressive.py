"""Autoregressive flows on vectors: our MAF against zuko and nflows, our MAF-DSF against zuko's NAF.

* ``maf-affine/zuko`` and ``maf-affine/nflows``: five affine MADE layers (Papamakarios et al.
  2017) with two hidden layers of width 64 and a reversal between layers, standard normal base,
  on both sides. Parameter counts differ by 0.1–0.5% (our MADE keeps a bias per output that the
  peers fold differently). nflows' transform squashes its scale through ``sigmoid(s + 2) + 1e-3``,
  zuko and ours use an exponential of a clamped/soft-clipped log-scale: a few elementwise ops.
* ``maf-dsf/zuko-naf``: the nearest equivalent zuko ships to a deep-sigmoidal NAF (Huang et al.
  2018) is ``zuko.flows.NAF`` (Wehenkel & Louppe 2019's unconstrained monotonic network: a
  per-feature monotonic MLP fed the MADE's signal, with a soft clip between layers), not a DSF:
  its elementwise transformer is a 17→64→64→1 monotonic MLP per feature, ours a 16-unit sigmoid
  mixture whose log-det is closed form. Both invert by bisection. Our MADE width is chosen so the
  parameter counts match (zuko's per-feature networks hold most of its parameters); D = 784 is
  left out (zuko's NAF has 25 M parameters there).
"""

from __future__ import annotations

from importlib.metadata import version

import torch
from torch import Tensor

from hybridflow.models import FlowModel, create_backbone

from . import Case, PeerMissing, Side, count_parameters, import_peer

__all__ = ["cases"]

FLOWS, HIDDEN = 5, 64
MAF_DIMS, NAF_DIMS = (8, 64, 784), (8, 64)
DSF_UNITS = 16


def _vector_input(d: int):
    def make(batch: int) -> Tensor:
        return torch.randn(batch, d, generator=torch.Generator().manual_seed(d * 7919 + batch))

    return make


def _ours(d: int, name: str, **kw) -> FlowModel:
    torch.manual_seed(0)
    backbone = create_backbone(name, (d,), num_flows=FLOWS, **kw)
    return FlowModel(backbone, (d,), num_levels=None, preprocessing="none")


def _our_side(model: FlowModel, label: str) -> Side:
    return Side(
        label, model, model.log_prob, lambda n: model.sample(n), lambda x: -model.log_prob(x).mean()
    )


def _our_maf(d: int) -> Side:
    return _our_side(_ours(d, "maf", hidden_features=(HIDDEN, HIDDEN)), "hybridflow maf")


def _zuko_maf(d: int) -> Side:
    zuko = import_peer("zuko")
    torch.manual_seed(0)
    flow = zuko.flows.MAF(d, transforms=FLOWS, hidden_features=(HIDDEN, HIDDEN))
    return Side(
        f"zuko {version('zuko')} MAF",
        flow,
        lambda x: flow().log_prob(x),
        lambda n: flow().sample((n,)),
    )


def _nflows_maf(d: int) -> Side:
    import_peer("nflows")
    from nflows.flows import MaskedAutoregressiveFlow

    torch.manual_seed(0)
    # One feed-forward block after the MADE's input layer = two hidden layers, no residuals.
    flow = MaskedAutoregressiveFlow(
        d, HIDDEN, FLOWS, num_blocks_per_layer=1, use_residual_blocks=False
    )
    return Side(
        f"nflows {version('nflows')} MaskedAutoregressiveFlow", flow, flow.log_prob, flow.sample
    )


def _zuko_naf(d: int) -> Side:
    zuko = import_peer("zuko")
    torch.manual_seed(0)
    flow = zuko.flows.NAF(d, transforms=FLOWS, signal=16)
    return Side(
        f"zuko {version('zuko')} NAF (UMNN-style)",
        flow,
        lambda x: flow().log_prob(x),
        lambda n: flow().sample((n,)),
    )


def _matched_dsf(d: int, target: int) -> Side:
    """Our MAF-DSF with the MADE width whose parameter count is closest to ``target``."""

    def size(h: int) -> int:
        backbone = create_backbone(
            "naf",
            (d,),
            transformer="dsf",
            num_flows=FLOWS,
            num_units=DSF_UNITS,
            hidden_features=h,
        )
        return count_parameters(backbone)

    lo, hi = 4, 1024  # the count grows with the width: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if size(mid) < target else (lo, mid)
    width = min((lo - 1, lo), key=lambda h: abs(size(h) - target))
    model = _ours(d, "naf", transformer="dsf", num_units=DSF_UNITS, hidden_features=width)
    return _our_side(model, f"hybridflow naf (DSF, {DSF_UNITS} units, MADE width {width})")


def _zuko_naf_size(d: int) -> int:
    try:
        zuko = import_peer("zuko")
    except PeerMissing:
        return 0
    return count_parameters(zuko.flows.NAF(d, transforms=FLOWS, signal=16))


def cases(tiny: bool) -> list[Case]:
    del tiny  # the same models; the harness shrinks rounds and batches
    out = []
    for peer, build in (("zuko", _zuko_maf), ("nflows", _nflows_maf)):
        for d in MAF_DIMS:
            out.append(
                Case(
                    pair=f"maf-affine/{peer}",
                    setting=f"D={d}",
                    make_input=_vector_input(d),
                    build_ours=lambda d=d: _our_maf(d),
                    build_peer=lambda d=d, build=build: build(d),
                    batches=(1, 64, 1024),
                    sample_batches=(64,) if d <= 64 else (),  # D sequential passes
                    targets={"eval": 0.8, "train": 0.8},
                    note=f"{FLOWS} affine MADE layers, hidden (64, 64), reversals",
                )
            )
    for d in NAF_DIMS:
        out.append(
            Case(
                pair="maf-dsf/zuko-naf",
                setting=f"D={d}",
                make_input=_vector_input(d),
                build_ours=lambda d=d: _matched_dsf(d, _zuko_naf_size(d) or 100_000),
                build_peer=lambda d=d: _zuko_naf(d),
                batches=(64, 1024),
                # zuko inverts its monotonic networks by bisection, one feature at a time:
                # sampling 64 examples at D = 64 takes ~10 s there, so only D = 8 times it
                sample_batches=(64,) if d <= 8 else (),
                note="nearest equivalent: zuko's NAF is a UMNN-style monotonic MLP, ours a DSF",
            )
        )
    return out
