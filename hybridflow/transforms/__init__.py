"""Invertible layers. Convention: ``forward(x) -> (z, logdet)`` maps data to latent.

Every public layer here is listed in ``__all__`` and must have a case in the conformance test
suite (``tests/test_conformance.py``), which fails for any layer that is missing.
"""

from .autoregressive import (
    InverseAutoregressiveFlow,
    MaskedAutoregressiveFlow,
    Permutation,
    autoregressive_stack,
)
from .base import (
    Inverse,
    InvertibleModule,
    InvertibleSequential,
    standard_normal_log_prob,
    sum_except_batch,
)
from .bisection import monotone_bisection
from .conv1x1 import InvertibleConv1x1
from .coupling import AffineCoupling, checkerboard_mask
from .dequantization import Sigmoid, UniformDequantization, VariationalDequantization
from .mixlogistic import (
    MixLogisticCoupling,
    mixture_inverse_cdf,
    mixture_log_cdf,
    mixture_log_pdf,
)
from .multiscale import MultiscaleFlow
from .naf import (
    NAFCoupling,
    NeuralAutoregressiveFlow,
    ddsf_num_params,
    ddsf_transform,
    dsf_num_params,
    dsf_transform,
)
from .normalization import ActNorm
from .preprocessing import LogitTransform
from .reshape import Squeeze
from .residual import InverseNotConvergedError, InverseStats, ResidualBlock

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "Inverse",
    "InverseAutoregressiveFlow",
    "InverseNotConvergedError",
    "InverseStats",
    "InvertibleConv1x1",
    "InvertibleModule",
    "InvertibleSequential",
    "LogitTransform",
    "MaskedAutoregressiveFlow",
    "MixLogisticCoupling",
    "MultiscaleFlow",
    "NAFCoupling",
    "NeuralAutoregressiveFlow",
    "Permutation",
    "ResidualBlock",
    "Sigmoid",
    "Squeeze",
    "UniformDequantization",
    "VariationalDequantization",
    "autoregressive_stack",
    "checkerboard_mask",
    "ddsf_num_params",
    "ddsf_transform",
    "dsf_num_params",
    "dsf_transform",
    "mixture_inverse_cdf",
    "mixture_log_cdf",
    "mixture_log_pdf",
    "monotone_bisection",
    "standard_normal_log_prob",
    "sum_except_batch",
]
