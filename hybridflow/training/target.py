"""Reverse-KL fitting of a flow to an unnormalized density (variational inference with flows).

:func:`fit_target` trains ``q`` by minimizing ``E_q[log q(x) − log p̃(x)] = KL(q‖p) − log Z``
with reparameterized draws ``x = T⁻¹(z)``, ``z ~ N(0, I)`` (Rezende & Mohamed 2015, "Variational
Inference with Normalizing Flows"; the IAF-style training of Huang et al. 2018, §5). It shares
:func:`~hybridflow.training.fit_density`'s conventions (timm optimizer, warmup + cosine
schedule, gradient clipping, EMA weights, non-finite steps skipped, the best evaluated EMA state
kept, Ctrl-C keeps what was reached) and adds an optional annealing of the target,
``β_t log p̃`` with β rising linearly to 1 (Rezende & Mohamed, §6.1).

:func:`target_diagnostics` measures a ``q`` against ``p̃`` from ``S`` fresh draws with
importance weights ``w = p̃(x)/q(x)``: the ELBO ``E[log w]`` (a lower bound on ``log Z``), the
importance-weighted bound ``log (1/S) Σ w`` (tighter as ``S`` grows; Burda et al. 2016), the
effective sample size of the self-normalized weights ``(Σw)² / (S Σw²)`` in (0, 1], the reverse
KL ``log Z − ELBO`` when ``log Z`` is known, and mode coverage when the modes are.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..data.energies import Target
from ..models.variational import VariationalFlow, iterative_sampling_layers
from .loop import (
    NonFiniteGuard,
    RunningMeans,
    backward_and_clip,
    create_ema,
    create_optimizer_and_scheduler,
    finalize_ema,
)

__all__ = ["TargetFit", "fit_target", "mode_coverage", "target_diagnostics"]

LogDensity = Callable[[Tensor], Tensor]


@dataclass
class TargetFit:
    """What :func:`fit_target` returns.

    Attributes:
        model: The EMA flow with the best evaluated ELBO after annealing (eval mode).
        history: One dict per evaluation: ``step``, ``loss`` (training mean of
            ``log q − β log p̃``), ``beta`` and :func:`target_diagnostics`' entries.
        best_step: Step of the kept weights.
        nan_skips: Steps skipped for a non-finite loss or gradient.
        train_time_s: Wall-clock seconds of the loop.
        interrupted: Whether the loop stopped on Ctrl-C.
        slow_sampling: Layers that sample iteratively (see
            :func:`~hybridflow.models.iterative_sampling_layers`).
    """

    model: VariationalFlow
    history: list[dict[str, float]] = field(default_factory=list)
    best_step: int = 0
    nan_skips: int = 0
    train_time_s: float = 0.0
    interrupted: bool = False
    slow_sampling: list[str] = field(default_factory=list)


def mode_coverage(x: Tensor, modes: Tensor, min_share: float | None = None) -> dict[str, Any]:
    """How many of ``K`` modes hold at least ``min_share`` of the draws (nearest mode wins).

    ``min_share`` defaults to ``1/(4K)``: a quarter of an even split, so a ``q`` that drops a
    mode, or keeps only a sliver of it, does not count it.
    """
    k = modes.shape[0]
    share = 1.0 / (4 * k) if min_share is None else min_share
    nearest = torch.cdist(x.double(), modes.to(x).double()).argmin(dim=1)
    counts = torch.bincount(nearest, minlength=k).double() / x.shape[0]
    covered = int((counts >= share).sum())
    return {"modes_covered": covered, "modes": k, "mode_shares": counts.tolist()}


@torch.no_grad()
def target_diagnostics(
    flow: VariationalFlow,
    log_p: LogDensity | Target,
    samples: int = 4096,
    log_normalizer: float | None = None,
    modes: Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int = 8192,
) -> dict[str, Any]:
    """ELBO, importance-weighted bound, ESS, reverse KL and mode coverage from ``samples`` draws.

    A :class:`~hybridflow.data.energies.Target` brings its own normalizer and modes.
    ``elbo_trimmed`` (and ``kl_reverse_trimmed``) leaves out the ``samples // 1000`` draws with
    the lowest ``log p̃ − log q``: far apart from ``elbo``, the estimate rests on a few draws in
    ``q``'s tails where ``p`` has almost no mass (a mass-covering fit's failure mode), so it is
    real but its Monte Carlo error is large.
    """
    if isinstance(log_p, Target):
        log_normalizer = log_p.log_normalizer if log_normalizer is None else log_normalizer
        modes = log_p.modes if modes is None else modes
        log_p = log_p.log_prob
    flow.eval()
    xs, log_w = [], []
    for start in range(0, samples, batch_size):
        x, log_q = flow.rsample_and_log_prob(min(batch_size, samples - start), generator=generator)
        xs.append(x)
        log_w.append(log_p(x).double() - log_q.double())
    w = torch.cat(log_w)
    finite = torch.isfinite(w)
    log_sum = torch.logsumexp(w, dim=0)
    out: dict[str, Any] = {
        "samples": samples,
        "elbo": float(w.mean()),
        "iw_bound": float(log_sum - math.log(samples)),
        "ess": float(torch.exp(2 * log_sum - torch.logsumexp(2 * w, dim=0)) / samples),
        "non_finite": int((~finite).sum()),
        "elbo_trimmed": float(w.sort().values[samples // 1000 :].mean()),
    }
    if log_normalizer is not None:
        out["kl_reverse"] = log_normalizer - out["elbo"]
        out["kl_reverse_trimmed"] = log_normalizer - out["elbo_trimmed"]
        out["log_normalizer"] = log_normalizer
    if modes is not None:
        out |= mode_coverage(torch.cat(xs), modes)
    return out


def fit_target(
    flow: VariationalFlow,
    log_p: LogDensity | Target,
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
    anneal_steps: int = 0,
    eval_every: int = 250,
    eval_samples: int = 4096,
    log_normalizer: float | None = None,
    modes: Tensor | None = None,
    max_nan_skips: int = 50,
    seed: int = 0,
    callback: Callable[[int, VariationalFlow], None] | None = None,
) -> TargetFit:
    """Fit ``flow`` to ``p ∝ exp(log_p)`` by minimizing the reverse KL (see the module docstring).

    Args:
        flow: The variational flow; trained in place, the returned copy holds the kept EMA
            weights. A flow that samples iteratively (MAF, residual) works but is slow: a
            warning names its layers.
        log_p: ``[N, D] -> [N]`` unnormalized log-density, or a
            :class:`~hybridflow.data.energies.Target` (bringing its normalizer and modes).
        steps, batch_size, opt, opt_args, lr, weight_decay, warmup_steps, min_lr: Optimisation.
        grad_clip: Gradient-norm clip.
        ema_decay: EMA decay of the evaluated weights.
        anneal_steps: Steps over which β rises linearly from ``1/anneal_steps`` to 1 (0: none).
        eval_every: Steps between evaluations (:func:`target_diagnostics`).
        eval_samples: Draws per evaluation.
        log_normalizer, modes: For the reverse KL and mode coverage of the evaluations.
        max_nan_skips: Consecutive non-finite steps tolerated before raising.
        seed: Seed of the training draws and of the evaluations' draws.
        callback: Called as ``callback(step, ema_flow)`` after every evaluation (e.g. to
            record a forward KL on samples of ``p``).
    """
    if steps < 1 or batch_size < 1 or eval_every < 1 or eval_samples < 1 or anneal_steps < 0:
        raise ValueError(
            "fit_target needs steps, batch_size, eval_every and eval_samples >= 1 and "
            f"anneal_steps >= 0; got {steps}, {batch_size}, {eval_every}, {eval_samples}, "
            f"{anneal_steps}"
        )
    target_log_p = log_p.log_prob if isinstance(log_p, Target) else log_p
    if isinstance(log_p, Target):
        log_normalizer = log_p.log_normalizer if log_normalizer is None else log_normalizer
        modes = log_p.modes if modes is None else modes
    slow = iterative_sampling_layers(flow.transform)
    if slow:
        warnings.warn(
            "this flow samples iteratively (" + ", ".join(slow) + "): every reverse-KL step "
            "solves its inverse, which is slow; IAF, IAF-DSF and coupling flows sample in one "
            "pass",
            RuntimeWarning,
            stacklevel=2,
        )
    flow.train()
    optimizer, scheduler = create_optimizer_and_scheduler(
        flow,
        opt=opt,
        lr=lr,
        weight_decay=weight_decay,
        total_steps=steps,
        warmup_steps=warmup_steps,
        min_lr=min_lr,
        warmup_lr_init=lr / 100,
        opt_args=opt_args,
    )
    ema = create_ema(flow, decay=ema_decay, use_warmup=True)
    gen = torch.Generator(device=next(flow.parameters()).device).manual_seed(seed)
    fit = TargetFit(model=ema.module, slow_sampling=slow)
    guard = NonFiniteGuard(max_nan_skips, "lower lr or anneal the target (anneal_steps)")
    best_elbo, best_state, running = -math.inf, None, RunningMeans()
    start, step = time.time(), 0
    try:
        while step < steps:
            beta = min(1.0, (step + 1) / anneal_steps) if anneal_steps else 1.0
            x, log_q = flow.rsample_and_log_prob(batch_size, generator=gen)
            loss = (log_q - beta * target_log_p(x)).mean()
            finite = backward_and_clip(loss, flow, optimizer, grad_clip)
            guard.record(finite, step)
            fit.nan_skips = guard.skipped
            if not finite:
                continue
            optimizer.step()
            ema.update(flow, step=step)
            step += 1
            scheduler.step_update(step)
            running.add("loss", loss)
            if step % eval_every == 0 or step == steps:
                model = finalize_ema(ema.module)
                eval_gen = torch.Generator(device=gen.device).manual_seed(seed + 1)
                diag = target_diagnostics(
                    model, target_log_p, eval_samples, log_normalizer, modes, eval_gen
                )
                fit.history.append(
                    {"step": step, "loss": running.means()["loss"], "beta": beta, **diag}
                )
                running = RunningMeans()
                if callback is not None:
                    callback(step, model)
                flow.train()
                if beta == 1.0 and diag["elbo"] > best_elbo:
                    best_elbo, fit.best_step = diag["elbo"], step
                    best_state = copy.deepcopy(ema.module.state_dict())
    except KeyboardInterrupt:
        fit.interrupted = True
    fit.train_time_s = time.time() - start
    if best_state is not None:
        ema.module.load_state_dict(best_state)
    else:
        fit.best_step = step
    fit.model = finalize_ema(ema.module)
    fit.model.eval()
    return fit
