"""Coupling family: invertible 1×1 convolutions (Glow), additive couplings, and the ``coupling``,
``coupling+1x1`` and ``flowpp-cpu`` backbones end to end on digits."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from hybridflow.models import FlowModel, HybridModel, create_backbone, list_backbones
from hybridflow.nets import ConvResNet
from hybridflow.training import load_run, train
from hybridflow.transforms import AffineCoupling, InvertibleConv1x1

SMALL = {"num_scales": 2, "blocks_per_scale": 2, "hidden_channels": 8}


def test_lu_weight_stays_invertible_and_logdet_matches_slogdet_after_updates() -> None:
    torch.manual_seed(0)
    layer = InvertibleConv1x1(5).double()  # `.double()` exercises nn.Module._apply
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(8, 5, 3, 3, dtype=torch.float64)
    for _ in range(5):
        z, logdet = layer(x)
        opt.zero_grad()
        ((0.5 * z.pow(2).sum() - logdet.sum()) / x.numel()).backward()
        opt.step()
    weight, per_position = layer._weight_and_logdet()
    assert torch.allclose(per_position, torch.linalg.slogdet(weight)[1], atol=1e-10)
    z, logdet = layer(x)
    assert torch.allclose(logdet, per_position * 9 * torch.ones(8, dtype=torch.float64))
    assert torch.allclose(layer.inverse(z), x, atol=1e-10)


def test_conv_resnet_channels_last_is_the_nchw_function_in_the_default_layout() -> None:
    torch.manual_seed(0)
    fast = ConvResNet(3, 4, hidden_channels=8, num_blocks=2).double()
    plain = ConvResNet(3, 4, hidden_channels=8, num_blocks=2, channels_last=False).double()
    plain.load_state_dict(fast.state_dict())  # old NCHW checkpoints load the same way
    assert fast.stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert plain.stem.weight.is_contiguous()
    torch.nn.init.normal_(fast.out[1].weight)  # a non-zero output, so the test can fail
    plain.out[1].weight.data.copy_(fast.out[1].weight)
    x = torch.randn(5, 3, 6, 7, dtype=torch.float64, requires_grad=True)
    y_fast, y_plain = fast(x), plain(x)
    assert y_fast.is_contiguous() and y_fast.abs().max() > 0.1
    torch.testing.assert_close(y_fast, y_plain, rtol=1e-12, atol=1e-12)
    g_fast, g_plain = (torch.autograd.grad(y.square().sum(), x)[0] for y in (y_fast, y_plain))
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-12, atol=1e-12)
    assert fast(x[0]).shape == (4, 6, 7)  # unbatched input keeps working


def test_plain_and_lu_start_as_rotations() -> None:
    for lu in (True, False):
        _, logdet = InvertibleConv1x1(6, lu=lu)(torch.randn(2, 6, 4, 4))
        assert torch.allclose(logdet, torch.zeros(2), atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 4, 3), (2, 3, 3, 3), (2, 4)])
def test_conv1x1_rejects_wrong_shapes(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="InvertibleConv1x1 expects"):
        InvertibleConv1x1(4)(torch.randn(*shape))


def test_additive_coupling_is_volume_preserving_and_has_no_scale_parameter() -> None:
    layer = AffineCoupling(
        2, "checkerboard", 0, lambda i, o: ConvResNet(i, o, hidden_channels=8), additive=True
    )
    for p in layer.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(3, 2, 4, 4)
    z, logdet = layer(x)
    assert not hasattr(layer, "scale")
    assert torch.equal(logdet, torch.zeros(3))
    assert not torch.allclose(z, x)
    assert torch.allclose(layer.inverse(z), x, atol=1e-5)


@pytest.mark.parametrize("name", ["coupling", "coupling+1x1"])
def test_backbones_are_registered_and_every_parameter_gets_a_gradient(name: str) -> None:
    assert name in list_backbones()
    backbone = create_backbone(name, (1, 8, 8), **SMALL)
    flow = FlowModel(backbone, (1, 8, 8), num_levels=17)
    model = HybridModel(flow, 10, head="resflow", width=8)
    x = torch.randint(0, 17, (6, 1, 8, 8)).float()
    model.data_init(x)
    model.loss(x, torch.arange(6) % 10, "1/D")["loss"].mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    has_1x1 = any(isinstance(m, InvertibleConv1x1) for m in model.modules())
    assert has_1x1 == (name == "coupling+1x1")


def test_one_channel_images_need_a_first_squeeze() -> None:
    with pytest.raises(ValueError, match="squeeze_first"):
        create_backbone("coupling", (1, 8, 8), squeeze_first=False)


TINY_FLOWPP = {"hidden_channels": 8, "num_blocks": 1, "num_heads": 2, "num_components": 2}


@pytest.mark.parametrize(
    "name,extra",
    [
        ("coupling", {}),
        ("coupling+1x1", {}),
        ("flowpp-cpu", {}),
        (
            "flowpp-cpu",
            {
                "dequantization": "variational",
                "dequantization_args": {"hidden_channels": 8, "num_blocks": 1, "num_heads": 2},
            },
        ),
    ],
    ids=["coupling", "coupling+1x1", "flowpp-cpu", "flowpp-cpu-variational"],
)
def test_digits_hybrid_run_trains_and_reloads(name: str, extra: dict, tmp_path: Path) -> None:
    run_dir = train(
        {
            **extra,
            "dataset": "digits",
            "backbone": name,
            "backbone_args": TINY_FLOWPP if name.startswith("flowpp") else SMALL,
            "head_args": {"width": 8},
            "lam": "1/D",
            "batch_size": 128,
            "max_steps": 12,
            "warmup_steps": 2,
            "eval_every": 1,
            "log_every": 6,
            "lr": 3e-3,
            "progress": False,
            "num_threads": 1,
            "out_dir": str(tmp_path),
            "name": name.replace("+", "_"),
        }
    )
    model, cfg = load_run(run_dir)
    assert cfg["dequantization"] == extra.get("dequantization", "uniform")
    x = torch.randint(0, 17, (4, 1, 8, 8)).float()
    assert torch.isfinite(model.flow.log_prob(x)).all()
    with open(Path(run_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    evaluated = [r for r in rows if r["split"] != "train"]
    assert evaluated and all(math.isfinite(float(r["bpd"])) for r in evaluated)
    train_loss = [float(r["loss"]) for r in rows if r["split"] == "train"]
    assert train_loss[-1] < train_loss[0]


@pytest.mark.parametrize("overrides", [{"coupling": "affine"}, {"attention": False}])
def test_flowpp_ablation_variants_build_and_invert(overrides: dict) -> None:
    backbone = create_backbone("flowpp-cpu", (1, 4, 4), **TINY_FLOWPP, **overrides)
    x = torch.randn(3, 1, 4, 4)
    z, logdet = backbone(x)
    assert torch.isfinite(logdet).all()
    torch.testing.assert_close(backbone.inverse(z), x, atol=1e-5, rtol=1e-5)
    kinds = {type(m).__name__ for m in backbone.modules()}
    assert ("AffineCoupling" in kinds) == (overrides.get("coupling") == "affine")
    assert ("GatedAttention" in kinds) == overrides.get("attention", True)
    with pytest.raises(ValueError, match="coupling must be"):
        create_backbone("flowpp-cpu", (1, 4, 4), coupling="spline")
