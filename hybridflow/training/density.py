"""Plain maximum-likelihood fitting of a flow to continuous data (toy and tabular densities).

The hybrid trainer (:func:`hybridflow.training.train`) always adds a classification term; density
benchmarks such as the UCI sets of Papamakarios et al. (2017) and the toy grids of Huang et al.
(2018) are pure density estimation. :func:`fit_density` is that loop: timm optimizer, warmup +
cosine schedule, EMA weights, non-finite steps skipped, and the EMA state with the best
validation log-likelihood kept (early stopping as in the MAF and NAF papers). It shares the
trainer's pieces (:mod:`hybridflow.training.loop`), the EMA finalize step included.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .loop import (
    NonFiniteGuard,
    RunningMeans,
    backward_and_clip,
    create_ema,
    create_optimizer_and_scheduler,
    finalize_ema,
)

__all__ = ["DensityFit", "evaluate_log_likelihood", "fit_density"]


@dataclass
class DensityFit:
    """What :func:`fit_density` returns.

    Attributes:
        model: The EMA model with the best validation log-likelihood (eval mode).
        history: One dict per evaluation: ``step``, ``train_nll``, ``val_ll`` (nats/example).
        best_step: Step of the kept weights.
        nan_skips: Steps skipped for a non-finite loss or gradient.
        train_time_s: Wall-clock seconds of the loop.
        interrupted: Whether the loop stopped on Ctrl-C (the best weights so far are kept).
    """

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    nan_skips: int = 0
    train_time_s: float = 0.0
    interrupted: bool = False


@torch.no_grad()
def evaluate_log_likelihood(
    model: nn.Module, points: Tensor, batch_size: int = 4096
) -> tuple[float, float]:
    """Mean per-example log-likelihood (nats) of ``points`` and its standard error."""
    model.eval()
    param = next(model.parameters())
    values = torch.cat(
        [
            model.log_prob(points[i : i + batch_size].to(param)).double().cpu()
            for i in range(0, len(points), batch_size)
        ]
    )
    se = values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return values.mean().item(), se


def fit_density(
    model: nn.Module,
    train_points: Tensor,
    val_points: Tensor | None = None,
    *,
    steps: int = 5000,
    batch_size: int = 256,
    opt: str = "adamw",
    opt_args: Mapping[str, Any] | None = None,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    warmup_steps: int = 100,
    min_lr: float = 1e-5,
    grad_clip: float = 10.0,
    ema_decay: float = 0.999,
    eval_every: int = 250,
    patience: int | None = None,
    max_nan_skips: int = 50,
    seed: int = 0,
    callback: Callable[[int, nn.Module], None] | None = None,
) -> DensityFit:
    """Fit ``model`` (anything with ``log_prob(x) -> [N]``, e.g. a FlowModel) by maximum likelihood.

    Args:
        model: The density model; trained in place, the returned copy holds the kept EMA weights.
        train_points: ``[N, ...]`` training data.
        val_points: Validation data for model selection; ``None`` keeps the final EMA weights.
        steps, batch_size, opt, lr, weight_decay, warmup_steps, min_lr: Optimisation (timm).
        opt_args: Further optimizer keywords, e.g. ``{"betas": (0.9, 0.99)}``.
        grad_clip: Gradient-norm clip.
        ema_decay: EMA decay of the evaluated weights.
        eval_every: Steps between validations.
        patience: Stop after this many validations without improvement (``None``: never).
        max_nan_skips: Consecutive non-finite steps tolerated before raising.
        seed: Seed of the batch order.
        callback: Called as ``callback(step, ema_model)`` after every validation (e.g. to
            record a reverse KL against a known target).
    """
    if len(train_points) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} training points")
    param = next(model.parameters())
    train_points = train_points.to(param)
    model.train()
    if hasattr(model, "data_init"):
        model.data_init(train_points[:batch_size])
    optimizer, scheduler = create_optimizer_and_scheduler(
        model,
        opt=opt,
        lr=lr,
        weight_decay=weight_decay,
        total_steps=steps,
        warmup_steps=warmup_steps,
        min_lr=min_lr,
        warmup_lr_init=lr / 100,
        opt_args=opt_args,
    )
    ema = create_ema(model, decay=ema_decay, use_warmup=True)
    gen = torch.Generator().manual_seed(seed)
    fit = DensityFit(model=ema.module)
    guard = NonFiniteGuard(max_nan_skips, "lower lr")
    best_ll, best_state, stale, running = -math.inf, None, 0, RunningMeans()
    start = time.time()
    step = 0
    try:
        while step < steps:
            for idx in torch.randperm(len(train_points), generator=gen).split(batch_size):
                if len(idx) < batch_size or step >= steps:
                    break
                loss = -model.log_prob(train_points[idx]).mean()
                finite = backward_and_clip(loss, model, optimizer, grad_clip)
                guard.record(finite, step)
                fit.nan_skips = guard.skipped
                if not finite:
                    continue  # a skipped batch does not count as a step here
                optimizer.step()
                ema.update(model, step=step)
                step += 1
                scheduler.step_update(step)
                running.add("nll", loss)
                if val_points is not None and (step % eval_every == 0 or step == steps):
                    # Select among finalized EMA states: stale spectral-norm vectors would make
                    # the residual flows' likelihoods optimistic and the choice wrong.
                    val_ll, _ = evaluate_log_likelihood(finalize_ema(ema.module), val_points)
                    fit.history.append(
                        {"step": step, "train_nll": running.means()["nll"], "val_ll": val_ll}
                    )
                    running = RunningMeans()
                    if callback is not None:
                        callback(step, ema.module)
                    model.train()
                    if val_ll > best_ll:
                        best_ll, stale, fit.best_step = val_ll, 0, step
                        best_state = copy.deepcopy(ema.module.state_dict())
                    else:
                        stale += 1
                        if patience is not None and stale >= patience:
                            step = steps
    except KeyboardInterrupt:
        fit.interrupted = True
    fit.train_time_s = time.time() - start
    if best_state is not None:
        ema.module.load_state_dict(best_state)
    else:
        fit.best_step = step
    fit.model = finalize_ema(ema.module)
    return fit
