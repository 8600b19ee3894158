"""The training loop: timm optimizer, warmup + cosine schedule and EMA; CSV metrics; resumable.

A run folder holds ``config.json`` (resolved config), ``metrics.csv`` (one row per logged step or
validation), ``checkpoint.pt`` (everything needed to resume exactly: model, EMA, optimizer,
scheduler, step, RNG state, running statistics) and, at the end, ``model.pt`` (EMA weights and
config, for evaluation).

The loop is split as timm's ``train.py`` is: :func:`~.setup.setup` (:mod:`.setup`) builds a
:class:`~.setup.TrainState`,
:func:`train_one_epoch` and :func:`validate` advance it, :func:`save_training_checkpoint` and
:func:`finalize` write it, and :func:`train` strings them together. A killed run resumed from its
checkpoint ends with the same ``model.pt`` and ``metrics.csv`` (but ``elapsed_s``) as a run
never interrupted.

**Batches.** ``batch_size`` is the global batch of one optimizer step: over all processes and
all ``accum_steps`` micro-batches, so the epoch order, the schedule and the hyper-parameters
mean the same for any number of processes or micro-batches (``accum_steps`` only trades memory
for time). Batches are read from memory or through a torch ``DataLoader`` (``loader``,
:mod:`~hybridflow.training.inputs`), in the same seeded order.

**Data parallelism** (``torchrun --standalone --nproc_per_node=N -m hybridflow train ...``,
:mod:`~hybridflow.training.distributed`). Each rank trains on its contiguous share of every
global batch through DDP. Identical to one process: the ActNorm initialisation (before DDP
wraps the model), the epoch order, the random shifts, level perturbation and uniform
dequantization noise (drawn for the whole global batch on every rank from the shared stream,
then sliced), gradients (averaged by DDP), the skip decision of a non-finite step, the logged
train statistics (reduced over ranks) and the validation metrics (each rank predicts its share
of the validation batches, with the noise one process would draw, on the unwrapped EMA copy;
metrics come from the gathered predictions). Per rank, from each rank's own stream: dropout
masks, residual-flow probes and roulette draws (in training and validation) and variational
dequantization noise. Rank 0 writes ``metrics.csv``, checkpoints (with every rank's RNG states)
and ``model.pt``; the other ranks wait at barriers.

**Host synchronisation.** A step reads one value back to the host: whether its loss and
gradient norm are finite (and, under DDP, the signal and checkpoint flags all-reduced with the
step's statistics), which the skip of a non-finite step needs before the optimizer may update.
Running statistics stay on the device until a row is logged. Input checks inside the model
(the level range of the dequantizer, residual-flow term counts) read values of their own.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..evaluation import evaluate_predictions, predict
from ..evaluation.evaluate import merge_predictions
from ..models import HybridModel
from ..models.precision import autocast_context
from ..runs import (
    MODEL_FILE,
    resolve_config,
    run_dir_for,
    save_checkpoint,
)
from .batches import perturb_levels, random_shift
from .distributed import (
    init_distributed,
)
from .inputs import (
    draw_batch,
    epoch_inputs,
    to_device,
)
from .loop import (
    DeferredInterrupts,
    RunningMeans,
    TrainingDivergedError,
    clip_gradients,
    finalize_ema,
)
from .monitor import sample_grid
from .setup import TrainData, TrainState, log_row, setup
from .stopping import monitored_metric, over_budget, plateau_reached, record_stop

__all__ = [
    "TrainData",
    "TrainState",
    "TrainingDivergedError",
    "finalize",
    "perturb_levels",
    "random_shift",
    "save_training_checkpoint",
    "setup",
    "train",
    "train_one_epoch",
    "validate",
]


# --------------------------------------------------------------------------- one epoch


def _epoch_inputs(state: TrainState, epoch: int, offset: int) -> Iterator[tuple[Tensor, Tensor]]:
    """``(global batch indices, this rank's inputs)`` of the rest of the epoch."""
    return epoch_inputs(
        state.data.train_set,
        state.data.images,
        batch_size=state.cfg["batch_size"],
        seed=state.cfg["seed"],
        epoch=epoch,
        offset=offset,
        part=state.part,
        workers=state.cfg["loader_workers"],
        pin_memory=state.device.type == "cuda",
    )


def _training_batch(
    state: TrainState, batch_idx: Tensor, images: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """This rank's inputs (augmented) and labels of a global batch, on the device, and its share
    of the batch's dequantization noise (``None``: the model draws it, as an unsplit batch does).

    Every random transformation is drawn for the whole global batch, on every rank, so the
    shares add up to the batch one process would train on.
    """
    cfg, data, part = state.cfg, state.data, state.part
    num_levels = getattr(data.train_set, "num_levels", None)
    noise_like = None  # the dequantizer draws in the parameters' dtype, on the device
    if state.noise_feed is not None:
        noise_like = (next(state.model.parameters()).dtype, state.device)
    rate = float(cfg["perturb_rate"])
    draws = draw_batch(
        (len(batch_idx), *data.info["shape"]),
        max_shift=cfg["augment_shift"],
        perturb_rate=rate,
        num_levels=num_levels,
        noise=noise_like,
    )
    x = draws.apply(images, part, cfg["augment_shift"], rate, num_levels)
    y = data.labels[batch_idx[part]]
    dequant_noise = None if draws.dequant_noise is None else draws.dequant_noise[part]
    return to_device(x, state.device), to_device(y, state.device), dequant_noise


@torch.no_grad()
def _batch_stats(terms: Mapping[str, Tensor], y: Tensor, labelled: str) -> dict[str, Tensor]:
    """One (micro-)batch's means, and for partly labelled data its correct and labelled counts."""
    stats = {key: terms[key].mean() for key in ("loss", "nll", "bpd")}
    if labelled == "none":
        return stats  # no classification term: ce and accuracy stay empty in metrics.csv
    stats["ce"] = terms["ce"].mean()
    correct = terms["logits"].argmax(1) == y
    if labelled == "all":
        stats["accuracy"] = correct.float().mean()
    else:  # accuracy among the labelled examples of the batch, if it has any
        stats["correct"], stats["count"] = (correct & (y >= 0)).sum(), (y >= 0).sum()
    return stats


_COUNTS = ("correct", "count")  # statistics that add up over shares; the others are means


def _combine(parts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The statistics of equal shares of one batch: means of means, sums of counts."""
    if len(parts) == 1:
        return parts[0]
    return {
        key: torch.stack([p[key] for p in parts]).sum(0) / (1 if key in _COUNTS else len(parts))
        for key in parts[0]
    }


def _micro_step(state: TrainState, sync: bool, noise: Tensor | None) -> contextlib.ExitStack:
    """The context of one micro-batch's forward and backward passes: DDP's gradient all-reduce
    only on the last one, this rank's random stream, the given dequantization noise."""
    stack = contextlib.ExitStack()
    if state.ddp is not None and not sync:
        stack.enter_context(state.ddp.no_sync())
    stack.enter_context(state.own_stream())
    if state.noise_feed is not None:
        stack.enter_context(state.noise_feed.given(noise))
    return stack


def _forward_backward(
    state: TrainState, x: Tensor, y: Tensor, noise: Tensor | None
) -> tuple[dict[str, Tensor], Tensor]:
    """Gradients of the global batch's mean loss, in ``accum_steps`` micro-batches; this rank's
    statistics of the batch and the clipped gradient norm (the same on every rank)."""
    cfg = state.cfg
    accum = cfg["accum_steps"]
    size = len(x) // accum
    state.optimizer.zero_grad(set_to_none=True)
    parts = []
    for i in range(accum):
        micro = slice(i * size, (i + 1) * size)
        with _micro_step(state, i == accum - 1, None if noise is None else noise[micro]):
            with autocast_context(cfg["amp"], state.device):
                terms = state.trained(x[micro], y[micro], state.lam)
            loss = terms["loss"].mean()
            # A NaN loss still runs backward: under DDP every rank must join the all-reduce,
            # and its NaN gradient makes every rank skip the step together.
            (loss / accum if accum > 1 else loss).backward()
        parts.append(_batch_stats(terms, y[micro], state.data.labelled))
    grad_norm = clip_gradients(state.model, cfg["grad_clip"])
    return _combine(parts), grad_norm


def _agree(
    state: TrainState, stats: dict[str, Tensor], grad_norm: Tensor, interrupts: DeferredInterrupts
) -> tuple[dict[str, Tensor], bool, bool, bool]:
    """The step's statistics over all ranks, and what every rank does next: apply the step (its
    loss and gradient are finite), stop after it (a signal arrived at some rank) and save after
    it (``checkpoint_every_s`` passed on rank 0). One host synchronisation, the same on every
    rank."""
    save_due = time.time() - state.last_save > state.cfg["checkpoint_every_s"]
    if not state.dist.enabled:
        finite = torch.isfinite(stats["loss"]) & torch.isfinite(grad_norm)
        return stats, bool(finite), False, save_due
    names = list(stats)
    flags = torch.tensor([float(interrupts.pending), float(save_due and state.dist.is_main)])
    values = torch.cat(
        [torch.stack([stats[n].double() for n in names]), to_device(flags.double(), state.device)]
    )
    state.dist.all_reduce_sum(values)
    world = state.dist.world_size
    reduced = {n: values[i] / (1 if n in _COUNTS else world) for i, n in enumerate(names)}
    # A non-finite loss on any rank makes the summed loss non-finite on all of them.
    finite = torch.isfinite(values[0]) & torch.isfinite(grad_norm)
    apply, stop, save = torch.stack([finite.double(), values[-2], values[-1]]).tolist()
    return reduced, bool(apply), stop > 0, save > 0


def _accumulate(running: RunningMeans, stats: Mapping[str, Tensor]) -> None:
    """Add one applied step's statistics to the running means (no host sync)."""
    running.step()
    for key in ("loss", "nll", "bpd", "ce", "accuracy"):
        if key in stats:
            running.add(key, stats[key])
    if "count" in stats:
        count = stats["count"]
        running.add("accuracy", stats["correct"] / count.clamp(min=1), weight=(count > 0).double())


def _log_train_row(state: TrainState, epoch: int) -> dict[str, float | None]:
    means = state.running.means()
    log_row(
        state,
        {
            "step": state.step,
            "epoch": epoch,
            "split": "train",
            "lr": state.optimizer.param_groups[0]["lr"],
            "loss": means["loss"],
            "ce": means.get("ce"),
            "nll_nats": means["nll"],
            "bpd": means["bpd"],
            "accuracy": means.get("accuracy"),
            "nan_skips": state.guard.skipped,
            "elapsed_s": state.elapsed,
        },
    )
    state.running = RunningMeans()
    return means


def _apply_step(
    state: TrainState, stats: Mapping[str, Tensor], finite: bool, epoch: int
) -> dict[str, float | None] | None:
    """Everything a step changes after its backward pass (all or nothing); the logged means."""
    state.consistent = False
    state.guard.record(finite, state.step)
    if finite:
        state.optimizer.step()
        state.ema.update(state.model, step=state.step)
        _accumulate(state.running, stats)
    else:
        state.optimizer.zero_grad(set_to_none=True)
    # A skipped step still advances the counter, so the schedule stays aligned.
    state.step += 1
    state.scheduler.step_update(state.step)
    logged = None
    if state.step % state.cfg["log_every"] == 0 and state.running.steps:
        logged = _log_train_row(state, epoch)
    state.mark_boundary()
    return logged


def _show_progress(progress: tqdm | None, logged: Mapping[str, float | None] | None) -> None:
    if progress is None:
        return
    progress.update(1)
    if logged:  # the latest logged means, e.g. "bpd=3.18, accuracy=0.117"
        shown = {k: logged.get(k) for k in ("bpd", "accuracy")}
        progress.set_postfix({k: f"{v:.3f}" for k, v in shown.items() if v is not None})


def train_one_epoch(
    state: TrainState, interrupts: DeferredInterrupts, progress: tqdm | None = None
) -> bool:
    """Train from ``state.step`` to the end of its epoch (or to ``total_steps``); return whether
    it stopped early because ``budget_minutes`` are spent.

    Raises ``KeyboardInterrupt`` at a step boundary when a held signal (data-parallel runs)
    arrived at any rank.
    """
    epoch, offset = divmod(state.step, state.steps_per_epoch)
    state.model.train()
    for batch_idx, images in _epoch_inputs(state, epoch, offset):
        if state.step >= state.total_steps:
            break
        x, y, noise = _training_batch(state, batch_idx, images)
        stats, grad_norm = _forward_backward(state, x, y, noise)
        stats, finite, stop, save = _agree(state, stats, grad_norm, interrupts)
        with interrupts.deferred():
            logged = _apply_step(state, stats, finite, epoch)
        _show_progress(progress, logged)
        if stop:
            raise KeyboardInterrupt  # every rank at this boundary; train() saves it
        if save:
            save_training_checkpoint(state)
        if over_budget(state):
            return True
    return False


# --------------------------------------------------------------------------- validation


def _validation_due(state: TrainState) -> bool:
    """An epoch ended at this step, validation falls on it and has not been run yet."""
    epochs, into_epoch = divmod(state.step, state.steps_per_epoch)
    every = state.cfg["eval_every"]
    return (
        bool(every)
        and state.step > 0
        and into_epoch == 0
        and epochs % every == 0
        and state.evaluated_step != state.step
    )


def validate(state: TrainState) -> dict[str, float]:
    """Score the finalized EMA model on the validation split and log the row.

    Under DDP every rank finalizes its (identical) EMA copy and predicts its share of the
    validation batches; the metrics come from the gathered predictions.
    """
    state.consistent = False  # finalizing the EMA and the evaluation's noise change the state
    cfg, dist = state.cfg, state.dist
    shard = {"shard": (dist.rank, dist.world_size)} if dist.enabled else {}
    with state.own_stream():
        model = finalize_ema(state.ema.module)
        pred = predict(
            model,
            state.data.val_set,
            batch_size=cfg["eval_batch_size"],
            dequant_samples=cfg["eval_dequant_samples"],
            device=state.device,
            num_workers=cfg["loader_workers"],
            **shard,
        )
    if dist.enabled:
        pred = merge_predictions(dist.all_gather_object(pred))
    metrics = evaluate_predictions(pred)
    epoch = state.step // state.steps_per_epoch
    row = {"step": state.step, "epoch": epoch, "split": "val", **metrics}
    log_row(state, {**row, "elapsed_s": state.elapsed})
    state.evaluated_step = state.step
    if (watched := metrics.get(monitored_metric(state.lam))) is not None:
        state.val_history.append((state.step, float(watched)))
    if cfg["sample_every"] and epoch % cfg["sample_every"] == 0 and dist.is_main:
        _sample_grid(state, model)
    state.model.train()
    state.mark_boundary()
    return metrics


def _sample_grid(state: TrainState, model: HybridModel) -> None:
    """Samples of the EMA model as ``train_samples/step<N>.png`` (and in TensorBoard)."""
    if len(state.data.info["shape"]) != 3:
        return  # not images
    path = state.run_dir / "train_samples" / f"step{state.step:07d}.png"
    try:
        grid = sample_grid(model.flow, seed=state.cfg["seed"], path=path)
    except (ValueError, RuntimeError) as err:  # e.g. an inverse that did not converge yet
        warnings.warn(f"no sample grid at step {state.step}: {err}", stacklevel=2)
        return
    if state.tensorboard is not None:
        state.tensorboard.add_grid("samples", grid, state.step)


# --------------------------------------------------------------------------- checkpoints


def save_training_checkpoint(state: TrainState) -> None:
    """Write ``checkpoint.pt`` from the last step boundary (atomic; the resume point).

    Under DDP every rank calls it: rank 0 writes, with every rank's RNG states, and the others
    wait until the file is complete.
    """
    per_rank = state.dist.all_gather_object(state.rng) if state.dist.enabled else None
    if state.dist.is_main:
        payload = {
            "model": state.model.state_dict(),
            "ema": state.ema.module.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "scheduler": state.scheduler.state_dict(),
            "step": state.step,
            "nan_skips": state.guard.skipped,
            "nan_in_a_row": state.guard.in_a_row,
            "rng": state.rng["cpu"],
            "running": state.running.state_dict(),
            "evaluated_step": state.evaluated_step,
            "val_history": state.val_history,
            "stopped": state.stopped.to_dict() if state.stopped else None,
            "elapsed_s": state.elapsed,
            "config": dict(state.cfg),
            "data": state.data.info,
        }
        if "cuda" in state.rng:
            payload["cuda_rng"] = state.rng["cuda"]
        if per_rank is not None:
            payload["rng_ranks"] = [{k: v.cpu() for k, v in r.items()} for r in per_rank]
        save_checkpoint(payload, state.checkpoint_path)
    state.dist.barrier()
    state.last_save = time.time()
    state.unsaved = False


def finalize(state: TrainState) -> Path:
    """Write ``model.pt``: the finalized EMA weights with the config and data info.

    Every rank finalizes its EMA copy (so they stay identical); rank 0 writes.
    """
    finalize_ema(state.ema.module)
    path = state.run_dir / MODEL_FILE
    if state.dist.is_main:
        save_checkpoint(
            {
                "model": state.ema.module.state_dict(),
                "config": dict(state.cfg),
                "data": state.data.info,
                "step": state.step,
                "nan_skips": state.guard.skipped,
                "train_time_s": state.elapsed,
                "stopped": state.stopped.to_dict() if state.stopped else None,
            },
            path,
        )
    state.dist.barrier()
    return path


# --------------------------------------------------------------------------- the loop


def _validate_at_stop(state: TrainState) -> None:
    """A stop between validations validates where it stopped (the curve ends there)."""
    if state.evaluated_step != state.step:
        _validate_here(state)


def _validate_here(state: TrainState) -> None:
    """Validate now, with a resume point saved first."""
    if state.unsaved:  # validation changes the state: keep a resume point before it
        save_training_checkpoint(state)
    validate(state)


def _run(state: TrainState, interrupts: DeferredInterrupts, progress: tqdm) -> None:
    """Train until the schedule ends, the plateau rule fires or the budget is spent
    (:mod:`.stopping`); ``state.stopped`` says which."""
    # A run resumed past its budget (killed after the budget fired, before the stop was saved).
    if state.step and over_budget(state, any_step=True):
        _validate_at_stop(state)
        record_stop(state, "budget_minutes")
    while state.stopped is None:
        if _validation_due(state):
            _validate_here(state)
            if plateau_reached(state):
                record_stop(state, "plateau")
                return
        if state.step >= state.total_steps:
            record_stop(state, "max_steps" if state.cfg["max_steps"] else "max_epochs")
            return
        if train_one_epoch(state, interrupts, progress):
            _validate_at_stop(state)
            record_stop(state, "budget_minutes")


def _train(state: TrainState) -> None:
    progress = tqdm(
        total=state.total_steps,
        initial=state.step,
        disable=not state.cfg["progress"] or not state.dist.is_main,
        desc=state.run_dir.name,
        leave=False,
    )
    # Under DDP signals are held and acted upon at a step boundary all ranks agree on.
    with progress, DeferredInterrupts(hold=state.dist.enabled) as interrupts:
        try:
            _run(state, interrupts, progress)
        except KeyboardInterrupt:
            if state.consistent:
                save_training_checkpoint(state)
            raise
    save_training_checkpoint(state)
    finalize(state)


def train(config: Mapping[str, Any] | None = None, **overrides: Any) -> Path:
    """Train a hybrid model; return its run folder.

    ``config`` is merged over :data:`~hybridflow.training.config.DEFAULTS`, then ``overrides``.
    With ``resume=True`` (default) an existing ``checkpoint.pt`` in the run folder is continued.
    Ctrl-C or SIGTERM saves a checkpoint at the next step boundary and re-raises
    ``KeyboardInterrupt``. Under ``torchrun`` every process calls it with the same config.
    """
    cfg = resolve_config(overrides, base=config)
    dist = init_distributed(cfg["device"])
    state = None
    try:
        state = setup(cfg, dist)
        if state is not None:
            _train(state)
    finally:
        if state is not None and state.tensorboard is not None:
            state.tensorboard.close()
        dist.close()
    return run_dir_for(cfg)
