"""When a run stops: a plateau of the validation metric it optimizes, a time budget, or its end.

A λ study compares models; a comparison of models that had not finished learning compares
budgets. The plateau rule looks at the metric the run's loss optimizes on the validation split
(bits/dim when λ > 0, the classifier's NLL when λ = 0) and stops when its best value improved by
less than ``stop_rel_improvement`` (relative) over the last quarter of the steps so far:

    improvement(s) = (best up to 0.75·s − best up to s) / |best up to 0.75·s|,

checked after every validation once :data:`MIN_VALIDATIONS` validations exist and one lies at or
before 0.75·s. ``budget_minutes`` stops at the first logged step past the budget (training time
of all sessions of a resumed run) and validates there, so the curve ends where training did.
Every run records why it stopped (:class:`StopRecord`, in ``checkpoint.pt`` and ``model.pt``);
a run is *converged* when its last-quarter improvement at the end is below the threshold, however
it stopped, and *budget-limited* otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "DEFAULT_STOP_THRESHOLD",
    "MIN_VALIDATIONS",
    "STOP_REASONS",
    "StopRecord",
    "convergence_status",
    "last_quarter_improvement",
    "monitored_metric",
    "over_budget",
    "plateau_reached",
    "record_stop",
    "still_stopped",
]

#: Validations needed before the plateau rule may fire (a quarter of fewer is no window).
MIN_VALIDATIONS = 4

#: The threshold used to call a run converged when it set none (0.5% over the last quarter).
DEFAULT_STOP_THRESHOLD = 0.005

#: Why a run stopped: the plateau rule, the time budget, or the end of its schedule.
STOP_REASONS = ("plateau", "budget_minutes", "max_epochs", "max_steps")


def monitored_metric(lam: float) -> str:
    """The validation metric a run's loss optimizes: ``"bpd"`` when λ > 0, else the
    classifier's NLL (``"class_nll"``; accuracy moves in steps of one example)."""
    return "bpd" if lam > 0 else "class_nll"


def last_quarter_improvement(history: Sequence[tuple[int, float]], step: int) -> float | None:
    """Relative improvement of the best (lowest) value over the last quarter of ``step`` steps.

    Args:
        history: ``(step, value)`` of every validation so far, lower is better.
        step: The current step.

    Returns:
        ``None`` while fewer than :data:`MIN_VALIDATIONS` finite validations exist, none lies at
        or before ``0.75 · step``, or the latest value is not finite (a diverged run has not
        converged, whatever its best value was).
    """
    finite = [(s, v) for s, v in history if math.isfinite(v)]
    if len(finite) < MIN_VALIDATIONS or not math.isfinite(history[-1][1]):
        return None
    cut = 0.75 * step
    before = [v for s, v in finite if s <= cut]
    if not before:
        return None
    best_before = min(before)
    best_now = min(v for _, v in finite)
    return (best_before - best_now) / max(abs(best_before), 1e-12)


def convergence_status(improvement: float | None, threshold: float | None) -> str:
    """``"converged"`` when the last-quarter improvement is below the threshold (the run's own,
    else :data:`DEFAULT_STOP_THRESHOLD`), ``"budget-limited"`` when not, ``"unknown"`` without
    enough validations to tell."""
    if improvement is None:
        return "unknown"
    limit = DEFAULT_STOP_THRESHOLD if threshold is None else threshold
    return "converged" if improvement < limit else "budget-limited"


@dataclass(frozen=True)
class StopRecord:
    """Why and where a run stopped.

    Attributes:
        reason: One of :data:`STOP_REASONS`.
        step: The step it stopped at.
        elapsed_s: Training time then (all sessions).
        metric: The monitored validation metric (:func:`monitored_metric`).
        improvement: Its last-quarter relative improvement at the end (``None``: too few
            validations).
        threshold: The plateau rule's threshold (``None``: the rule was off).
        status: :func:`convergence_status` of the two.
    """

    reason: str
    step: int
    elapsed_s: float
    metric: str
    improvement: float | None
    threshold: float | None
    status: str

    @classmethod
    def make(
        cls,
        reason: str,
        step: int,
        elapsed_s: float,
        metric: str,
        history: Sequence[tuple[int, float]],
        threshold: float | None,
    ) -> StopRecord:
        """The record of a stop at ``step``: the improvement and status from ``history``."""
        if reason not in STOP_REASONS:
            raise ValueError(f"unknown stop reason {reason!r}; expected one of {STOP_REASONS}")
        improvement = last_quarter_improvement(history, step)
        status = convergence_status(improvement, threshold)
        return cls(reason, step, elapsed_s, metric, improvement, threshold, status)

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for checkpoints and JSON."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StopRecord:
        """The record :meth:`to_dict` wrote."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def still_stopped(record: Mapping[str, Any], cfg: Mapping[str, Any], total_steps: int) -> bool:
    """Whether a run that stopped as ``record`` says stays stopped under ``cfg`` (resumed with a
    longer schedule, a larger budget or the plateau rule off, it trains on)."""
    reason = record["reason"]
    if reason == "plateau":
        threshold = cfg["stop_rel_improvement"]
        return (
            threshold is not None
            and record["improvement"] is not None
            and (record["improvement"] < threshold)
        )
    if reason == "budget_minutes":
        budget = cfg["budget_minutes"]
        return budget is not None and record["elapsed_s"] >= 60.0 * budget
    return record["step"] >= total_steps


# The three below take the trainer's ``TrainState`` (:mod:`.setup`), which imports this module.


def over_budget(state: Any, any_step: bool = False) -> bool:
    """Whether the run's ``budget_minutes`` are spent, checked at logged steps only (or at any
    step: where a resumed run starts); under data parallelism rank 0's clock decides for every
    rank (they must stop at the same step)."""
    budget = state.cfg["budget_minutes"]
    if budget is None or (state.step % state.cfg["log_every"] and not any_step):
        return False
    return bool(state.dist.broadcast_object(state.elapsed >= 60.0 * budget))


def plateau_reached(state: Any) -> bool:
    """Whether the plateau rule fires at the latest validation (``stop_rel_improvement``)."""
    threshold = state.cfg["stop_rel_improvement"]
    if threshold is None:
        return False
    improvement = last_quarter_improvement(state.val_history, state.step)
    return improvement is not None and improvement < threshold


def record_stop(state: Any, reason: str) -> None:
    """Set ``state.stopped`` (saved with the checkpoint and in ``model.pt``)."""
    state.stopped = StopRecord.make(
        reason,
        state.step,
        state.elapsed,
        monitored_metric(state.lam),
        state.val_history,
        state.cfg["stop_rel_improvement"],
    )
