"""Two-dimensional toy densities for flow experiments.

Every density lives roughly in ``[-3, 3]^2``. The layouts are fixed here so that results
are comparable across runs and reports:

* ``8gaussians`` — 8 isotropic Gaussians, std 0.2, centred on a circle of radius 2 at angles
  ``k * pi / 4`` (k = 0..7), equal weights. Label = component index (0..7).
* ``grid`` — the "grid of Gaussians" of Huang et al. (2018), laid out as a 5 x 5 grid of
  isotropic Gaussians, std 0.1, centred at ``{-2, -1, 0, 1, 2}^2``, equal weights.
  Label = component index ``5 * row + column`` (0..24).
* ``checkerboard`` — uniform on the 8 "black" unit squares of a 4 x 4 board covering
  ``[-2, 2)^2``: square ``(i, j)`` (lower-left corner ``(-2 + i, -2 + j)``) is black when
  ``i + j`` is even. Density ``1/8`` on the black squares, 0 elsewhere. Label = square index.
* ``moons`` — two interleaving half circles of radius 1.5 (the unit-radius moons shifted by
  ``(-0.5, -0.25)`` and scaled by 1.5) plus Gaussian noise of std 0.1. Label = moon (0/1).
* ``rings`` — 4 concentric circles of radii 0.5, 1, 1.5, 2 with isotropic Gaussian noise of
  std 0.08; a ring is chosen with probability proportional to its radius so points are
  equally dense along every ring. Label = ring index (0..3).
* ``spirals`` — two interleaved Archimedean spirals (3 half turns, outer radius 2; the second
  is the first rotated by pi) plus Gaussian noise of std 0.08; points are uniform along arc
  length. Label = arm (0/1).

:func:`toy_log_density` is exact for the Gaussian mixtures and the checkerboard; the others
have no closed form and raise :class:`NotImplementedError`.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from hybridflow.data.common import SPLITS, PointDataset, check_split, unknown_dataset_error

__all__ = [
    "EIGHT_GAUSSIANS_RADIUS",
    "EIGHT_GAUSSIANS_STD",
    "GRID_SIZE",
    "GRID_STD",
    "SPLITS",
    "TOY_DATASETS",
    "TOY_SPLIT_SIZES",
    "PointDataset",
    "ToyDataset",
    "check_split",
    "make_toy_dataset",
    "sample_toy",
    "toy_log_density",
]

TOY_DATASETS: tuple[str, ...] = ("8gaussians", "checkerboard", "grid", "moons", "rings", "spirals")
# Fixed sizes so that toy results do not depend on val_fraction or on the machine.
TOY_SPLIT_SIZES: dict[str, int] = {"train": 20_000, "val": 2_000, "test": 10_000}

EIGHT_GAUSSIANS_RADIUS = 2.0
EIGHT_GAUSSIANS_STD = 0.2
GRID_SIZE = 5
GRID_STD = 0.1
_MOONS_SCALE = 1.5
_MOONS_NOISE = 0.1
_RING_RADII = (0.5, 1.0, 1.5, 2.0)
_RINGS_NOISE = 0.08
_SPIRAL_TURNS = 1.5  # full turns, i.e. 3 half turns
_SPIRAL_RADIUS = 2.0
_SPIRALS_NOISE = 0.08
_NUM_CLASSES: dict[str, int] = {
    "8gaussians": 8,
    "checkerboard": 8,
    "grid": GRID_SIZE * GRID_SIZE,
    "moons": 2,
    "rings": len(_RING_RADII),
    "spirals": 2,
}


def _toy_name(name: str) -> str:
    """Strip an optional ``toy:`` prefix and validate the toy name."""
    prefixed = name.startswith("toy:")
    short = name[4:] if prefixed else name
    if short not in TOY_DATASETS:
        valid = [f"toy:{t}" for t in TOY_DATASETS]
        # Suggest in the form the caller used: "moon" -> "moons", "toy:moon" -> "toy:moons".
        candidates = valid if prefixed else TOY_DATASETS
        raise unknown_dataset_error(name, valid, candidates=candidates, kind="toy dataset")
    return short


def _mixture(name: str) -> tuple[Tensor, float]:
    """Centres (K x 2) and common std of a Gaussian-mixture toy."""
    if name == "8gaussians":
        angles = torch.arange(8, dtype=torch.float64) * (math.pi / 4)
        centres = EIGHT_GAUSSIANS_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)
        return centres, EIGHT_GAUSSIANS_STD
    if name == "grid":
        ticks = torch.linspace(-2.0, 2.0, GRID_SIZE, dtype=torch.float64)
        rows, cols = torch.meshgrid(ticks, ticks, indexing="ij")
        # Component index 5 * row + column; row is the y coordinate, column the x coordinate.
        return torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=1), GRID_STD
    raise NotImplementedError(name)


def _checker_corners() -> Tensor:
    """Lower-left corners (8 x 2) of the black squares of the checkerboard."""
    corners = [(-2.0 + i, -2.0 + j) for j in range(4) for i in range(4) if (i + j) % 2 == 0]
    return torch.tensor(corners, dtype=torch.float64)


def sample_toy(name: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Draw ``n`` points from a toy density.

    Args:
        name: Toy name, with or without the ``toy:`` prefix (see module docstring).
        n: Number of points (>= 0).
        generator: Source of randomness; points are created on its device.

    Returns:
        ``(points, labels)``: float32 ``n x 2`` and int64 ``n`` (component index).
    """
    short = _toy_name(name)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = generator
    dev = g.device
    f64 = {"dtype": torch.float64, "device": dev}
    if short in ("8gaussians", "grid"):
        centres, std = _mixture(short)
        labels = torch.randint(len(centres), (n,), generator=g, device=dev)
        points = centres.to(dev)[labels] + std * torch.randn(n, 2, generator=g, **f64)
    elif short == "checkerboard":
        corners = _checker_corners().to(dev)
        labels = torch.randint(len(corners), (n,), generator=g, device=dev)
        points = corners[labels] + torch.rand(n, 2, generator=g, **f64)
    elif short == "moons":
        labels = torch.randint(2, (n,), generator=g, device=dev)
        t = math.pi * torch.rand(n, generator=g, **f64)
        upper = torch.stack([t.cos(), t.sin()], dim=1)
        lower = torch.stack([1.0 - t.cos(), 0.5 - t.sin()], dim=1)
        base = torch.where(labels[:, None] == 0, upper, lower)
        shift = torch.tensor([0.5, 0.25], **f64)
        points = (base - shift) * _MOONS_SCALE
        points = points + _MOONS_NOISE * torch.randn(n, 2, generator=g, **f64)
    elif short == "rings":
        radii = torch.tensor(_RING_RADII, **f64)
        if n == 0:
            labels = torch.zeros(0, dtype=torch.int64, device=dev)
        else:
            # Weight rings by circumference so that points are equally dense on every ring.
            labels = torch.multinomial(radii / radii.sum(), n, replacement=True, generator=g)
        angle = 2 * math.pi * torch.rand(n, generator=g, **f64)
        r = radii[labels][:, None]
        points = r * torch.stack([angle.cos(), angle.sin()], dim=1)
        points = points + _RINGS_NOISE * torch.randn(n, 2, generator=g, **f64)
    else:  # spirals
        labels = torch.randint(2, (n,), generator=g, device=dev)
        t_max = 2 * math.pi * _SPIRAL_TURNS
        # Arc length of r ∝ t grows like t^2, so t = sqrt(u) * t_max is uniform along the arc.
        t = t_max * torch.rand(n, generator=g, **f64).sqrt()
        r = _SPIRAL_RADIUS * t / t_max
        angle = t + math.pi * labels.to(torch.float64)
        points = r[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)
        points = points + _SPIRALS_NOISE * torch.randn(n, 2, generator=g, **f64)
    return points.to(torch.float32), labels.to(torch.int64)


