"""Conditioner networks: the non-invertible nets that parametrize invertible layers."""

from .activations import (
    LIPSCHITZ_ACTIVATIONS,
    LipELU,
    LipSoftplus,
    LipSwish,
    create_lipschitz_activation,
)
from .conv import ConvResNet, ResidualConvBlock
from .flowpp import FlowppConditioner, GatedAttention, GatedConv, WNConv2d, concat_elu
from .fused import fused_kernels_enabled, set_fused_kernels
from .lipschitz import (
    InducedNormConv2d,
    InducedNormLinear,
    LipschitzConvNet,
    LipschitzMLP,
    NormOrder,
    PowerIteration,
    SpectralNormConv2d,
    SpectralNormLinear,
    lipschitz_layers,
    refresh_lipschitz_layers,
)
from .made import MADE, MaskedLinear
from .mlp import MLP

__all__ = [
    "LIPSCHITZ_ACTIVATIONS",
    "MADE",
    "MLP",
    "ConvResNet",
    "FlowppConditioner",
    "GatedAttention",
    "GatedConv",
    "InducedNormConv2d",
    "InducedNormLinear",
    "LipELU",
    "LipSoftplus",
    "LipSwish",
    "LipschitzConvNet",
    "LipschitzMLP",
    "MaskedLinear",
    "NormOrder",
    "PowerIteration",
    "ResidualConvBlock",
    "SpectralNormConv2d",
    "SpectralNormLinear",
    "WNConv2d",
    "concat_elu",
    "create_lipschitz_activation",
    "fused_kernels_enabled",
    "lipschitz_layers",
    "refresh_lipschitz_layers",
    "set_fused_kernels",
]
