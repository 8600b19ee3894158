"""What the training loop feeds the model: the seeded batch order of each epoch and the
train-only input transforms (random shifts, level perturbation)."""

from __future__ import annotations

import torch

__all__ = [
    "check_perturb_rate",
    "draw_perturbation",
    "draw_shifts",
    "epoch_batches",
    "perturb_levels",
    "random_shift",
]


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of one epoch: a seeded permutation, so a resumed epoch replays its order.

    The ragged last batch is dropped, so every step sees a full batch. A data-parallel run takes
    each rank's contiguous share of every batch, so the global batches are the same for any
    number of processes.
    """
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(n // batch_size)]


def draw_shifts(n: int, max_shift: int) -> torch.Tensor:
    """Offsets of :func:`random_shift` for ``n`` images: ``[2, n, 1]`` (rows, columns) from the
    global torch RNG."""
    return torch.randint(0, 2 * max_shift + 1, (2, n, 1))


def random_shift(
    x: torch.Tensor, max_shift: int, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """Translate each image by a random offset in ``[-max_shift, max_shift]²``, filling with 0.

    Level 0 is the background of digit-like data, so the fill adds no new pixel values.
    Uses the global torch RNG, whose state checkpoints carry, so resumed runs replay it, unless
    ``offsets`` (from :func:`draw_shifts`) are given.
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    dy, dx = draw_shifts(n, max_shift) if offsets is None else offsets
    rows = (dy + torch.arange(h))[:, :, None]  # [n, h, 1]
    cols = (dx + torch.arange(w))[:, None, :]  # [n, 1, w]
    # Advanced indexing gathers every crop at once: [n, h, w, C] -> [n, C, h, w].
    return padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols].permute(
        0, 3, 1, 2
    )


def check_perturb_rate(rate: float) -> None:
    """Refuse a perturbation probability outside ``[0, 1)``."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"perturb_rate must lie in [0, 1), got {rate}")


def draw_perturbation(
    shape: torch.Size | tuple[int, ...],
    rate: float,
    num_levels: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws of :func:`perturb_levels` for inputs of ``shape``: which entries to replace, and
    by which level."""
    replace = torch.rand(shape, generator=generator) < rate
    return replace, torch.randint(0, num_levels, shape, generator=generator)


def perturb_levels(
    x: torch.Tensor,
    rate: float,
    num_levels: int,
    generator: torch.Generator | None = None,
    draws: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Replace each entry of ``x`` by a uniform random level in ``[0, num_levels)`` w.p. ``rate``.

    The input perturbation of the background model in Ren et al. 2019, "Likelihood Ratios for
    Out-of-Distribution Detection" (§4): the perturbed data keep the population-level background
    statistics but lose semantic structure. Uses the global torch RNG unless ``generator`` or
    ``draws`` (from :func:`draw_perturbation`) are given.
    """
    check_perturb_rate(rate)
    if rate == 0.0:
        return x
    replace, levels = (
        draw_perturbation(x.shape, rate, num_levels, generator) if draws is None else draws
    )
    return torch.where(replace.to(x.device), levels.to(x.dtype).to(x.device), x)
