"""The Flow++ conditioner: gated convolutions and gated self-attention (Ho et al. 2019, §3.3).

Each block is ``x ← LN(x + GatedConv(x))`` then ``x ← LN(x + GatedAttention(x))``. Convolutions
are weight-normalized (Salimans & Kingma 2016) with data-dependent initialization on the first
training forward, like :class:`~hybridflow.transforms.ActNorm`; nonlinearities are concat-ELU;
gates are GLUs. The output convolution starts at zero so a coupling built on this net starts as
the identity.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import weight_norm

from .datainit import DataInitFlag

__all__ = ["FlowppConditioner", "GatedAttention", "GatedConv", "WNConv2d", "concat_elu"]


def concat_elu(x: Tensor) -> Tensor:
    """ELU of ``[x, −x]`` along channels: keeps both signs' information (PixelCNN++)."""
    return F.elu(torch.cat([x, -x], dim=1))


class WNConv2d(DataInitFlag):
    """Weight-normalized ``Conv2d`` whose first training forward sets the per-channel gain and
    bias so the outputs on that batch have zero mean and unit variance (Salimans & Kingma 2016).

    Args:
        in_channels, out_channels, kernel_size: As in ``nn.Conv2d`` ("same" padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.conv = weight_norm(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        )
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def _data_init(self, x: Tensor) -> None:
        gain = self.conv.parametrizations.weight.original0
        gain.fill_(1.0)
        self.conv.bias.zero_()
        out = self.conv(x).transpose(0, 1).flatten(1)
        mean, std = out.mean(dim=1), out.std(dim=1) + 1e-6
        gain.copy_((1.0 / std).view_as(gain))
        self.conv.bias.copy_(-mean / std)
        self._mark_initialized()

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self._init_pending():
            self._data_init(x)
        return self.conv(x)


class GatedConv(nn.Module):
    """Residual branch ``GLU(conv(dropout(concat_elu(conv(concat_elu(x))))))``.

    Args:
        channels: Input and output channels.
        dropout: Dropout probability between the convolutions.
    """

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv_in = WNConv2d(2 * channels, channels, 3)
        self.dropout = nn.Dropout(dropout)
        self.conv_gate = WNConv2d(2 * channels, 2 * channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(concat_elu(self.conv_in(concat_elu(x))))
        return F.glu(self.conv_gate(h), dim=1)


class GatedAttention(nn.Module):
    """Multi-head self-attention over all positions, gated by a GLU (Flow++ §3.3).

    Queries, keys and values are a 1×1 projection of ``x + position``; the attention output goes
    through a 1×1 projection to ``2C`` channels and a GLU. The positional encoding is passed in
    by the caller, so one encoding can serve every block of a conditioner, as in the paper.

    Args:
        channels: Channels; must be divisible by ``num_heads``.
        num_heads: Attention heads.
        dropout: Dropout on the attention weights.
    """

    def __init__(self, channels: int, num_heads: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.dropout = num_heads, dropout
        self.qkv = WNConv2d(channels, 3 * channels, 1)
        self.gate = WNConv2d(channels, 2 * channels, 1)

    def forward(self, x: Tensor, position: Tensor) -> Tensor:
        n, c, h, w = x.shape
        if tuple(position.shape[1:]) != (c, h, w):
            raise ValueError(
                f"positional encoding of shape {tuple(position.shape)} does not fit inputs "
                f"{tuple(x.shape)}"
            )
        qkv = self.qkv(x + position)
        # [N, 3C, H, W] -> three [N, heads, HW, C/heads]
        q, k, v = (
            qkv.view(n, 3, self.num_heads, c // self.num_heads, h * w).transpose(-1, -2).unbind(1)
        )
        drop = self.dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        att = att.transpose(-1, -2).reshape(n, c, h, w)
        return F.glu(self.gate(att), dim=1)


class _ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of every position of ``[N, C, H, W]`` maps."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FlowppConditioner(nn.Module):
    """Flow++ conv-attention stack mapping ``[N, C_in, H, W]`` to ``[N, C_out, H, W]``.

    Args:
        in_channels: Input channels.
        out_channels: Output channels (e.g. the coupling's pseudo-parameters).
        input_size: Spatial size ``(H, W)``.
        hidden_channels: Width of the stack (96 for CIFAR-10 in the paper).
        num_blocks: Gated conv(+attention) blocks (10 for CIFAR-10).
        num_heads: Attention heads (4 in the paper).
        attention: Include the self-attention sub-blocks.
        dropout: Dropout (0.2 for CIFAR-10).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        input_size: tuple[int, int],
        hidden_channels: int = 96,
        num_blocks: int = 10,
        num_heads: int = 4,
        attention: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.input_size = tuple(input_size)
        self.conv_in = WNConv2d(in_channels, hidden_channels, 3)
        # One learned positional encoding shared by every attention block (as in the paper).
        self.position = (
            nn.Parameter(0.01 * torch.randn(1, hidden_channels, *input_size)) if attention else None
        )
        self.blocks = nn.ModuleList()
        for _ in range(num_blocks):
            block = nn.ModuleDict(
                {
                    "conv": GatedConv(hidden_channels, dropout),
                    "conv_norm": _ChannelLayerNorm(hidden_channels),
                }
            )
            if attention:
                block["attention"] = GatedAttention(hidden_channels, num_heads, dropout)
                block["attention_norm"] = _ChannelLayerNorm(hidden_channels)
            self.blocks.append(block)
        # Zero output: couplings start as the identity (Flow++ and Glow both do this).
        self.conv_out = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.position is not None and tuple(x.shape[2:]) != self.input_size:
            raise ValueError(
                f"FlowppConditioner was built for {self.input_size} inputs, got "
                f"{tuple(x.shape[2:])}"
            )
        h = self.conv_in(x)
        for block in self.blocks:
            h = block["conv_norm"](h + block["conv"](h))
            if "attention" in block:
                h = block["attention_norm"](h + block["attention"](h, self.position))
        return self.conv_out(h)
