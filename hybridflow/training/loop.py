"""Pieces shared by the training loops (:func:`~hybridflow.training.train` and
:func:`~hybridflow.training.density.fit_density`): optimizer and schedule, the guarded backward
pass, non-finite step accounting, running statistics, the EMA finalize step and interrupts.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import Tensor, nn

from ..nets import refresh_lipschitz_layers
from ..runs.config import optimizer_keywords

__all__ = [
    "DeferredInterrupts",
    "NonFiniteGuard",
    "RunningMeans",
    "TrainingDivergedError",
    "backward_and_clip",
    "clip_gradients",
    "create_ema",
    "create_optimizer_and_scheduler",
    "finalize_ema",
]


class TrainingDivergedError(RuntimeError):
    """Raised after too many consecutive non-finite losses or gradients."""


def create_optimizer_and_scheduler(
    model: nn.Module,
    *,
    opt: str,
    lr: float,
    weight_decay: float,
    total_steps: int,
    warmup_steps: int,
    min_lr: float,
    warmup_lr_init: float,
    opt_args: Mapping[str, Any] | None = None,
) -> tuple[torch.optim.Optimizer, CosineLRScheduler]:
    """A timm optimizer and a linear-warmup + cosine schedule stepped per optimizer step.

    ``opt_args`` are further keywords of the optimizer (e.g. ``betas`` for Adam). Unless they
    choose (``foreach`` or ``fused``), an optimizer with a multi-tensor path gets
    ``foreach=True``: torch picks it on CUDA only, and on CPU the per-tensor loop it uses
    instead is slower for the same numbers, bitwise (a digits model's 100 tensors: 4.2 vs
    3.5 ms per AdamW update). ``--opt_args.fused=true`` is faster still on CPU (0.8 ms) but
    rounds differently in the last bit, so runs would no longer reproduce the committed reports
    exactly; it stays opt-in (``benchmarks/main_job.py``).
    """
    opt_args = dict(opt_args or {})
    if not {"foreach", "fused"} & set(opt_args) and "foreach" in optimizer_keywords(opt):
        opt_args["foreach"] = True
    optimizer = create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, **opt_args)
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total_steps,
        lr_min=min_lr,
        warmup_t=warmup_steps,
        warmup_lr_init=warmup_lr_init,
        t_in_epochs=False,
    )
    return optimizer, scheduler


def create_ema(model: nn.Module, decay: float, use_warmup: bool) -> ModelEmaV3:
    """timm's EMA of ``model``'s parameters; buffers are copied from ``model``, not averaged.

    The only buffers that change in training are spectral-norm power-iteration vectors, which
    :func:`finalize_ema` recomputes for the averaged weights anyway (an average of unit vectors
    is not one). Averaging parameters alone skips the ``state_dict`` walk of every step (~3 ms
    of a ~40 ms digits step on one thread), with bitwise the same averaged parameters.
    """
    return ModelEmaV3(model, decay=decay, use_warmup=use_warmup, exclude_buffers=True)


def clip_gradients(model: nn.Module, max_norm: float) -> Tensor:
    """Clip the gradient norm of ``model``'s parameters in place; return the norm before.

    ``foreach=True``: torch picks the multi-tensor kernels by default on CUDA only; on CPU
    they give the same norm (bitwise) at a fraction of the per-tensor loop's cost.
    """
    return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, foreach=True)


def backward_and_clip(
    loss: Tensor, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float
) -> bool:
    """Backpropagate ``loss`` and clip the gradient norm; whether the step may be applied.

    Returns ``False`` (with the gradients cleared) when the loss or the gradient norm is not
    finite: the caller skips the optimizer step and reports it to a :class:`NonFiniteGuard`.
    """
    optimizer.zero_grad(set_to_none=True)
    if not bool(torch.isfinite(loss)):
        return False
    loss.backward()
    grad_norm = clip_gradients(model, grad_clip)
    if not bool(torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        return False
    return True


class NonFiniteGuard:
    """Counts skipped non-finite steps and stops a run after too many in a row.

    Args:
        max_in_a_row: Consecutive skips tolerated; one more raises :class:`TrainingDivergedError`.
        hint: Advice appended to the error (what to change, where the last good state is).
    """

    def __init__(self, max_in_a_row: int, hint: str = "lower lr") -> None:
        self.max_in_a_row = max_in_a_row
        self.hint = hint
        self.skipped = 0
        self.in_a_row = 0

    def record(self, finite: bool, step: int) -> None:
        """Account for one step whose loss and gradient were (or were not) finite."""
        if finite:
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if self.in_a_row > self.max_in_a_row:
            raise TrainingDivergedError(
                f"{self.in_a_row} consecutive non-finite losses or gradients at step {step}; "
                f"{self.hint}"
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped, self.in_a_row = int(state["skipped"]), int(state["in_a_row"])


class RunningMeans:
    """Weighted means of per-step values, summed as float64 tensors on the values' device.

    Adding never reads a value back to the host; :meth:`means` does, once, at log time (on a
    GPU every ``.item()`` in the loop is a sync). Sums start at 0 and add in float64 in step
    order, exactly as Python floats would, so the logged numbers do not depend on this choice.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.weights: dict[str, Tensor] = {}
        self.steps = 0

    def add(self, name: str, value: Tensor, weight: Tensor | float = 1.0) -> None:
        """Add ``value`` (a 0-d tensor) with ``weight`` to the sums of ``name``."""
        value = value.detach().to(torch.float64)
        zero = torch.zeros((), dtype=torch.float64, device=value.device)
        self.sums[name] = self.sums.get(name, zero) + value
        self.weights[name] = self.weights.get(name, zero) + weight

    def step(self) -> None:
        """Count one applied step (the denominator of unweighted means)."""
        self.steps += 1

    def means(self) -> dict[str, float | None]:
        """Every mean (``None`` where all weights were 0), read with one host transfer."""
        names = list(self.sums)
        if not names:
            return {}
        values = torch.stack([self.sums[n] for n in names] + [self.weights[n] for n in names])
        flat = values.tolist()
        sums, weights = flat[: len(names)], flat[len(names) :]
        return {n: s / w if w else None for n, s, w in zip(names, sums, weights, strict=True)}

    def state_dict(self) -> dict[str, Any]:
        return {
            "sums": {k: v.cpu() for k, v in self.sums.items()},
            "weights": {k: v.cpu() for k, v in self.weights.items()},
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str = "cpu") -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.weights = {k: v.to(device) for k, v in state["weights"].items()}
        self.steps = int(state["steps"])


