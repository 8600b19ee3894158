"""Samples at several temperatures and reconstructions (inverse of forward) of a flow.

Reduced-temperature sampling draws ``z ~ N(0, T² I)`` (Kingma & Dhariwal 2018, "Glow", §5);
``T < 1`` trades diversity for fidelity. Reconstructions check the exact-inverse promise of the
flow on real data: ``decode(encode(x))`` must return the input levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

from ..models import FlowModel

__all__ = ["DEFAULT_TEMPERATURES", "reconstruct", "sample_at_temperatures", "save_image_grid"]

DEFAULT_TEMPERATURES = (0.5, 0.7, 0.85, 1.0)


@torch.no_grad()
def sample_at_temperatures(
    flow: FlowModel,
    temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
    n: int = 64,
    seed: int = 0,
) -> dict[float, Tensor]:
    """``n`` samples per temperature, all from the same base draws (so rows are comparable).

    Returns levels (as floats) for discrete data, continuous values otherwise, on the CPU.
    """
    if n < 1 or not temperatures:
        raise ValueError("need n >= 1 and at least one temperature")
    flow.eval()
    param = next(flow.parameters())
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, flow.dim, generator=gen, dtype=torch.float64).to(param)
    out = {}
    for t in temperatures:
        if not t > 0:
            raise ValueError(f"temperatures must be positive, got {t}")
        out[float(t)] = flow.decode(z * t).cpu()
    return out


@torch.no_grad()
def reconstruct(flow: FlowModel, x: Tensor) -> tuple[Tensor, dict[str, float]]:
    """Encode ``x`` at the bin centres and decode it again.

    Returns the reconstruction and ``max_abs_error`` (in the flow's continuous input space, after
    dequantization and preprocessing) plus, for discrete data, ``level_error_rate`` (fraction of
    entries not mapped back to their level).
    """
    flow.eval()
    param = next(flow.parameters())
    x = x.to(param)
    noise = 0.5 if flow.num_levels is not None else None
    h, _ = flow._to_flow_input(x, noise)
    z, _, _ = flow.backbone.forward_features(h)
    h_rec = flow.backbone.inverse(z)
    stats = {"max_abs_error": float((h_rec - h).abs().max())}
    x_rec = flow.decode(z)
    if flow.num_levels is not None:
        stats["level_error_rate"] = float((x_rec != x).double().mean())
    return x_rec.cpu(), stats


def save_image_grid(
    images: Tensor, path: str | Path, num_levels: int | None = None, nrow: int | None = None
) -> Path:
    """Save a batch of images ``[N, C, H, W]`` as one PNG grid (torchvision ``make_grid``).

    Levels are mapped to ``[0, 1]`` by ``/(num_levels - 1)``; continuous images are min-max scaled.
    """
    if images.dim() != 4:
        raise ValueError(f"expected images [N, C, H, W], got {tuple(images.shape)}")
    x = images.detach().float().cpu()
    if num_levels is not None:
        x = x / (num_levels - 1)
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    grid = make_grid(x.clamp(0, 1), nrow=nrow or math.ceil(math.sqrt(len(x))), padding=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    return path
