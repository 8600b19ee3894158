"""Flow model, hybrid model and heads: density bookkeeping, sampling, loss convention."""

from __future__ import annotations

import math

import pytest
import torch

from hybridflow.models import (
    FlowModel,
    HybridModel,
    Lambda,
    create_backbone,
    create_hybrid_model,
    list_backbones,
    resolve_lambda,
    standard_normal_log_prob,
)

SMALL = {
    "num_scales": 2,
    "couplings_per_scale": 1,
    "final_couplings": 2,
    "hidden_channels": 8,
    "num_res_blocks": 1,
}


def _flow(levels: int = 17, preprocessing: str = "logit") -> FlowModel:
    backbone = create_backbone("realnvp", (1, 4, 4), **SMALL)
    flow = FlowModel(
        backbone, (1, 4, 4), num_levels=levels, preprocessing=preprocessing, logit_alpha=0.01
    )
    flow.data_init(torch.randint(0, levels, (32, 1, 4, 4)))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return flow.eval()


def test_log_prob_is_density_on_level_scale() -> None:
    """log_prob(x; u) = log N(z) + log|det dz/dv| for v = x + u, checked by autograd."""
    flow = _flow()
    x = torch.randint(0, 17, (2, 1, 4, 4)).double()
    u = torch.rand_like(x)
    expected = []
    for i in range(2):
        v = (x[i : i + 1] + u[i : i + 1]).requires_grad_(True)

        def to_latent(v_):
            y = flow.preprocess(v_ / 17)[0]
            return flow.backbone(y)[0].reshape(-1)

        jac = torch.autograd.functional.jacobian(to_latent, v).reshape(16, 16)
        z = to_latent(v).reshape(1, -1)
        expected.append(standard_normal_log_prob(z)[0] + torch.linalg.slogdet(jac)[1])
    torch.testing.assert_close(flow.log_prob(x, dequant_noise=u), torch.stack(expected))
    bpd = flow.bits_per_dim(x, dequant_noise=u)
    torch.testing.assert_close(bpd, -torch.stack(expected) / (16 * math.log(2)))


def test_decode_inverts_encode_to_the_exact_levels() -> None:
    flow = _flow()
    x = torch.randint(0, 17, (5, 1, 4, 4)).double()
    y, _ = flow.dequantize(x)
    h, _ = flow.preprocess(y)
    z, _ = flow.backbone(h)
    torch.testing.assert_close(flow.decode(z), x)


def test_sample_gives_levels_in_range_and_checks_temperature() -> None:
    flow = _flow()
    gen = torch.Generator().manual_seed(1)
    s = flow.sample(7, temperature=0.7, generator=gen)
    assert s.shape == (7, 1, 4, 4)
    assert torch.all(s == s.round()) and s.min() >= 0 and s.max() <= 16
    with pytest.raises(ValueError, match="temperature"):
        flow.sample(2, temperature=0.0)


def test_bad_inputs_raise_clear_errors() -> None:
    flow = _flow()
    with pytest.raises(ValueError, match="shape"):
        flow.log_prob(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="integer levels"):
        flow.log_prob(torch.full((2, 1, 4, 4), 17.0))
    with pytest.raises(ValueError, match="unknown backbone"):
        create_backbone("no-such-flow", (1, 4, 4))
    with pytest.raises(ValueError, match="did you mean 'resflow'"):
        create_backbone("resflw", (1, 4, 4))
    assert "realnvp" in list_backbones()


def test_log_prob_refuses_values_that_are_not_levels() -> None:
    """Inputs that used to give a number silently: scaled images, fractions, NaN, empty."""
    flow = _flow()
    levels = torch.randint(0, 17, (3, 1, 4, 4))
    with pytest.raises(ValueError, match=r"scaled to \[0, 1\].*\(x \* 16\)\.round\(\)"):
        flow.log_prob(levels / 16.0)
    with pytest.raises(ValueError, match=r"non-integer values such as 2\.5"):
        flow.log_prob(torch.where(levels == levels[0, 0, 0, 0], 2.5, levels.double()))
    for bad in (float("nan"), float("inf")):
        x = levels.double()
        x[1, 0, 2, 3] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            flow.log_prob(x)
    with pytest.raises(ValueError, match="empty batch"):
        flow.log_prob(levels[:0])
    with pytest.raises(ValueError, match="shape"):
        flow.log_prob(torch.tensor(3.0))


