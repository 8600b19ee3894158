"""Conditioner networks: the non-invertible nets that parametrize invertible layers."""

from .conv import ConvResNet, ResidualConvBlock
from .mlp import MLP

__all__ = ["MLP", "ConvResNet", "ResidualConvBlock"]