def finalize_ema(module: nn.Module) -> nn.Module:
    """Make an EMA copy ready to be evaluated, selected or saved; return it in eval mode.

    EMA averages buffers with the weights, so spectrally normalized layers carry power-iteration
    vectors that do not belong to the averaged weights: their "normalized" weights can have
    norms well above the coefficient c, and residual blocks stop being contractive (wrong
    log-dets, optimistic likelihoods). Running the iterations to convergence fixes that.
    """
    refresh_lipschitz_layers(module)
    return module.eval()


class DeferredInterrupts:
    """SIGINT and SIGTERM raise ``KeyboardInterrupt``, held back inside :meth:`deferred` blocks.

    Wrapping each step's update in ``deferred()`` makes it all or nothing: a Ctrl-C, ``kill`` or
    a scheduler's SIGTERM lands between steps, where the state is consistent and can be saved.
    Outside the main thread no handler can be installed and nothing changes.

    Args:
        hold: Never raise; only record the signal in :attr:`pending`. A data-parallel loop polls
            it and stops every rank at the same step boundary (ranks receive a signal at
            slightly different moments, and a rank leaving alone would hang the others).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, hold: bool = False) -> None:
        self.hold = hold
        self._previous: dict[int, Any] = {}
        self._depth = 0
        self._pending = False

    @property
    def pending(self) -> bool:
        """A signal arrived and has not been acted upon yet."""
        return self._pending

    def __enter__(self) -> DeferredInterrupts:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                break
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: object) -> None:
        if self._depth or self.hold:
            self._pending = True
        else:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Hold interrupts until the block ends, then raise the one that arrived."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._pending and not self._depth and not self.hold:
            self._pending = False
            raise KeyboardInterrupt
