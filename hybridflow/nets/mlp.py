"""Fully connected conditioners for flows on vectors."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["MLP"]


class MLP(nn.Module):
    """Multilayer perceptron with ReLU activations and a zero-initialised output layer.

    Args:
        in_features: Input size.
        out_features: Output size.
        hidden_features: Width of each hidden layer.
        num_layers: Number of hidden layers.
        zero_init: Zero the last layer so couplings start as the identity.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        hidden_features: int = 64,
        num_layers: int = 2,
        zero_init: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_features), nn.ReLU()]
            width = hidden_features
        last = nn.Linear(width, out_features)
        if zero_init:
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        self.net = nn.Sequential(*layers, last)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)