def test_log_prob_takes_levels_in_any_dtype() -> None:
    """Levels are exact in every dtype: uint8, int64 and float64 give the float32 model's value."""
    flow = _flow().float()
    levels = torch.randint(0, 17, (3, 1, 4, 4))
    expected = flow.log_prob(levels.float(), dequant_noise=0.5)
    assert expected.dtype == torch.float32
    for dtype in (torch.uint8, torch.int64, torch.float64):
        torch.testing.assert_close(flow.log_prob(levels.to(dtype), dequant_noise=0.5), expected)


def _hybrid(head: str = "resflow") -> HybridModel:
    cfg = {
        "backbone": "realnvp",
        "backbone_args": SMALL,
        "head": head,
        "head_args": {"width": 8} if head == "resflow" else {},
        "logit_alpha": 0.01,
    }
    model = create_hybrid_model(cfg, (1, 4, 4), 17, 3)
    model.data_init(torch.randint(0, 17, (32, 1, 4, 4)))
    return model


@pytest.mark.parametrize("head", ["resflow", "dig"])
def test_hybrid_loss_convention(head: str) -> None:
    model = _hybrid(head).eval()
    x, y = torch.randint(0, 17, (4, 1, 4, 4)), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(3)
    terms = model.loss(x, y, "1/D")
    torch.testing.assert_close(terms["loss"], terms["ce"] + terms["nll"] / 16)
    torch.testing.assert_close(terms["bpd"], terms["nll"] / (16 * math.log(2)))
    torch.manual_seed(3)
    torch.testing.assert_close(model.loss(x, y, 0.0)["loss"], terms["ce"])
    torch.manual_seed(3)
    torch.testing.assert_close(model.loss(x, y, 1)["loss"], terms["ce"] + terms["nll"])


#: λ as given to ``HybridModel.loss`` and its weight for the 16 dimensions of a 1×4×4 input.
LAMBDA_WEIGHTS = [(0, 0.0), ("1/D", 1 / 16), (1, 1.0), (0.3, 0.3), ("0.3", 0.3)]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("head", ["resflow", "dig"])
@pytest.mark.parametrize(("lam", "weight"), LAMBDA_WEIGHTS, ids=lambda v: str(v))
def test_hybrid_loss_against_cross_entropy_and_flow_log_prob(
    head: str, lam: float | str, weight: float
) -> None:
    """Oracle: ``F.cross_entropy`` of ``model(x).logits`` and ``-model.flow.log_prob(x)``, each
    computed on its own under the same seed (so with the same dequantization noise), combined as
    CE + λ·NLL with λ written out by hand (1/D = 1/16)."""
    model = _hybrid(head).eval()
    x, y = torch.randint(0, 17, (4, 1, 4, 4)), torch.tensor([0, 1, 2, 1])
    torch.manual_seed(3)
    terms = model.loss(x, y, lam)
    torch.manual_seed(3)
    logits = model(x).logits
    torch.manual_seed(3)
    nll = -model.flow.log_prob(x)
    torch.manual_seed(4)  # the noise matters: another draw gives another NLL
    assert not torch.allclose(-model.flow.log_prob(x), nll)
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(terms["ce"], ce)
    torch.testing.assert_close(terms["nll"], nll)
    torch.testing.assert_close(terms["bpd"], nll / (16 * math.log(2)))
    torch.testing.assert_close(terms["loss"], ce + weight * nll)
    torch.testing.assert_close(terms["logits"], logits)


def test_resolve_lambda() -> None:
    assert resolve_lambda("1/D", 64) == 1 / 64
    assert resolve_lambda(" 1/d ", 64) == 1 / 64
    assert resolve_lambda("0.5", 64) == 0.5
    for bad in ("half", -1.0, float("nan")):
        with pytest.raises(ValueError, match="lambda"):
            resolve_lambda(bad, 64)