def toy_log_density(name: str, points: Tensor) -> Tensor:
    """Exact log-density of a toy distribution at ``points`` (shape ``... x 2``).

    Available for ``8gaussians``, ``grid`` (Gaussian mixtures) and ``checkerboard`` (uniform
    on its squares; ``-inf`` off the support). Other toys raise ``NotImplementedError``.
    """
    short = _toy_name(name)
    if points.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2), got {tuple(points.shape)}")
    dtype = points.dtype if points.is_floating_point() else torch.float32
    x = points.to(dtype)
    if short in ("8gaussians", "grid"):
        centres, std = _mixture(short)
        centres = centres.to(device=x.device, dtype=dtype)
        sq = ((x[..., None, :] - centres) ** 2).sum(dim=-1)
        log_comp = -sq / (2 * std**2) - math.log(2 * math.pi * std**2)
        return torch.logsumexp(log_comp, dim=-1) - math.log(len(centres))
    if short == "checkerboard":
        cell = torch.floor(x + 2.0)
        inside = ((cell >= 0) & (cell <= 3)).all(dim=-1)
        black = cell.sum(dim=-1).remainder(2) == 0
        log_p = torch.full(x.shape[:-1], -math.log(8.0), dtype=dtype, device=x.device)
        return log_p.masked_fill(~(inside & black), -math.inf)
    raise NotImplementedError(
        f"toy:{short} has no closed-form density; toy_log_density is exact only for "
        "toy:8gaussians, toy:grid and toy:checkerboard"
    )


def _split_seed(name: str, split: str, seed: int) -> int:
    """A 63-bit seed unique to (toy, split, seed), identical on every machine."""
    digest = hashlib.sha256(f"hybridflow/toy/{name}/{split}/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class ToyDataset(PointDataset):
    """Points of a 2-D toy density (see :class:`PointDataset`; ``name`` e.g. ``"toy:moons"``,
    labels are mixture components or arms)."""

    def __init__(
        self, points: Tensor, labels: Tensor, *, name: str, split: str, num_classes: int
    ) -> None:
        if points.ndim != 2 or points.shape[1] != 2:
            raise ValueError(f"points must be float32 N x 2, got {points.dtype} {points.shape}")
        super().__init__(points, labels, name=name, split=split, num_classes=num_classes)


def make_toy_dataset(name: str, split: str = "train", seed: int = 0) -> ToyDataset:
    """Build the fixed-size toy dataset ``name`` for ``split``.

    Sizes are train 20,000 / val 2,000 / test 10,000; ``all`` concatenates the three. Each split
    comes from its own generator seeded from ``(name, split, seed)``, so splits are independent
    and reproducible across machines.
    """
    short = _toy_name(name)
    check_split(split)
    parts = list(TOY_SPLIT_SIZES) if split == "all" else [split]
    points, labels = [], []
    for part in parts:
        gen = torch.Generator().manual_seed(_split_seed(short, part, seed))
        p, y = sample_toy(short, TOY_SPLIT_SIZES[part], gen)
        points.append(p)
        labels.append(y)
    return ToyDataset(
        torch.cat(points),
        torch.cat(labels),
        name=f"toy:{short}",
        split=split,
        num_classes=_NUM_CLASSES[short],
    )
