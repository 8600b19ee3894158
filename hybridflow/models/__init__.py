"""Flow density models, backbones (registered by name), classifier heads and the hybrid model."""

from . import autoregressive, coupling, flowpp, naf, realnvp, resflow  # noqa: F401  (register the backbones)
from .estimators import logdet_settings, residual_blocks
from .factory import create_hybrid_model
from .flow import FlowModel, standard_normal_log_prob
from .heads import DIGHead, ResidualFlowsHead, create_head, head_keywords, list_heads
from .hybrid import HybridModel, HybridOutput
from .lam import Lambda, resolve_lambda
from .registry import backbone_keywords, create_backbone, list_backbones, register_backbone
from .vae import POSTERIORS, FlowVAE
from .variational import VariationalFlow, iaf_flow, iterative_sampling_layers

__all__ = [
    "POSTERIORS",
    "DIGHead",
    "FlowModel",
    "FlowVAE",
    "HybridModel",
    "HybridOutput",
    "Lambda",
    "ResidualFlowsHead",
    "VariationalFlow",
    "backbone_keywords",
    "create_backbone",
    "create_head",
    "create_hybrid_model",
    "head_keywords",
    "iaf_flow",
    "iterative_sampling_layers",
    "list_backbones",
    "list_heads",
    "logdet_settings",
    "register_backbone",
    "residual_blocks",
    "resolve_lambda",
    "standard_normal_log_prob",
]