def test_lambda_is_parsed_once_into_a_value_with_its_label_slug_and_order() -> None:
    per_dim = Lambda.parse(" 1/D ")
    assert per_dim.label == "1/D" and per_dim.slug == "1overD" and per_dim.per_dimension
    assert per_dim.value(784) == 1 / 784 and Lambda.parse(per_dim) is per_dim
    assert Lambda.parse("0.5") == Lambda.parse(0.5) and Lambda.parse("1/d") == per_dim
    assert Lambda.parse("1e-3").label == "1e-3" and Lambda.parse("1e-3").value(10) == 1e-3
    assert Lambda.parse(0).is_zero and not Lambda.parse("1/D").is_zero
    spellings = ["1", "0.5", "1/D", "0", "1e-8"]
    ordered = sorted((Lambda.parse(x) for x in spellings), key=lambda lam: lam.sort_key)
    assert [str(lam) for lam in ordered] == ["0", "1/D", "1e-8", "0.5", "1"]
    for bad in (True, [1], "1/E", -0.5):
        with pytest.raises(ValueError, match="lambda"):
            Lambda.parse(bad)


def test_resflow_head_reads_every_scale_including_final_latent() -> None:
    model = _hybrid("resflow").eval()
    feats, _ = model.forward_features(torch.randint(0, 17, (3, 1, 4, 4)), dequant_noise=0.5)
    assert len(feats) == 2
    feats = [f.detach().requires_grad_(True) for f in feats]
    model.forward_head(feats).sum().backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    assert model.forward_head(feats, pre_logits=True).shape == (3, model.num_features)
    model.reset_classifier(5)
    assert model.forward_head(feats).shape == (3, 5)


def test_hybrid_eval_outputs_do_not_depend_on_batch() -> None:
    model = _hybrid().eval()
    x = torch.randint(0, 17, (6, 1, 4, 4))
    full = model(x, dequant_noise=0.5)
    one = model(x[4:5], dequant_noise=0.5)
    torch.testing.assert_close(full.logits[4:5], one.logits)
    torch.testing.assert_close(full.log_prob[4:5], one.log_prob)


def test_vector_backbone_on_continuous_data() -> None:
    cfg = {
        "backbone": "realnvp-vector",
        "backbone_args": {"num_couplings": 4, "hidden_features": 8},
        "head": "dig",
    }
    model = create_hybrid_model(cfg, (2,), None, 2)
    x = torch.randn(10, 2)
    model.data_init(x)
    out = model.eval()(x)
    assert out.logits.shape == (10, 2) and torch.isfinite(out.log_prob).all()
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match=r"expects torch.float64 inputs, got torch.float32"):
        model(torch.ones(3, 2, dtype=torch.float32))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.randn(3, 2, dtype=torch.float64)
        x[1, 0] = bad
        with pytest.raises(ValueError, match="NaN or Inf"):
            model(x)
    # Finite values whose sum overflows are valid: the one-reduction check falls back to the
    # elementwise one instead of refusing them.
    big = torch.full((3, 2), torch.finfo(torch.float64).max / 2)
    assert not torch.isfinite(big.sum())
    model(big)  # no "NaN or Inf" error (the outputs may overflow; that is the model's business)


def test_resflow_head_pooling_options() -> None:
    from hybridflow.models import ResidualFlowsHead

    shapes = [(2, 4, 4), (3, 2, 2)]
    feats = [torch.randn(5, *s) for s in shapes]
    flat = ResidualFlowsHead(shapes, 4, width=6, pool="flatten")
    assert flat.num_features == 6 * (16 + 4)
    assert flat(feats, pre_logits=True).shape == (5, 6 * 20)
    assert ResidualFlowsHead(shapes, 4, width=6)(feats, pre_logits=True).shape == (5, 12)
    with pytest.raises(ValueError, match="pool"):
        ResidualFlowsHead(shapes, 4, pool="max")
