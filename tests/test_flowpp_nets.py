"""Flow++ conditioner: data-dependent weight-norm init, zero-initialized output, global receptive
field through self-attention, shapes and errors."""

from __future__ import annotations

import pytest
import torch

from hybridflow.nets import FlowppConditioner, GatedAttention, WNConv2d, concat_elu


def test_concat_elu_keeps_both_signs() -> None:
    x = torch.tensor([[[[-2.0]], [[3.0]]]])
    out = concat_elu(x)
    assert out.shape == (1, 4, 1, 1)
    expected = torch.nn.functional.elu(torch.tensor([-2.0, 3.0, 2.0, -3.0]))
    assert torch.allclose(out.flatten(), expected)


def test_weight_norm_data_init_standardizes_first_batch_and_then_stays_fixed() -> None:
    torch.manual_seed(0)
    conv = WNConv2d(3, 5, 3)
    x = torch.randn(64, 3, 6, 6) * 4 + 2
    out = conv(x).detach()
    per_channel = out.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(5), atol=1e-4)
    assert torch.allclose(per_channel.std(1), torch.ones(5), atol=1e-3)
    # Later batches (and eval mode) reuse the initialization: no batch dependence.
    conv.eval()
    single = conv(x[:1])
    assert torch.allclose(single, out[:1], atol=1e-5)


def test_conditioner_starts_at_zero_output_with_gradients_to_the_output_layer() -> None:
    net = FlowppConditioner(2, 6, (4, 4), hidden_channels=8, num_blocks=2, num_heads=2)
    x = torch.randn(5, 2, 4, 4)
    out = net(x)
    assert out.shape == (5, 6, 4, 4)
    assert torch.equal(out, torch.zeros_like(out))
    out.square().add(out).sum().backward()
    assert net.conv_out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", [True, False])
def test_attention_gives_a_global_receptive_field(attention: bool) -> None:
    """With one block of 3×3 convs the corner output cannot see the opposite corner; attention
    connects every position."""
    torch.manual_seed(0)
    net = FlowppConditioner(1, 1, (8, 8), hidden_channels=8, num_blocks=1, attention=attention)
    net(torch.randn(16, 1, 8, 8))  # data-dependent init
    torch.nn.init.normal_(net.conv_out.weight, std=0.1)
    net.eval()
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    net(x)[0, 0, 0, 0].backward()
    reaches_far_corner = bool(x.grad[0, 0, -1, -1].abs() > 0)
    assert reaches_far_corner == attention


def test_attention_rejects_other_sizes_and_bad_heads() -> None:
    with pytest.raises(ValueError, match="divisible"):
        GatedAttention(6, num_heads=4)
    with pytest.raises(ValueError, match="does not fit"):
        GatedAttention(8)(torch.randn(1, 8, 5, 5), torch.zeros(1, 8, 4, 4))
    with pytest.raises(ValueError, match="built for"):
        FlowppConditioner(2, 3, (4, 4), hidden_channels=8, num_blocks=1)(torch.randn(1, 2, 5, 5))
