"""Plain maximum-likelihood fitting of a flow to continuous data (toy and tabular densities).

The hybrid trainer (:func:`hybridflow.training.train`) always adds a classification term; density
benchmarks such as the UCI sets of Papamakarios et al. (2017) and the toy grids of Huang et al.
(2018) are pure density estimation. :func:`fit_density` is that loop: timm optimizer, warmup +
cosine schedule, EMA weights, non-finite steps skipped, and the EMA state with the best
validation log-likelihood kept (early stopping as in the MAF and NAF papers).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from .trainer import TrainingDivergedError

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
) -> DensityFit:
    """Fit ``model`` (anything with ``log_prob(x) -> [N]``, e.g. a FlowModel) by maximum likelihood.

    Args:
        model: The density model; trained in place, the returned copy holds the kept EMA weights.
        train_points: ``[N, ...]`` training data.
        val_points: Validation data for model selection; ``None`` keeps the final EMA weights.
        steps, batch_size, opt, lr, weight_decay, warmup_steps, min_lr: Optimisation (timm).
        grad_clip: Gradient-norm clip.
        ema_decay: EMA decay of the evaluated weights.
        eval_every: Steps between validations.
        patience: Stop after this many validations without improvement (``None``: never).
        max_nan_skips: Consecutive non-finite steps tolerated before raising.
        seed: Seed of the batch order.
    """
    if len(train_points) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} training points")
    param = next(model.parameters())
    train_points = train_points.to(param)
    model.train()
    if hasattr(model, "data_init"):
        model.data_init(train_points[:batch_size])
    optimizer = create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=steps,
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=lr / 100,
        t_in_epochs=False,  # scheduled per optimizer step
    )
    ema = ModelEmaV3(model, decay=ema_decay, use_warmup=True)
    gen = torch.Generator().manual_seed(seed)
    fit = DensityFit(model=ema.module)
    best_ll, best_state, stale, in_a_row, running = -math.inf, None, 0, 0, []
    start = time.time()
    step = 0
    try:
        while step < steps:
            for idx in torch.randperm(len(train_points), generator=gen).split(batch_size):
                if len(idx) < batch_size or step >= steps:
                    break
                loss = -model.log_prob(train_points[idx]).mean()
                optimizer.zero_grad(set_to_none=True)
                if torch.isfinite(loss):
                    loss.backward()
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
                finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(norm))
                if not finite:
                    fit.nan_skips += 1
                    in_a_row += 1
                    if in_a_row > max_nan_skips:
                        raise TrainingDivergedError(
                            f"{in_a_row} non-finite steps in a row at step {step}: lower lr"
                        )
                    continue
                in_a_row = 0
                optimizer.step()
                ema.update(model, step=step)
                step += 1
                scheduler.step_update(step)
                running.append(loss.item())
                if val_points is not None and (step % eval_every == 0 or step == steps):
                    val_ll, _ = evaluate_log_likelihood(ema.module, val_points)
                    fit.history.append(
                        {"step": step, "train_nll": sum(running) / len(running), "val_ll": val_ll}
                    )
                    running = []
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
    fit.model = ema.module.eval()
    return fit
