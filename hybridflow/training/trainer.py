"""The training loop: timm optimizer, warmup + cosine schedule and EMA; CSV metrics; resumable.

A run folder holds ``config.json`` (resolved config), ``metrics.csv`` (one row per logged step or
validation), ``checkpoint.pt`` (everything needed to resume exactly: model, EMA, optimizer,
scheduler, step, RNG state, running statistics) and, at the end, ``model.pt`` (EMA weights and
config, for evaluation).

The loop is split as timm's ``train.py`` is: :func:`setup` builds a :class:`TrainState`,
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ..data import dataset_tensors, load_dataset
from ..evaluation import evaluate_predictions, predict
from ..evaluation.evaluate import merge_predictions
from ..models import HybridModel, Lambda
from ..models.precision import autocast_context, prepare_model
from ..runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    build_model_for,
    data_info,
    load_checkpoint,
    remove_temporaries,
    resolve_config,
    run_dir_for,
    save_checkpoint,
    save_config,
)
from ..transforms import UniformDequantization
from .batches import perturb_levels, random_shift
from .distributed import (
    Distributed,
    LossModule,
    RankStream,
    init_distributed,
    rng_state,
    set_rng_state,
)
from .inputs import (
    NoiseFeed,
    dataset_labels,
    draw_batch,
    epoch_inputs,
    in_memory,
    read_examples,
    to_device,
)
from .logs import MetricsLog
from .loop import (
    DeferredInterrupts,
    NonFiniteGuard,
    RunningMeans,
    TrainingDivergedError,
    clip_gradients,
    create_ema,
    create_optimizer_and_scheduler,
    finalize_ema,
)
from .monitor import TensorBoardLog, open_tensorboard, sample_grid
from .semisupervised import keep_labels

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


# --------------------------------------------------------------------------- state and set-up


@dataclass(frozen=True)
class TrainData:
    """The splits as the loop reads them (every rank holds the same; each reads its share)."""

    train_set: Any
    val_set: Any
    images: Tensor | None  # training inputs in memory, or None: read through a DataLoader
    labels: Tensor  # training labels, -1 where unknown (or hidden: labelled_per_class)
    labelled: str  # "all", "some" or "none" of the training examples carry a label
    info: dict[str, Any]  # data_info(train_set): what the model is sized by

    @property
    def size(self) -> int:
        """Number of training examples."""
        return len(self.labels)


@dataclass(eq=False)
class TrainState:
    """Everything the pieces of the loop share. A checkpoint stores the part that changes."""

    cfg: dict[str, Any]
    run_dir: Path
    device: torch.device
    data: TrainData
    model: HybridModel
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    lam: float
    steps_per_epoch: int
    total_steps: int
    dist: Distributed = field(default_factory=lambda: Distributed(torch.device("cpu")))
    ema: ModelEmaV3 = field(init=False)
    log: MetricsLog | None = field(init=False, default=None)  # rank 0 only
    tensorboard: TensorBoardLog | None = None  # rank 0, with tensorboard=true
    guard: NonFiniteGuard = field(init=False)
    trained: nn.Module = field(init=False)  # what a step calls: the loss, maybe DDP / compiled
    ddp: DistributedDataParallel | None = None
    rank_stream: RankStream | None = None  # this rank's own random stream (DDP only)
    noise_feed: NoiseFeed | None = None  # feeds slices of the batch's dequantization noise
    running: RunningMeans = field(default_factory=RunningMeans)
    step: int = 0
    evaluated_step: int = -1  # step of the last finished validation
    elapsed_before: float = 0.0  # seconds spent in earlier sessions of a resumed run
    started: float = field(default_factory=time.time)
    last_save: float = field(default_factory=time.time)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # at the last step boundary
    consistent: bool = True  # False while a step's update or a validation is half done
    unsaved: bool = True  # something changed since the last checkpoint

    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT_FILE

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    @property
    def part(self) -> slice:
        """This rank's share of every global batch."""
        return self.dist.shard(self.cfg["batch_size"])

    def own_stream(self) -> contextlib.AbstractContextManager[None]:
        """Draws of this rank alone inside the block (the default stream in one process)."""
        return self.rank_stream.active() if self.rank_stream else contextlib.nullcontext()

    def mark_boundary(self) -> None:
        """Record that the state is consistent between two steps (what a checkpoint may save)."""
        self.rng = rng_state(self.device)
        if self.rank_stream is not None:
            self.rng |= {f"own_{k}": v for k, v in self.rank_stream.state.items()}
        self.consistent = True
        self.unsaved = True


def _streamed(cfg: Mapping[str, Any], train_set: Any) -> bool:
    """Whether training batches are read through a DataLoader (else indexed in memory)."""
    if cfg["loader"] == "memory" and not in_memory(train_set):
        raise ValueError(
            f"loader=memory, but dataset {cfg['dataset']!r} is not held in memory: "
            "use --loader=torch (or auto)"
        )
    return cfg["loader"] == "torch" or not in_memory(train_set)


def _load_training_data(cfg: Mapping[str, Any], dist: Distributed) -> TrainData:
    data_kw = {
        "data_root": cfg["data_root"],
        "seed": cfg["seed"],
        "val_fraction": cfg["val_fraction"],
        "download": cfg["download"],
    }
    if not dist.is_main:
        dist.barrier()  # rank 0 loads first: it alone downloads files or fills caches
    train_set = load_dataset(cfg["dataset"], "train", **data_kw)
    val_set = load_dataset(cfg["dataset"], "val", **data_kw)
    if dist.is_main:
        dist.barrier()
    if _streamed(cfg, train_set):
        images = None
        labels = dataset_labels(train_set, cfg["eval_batch_size"], cfg["loader_workers"])
    else:
        images, labels = dataset_tensors(train_set)
    info = data_info(train_set)
    if cfg["augment_shift"] and len(info["shape"]) != 3:
        raise ValueError("augment_shift needs image data; set --augment_shift=0")
    if cfg["perturb_rate"] and getattr(train_set, "num_levels", None) is None:
        raise ValueError("perturb_rate needs discrete data (levels); set --perturb_rate=0")
    labels = keep_labels(
        labels,
        per_class=cfg["labelled_per_class"],
        fraction=cfg["labelled_fraction"],
        seed=cfg["seed"],
    )
    if cfg["unlabelled"] == "drop":  # the supervised-only baseline of a semi-supervised run
        if images is None:
            raise ValueError("unlabelled=drop needs a dataset held in memory")
        images, labels = images[labels >= 0], labels[labels >= 0]
    batch_size, shares = cfg["batch_size"], dist.world_size * cfg["accum_steps"]
    if len(labels) < batch_size:
        raise ValueError(f"batch_size {batch_size} exceeds the {len(labels)} training examples")
    if batch_size % shares:
        raise ValueError(
            f"batch_size {batch_size} (the global batch of one optimizer step) must divide "
            f"into {dist.world_size} process(es) × {cfg['accum_steps']} accumulation step(s)"
        )
    return TrainData(train_set, val_set, images, labels, _labelled(labels, cfg), info)


def _labelled(labels: torch.Tensor, cfg: Mapping[str, Any]) -> str:
    """Which training examples carry a label (-1 marks unlabelled ones); refuse λ = 0 without."""
    known = labels >= 0
    if bool(known.all()):
        return "all"
    if bool(known.any()):
        return "some"  # semi-supervised: unlabelled examples contribute λ·NLL only
    if Lambda.parse(cfg["lam"]).is_zero:
        raise ValueError(
            f"dataset {cfg['dataset']!r} has no labels, and λ = 0 trains only the classifier: "
            "use --lam=1 (or 1/D) for density-only training"
        )
    return "none"


def _init_batch(data: TrainData, seed: int) -> Tensor:
    """The fixed batch of the data-dependent (ActNorm) initialisation, the same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    init_idx = torch.randperm(data.size, generator=gen)[:512]
    if data.images is not None:
        return data.images[init_idx]
    return read_examples(data.train_set, init_idx)


def setup(cfg: Mapping[str, Any], dist: Distributed | None = None) -> TrainState | None:
    """Run folder, data, model, optimizer, schedule and EMA, resumed from ``checkpoint.pt``.

    ``dist`` is this process's place in a data-parallel run (default: from the ``torchrun``
    environment). Returns ``None`` when the run already finished (its ``model.pt`` is kept).
    ``cfg`` comes from :func:`~hybridflow.training.resolve_config`, which checked every value.
    """
    cfg = dict(cfg)
    dist = dist or init_distributed(cfg["device"])
    run_dir = run_dir_for(cfg)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
    dist.barrier()
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    device = dist.device
    torch.manual_seed(cfg["seed"])  # the shared stream: the same on every rank

    data = _load_training_data(cfg, dist)
    model = build_model_for(cfg, data.info).to(device)
    steps_per_epoch = data.size // cfg["batch_size"]
    total_steps = int(cfg["max_steps"] or cfg["epochs"] * steps_per_epoch)
    optimizer, scheduler = create_optimizer_and_scheduler(
        model,
        opt=cfg["opt"],
        lr=cfg["lr"],
        weight_decay=cfg["weight_decay"],
        total_steps=total_steps,
        warmup_steps=cfg["warmup_steps"],
        min_lr=cfg["min_lr"],
        warmup_lr_init=cfg["lr"] * 1e-2,
        opt_args=cfg["opt_args"],
    )
    ckpt_path = run_dir / CHECKPOINT_FILE
    saved = load_checkpoint(ckpt_path, device) if cfg["resume"] and ckpt_path.exists() else None
    if saved is not None and int(saved["step"]) >= total_steps and (run_dir / MODEL_FILE).exists():
        return None  # already finished: keep its model.pt (and its recorded train time)

    lam = Lambda.parse(cfg["lam"]).value(model.dim)
    state = TrainState(
        cfg,
        run_dir,
        device,
        data,
        model,
        optimizer,
        scheduler,
        lam,
        steps_per_epoch,
        total_steps,
        dist,
    )
    state.guard = NonFiniteGuard(
        cfg["max_nan_skips"], f"last good checkpoint: {ckpt_path}. Lower lr or raise grad_clip."
    )
    if dist.enabled:
        state.rank_stream = RankStream(cfg["seed"], dist.rank, device)
    _open_log(state, saved)
    if saved is None:
        # Data-dependent ActNorm init on a fixed batch, before the EMA copy is taken and before
        # DDP wraps the model (every rank computes the same init from the same shared stream).
        model.data_init(_init_batch(data, cfg["seed"]).to(device))
    else:
        _restore(state, saved)
    # Memory format before the EMA copy (which copies it) and before DDP (which buckets views).
    loss_module = prepare_model(LossModule(model), channels_last=cfg["channels_last"])
    state.ema = create_ema(model, decay=cfg["ema_decay"], use_warmup=cfg["ema_warmup"])
    if saved is not None:
        state.ema.module.load_state_dict(saved["ema"])
    _wrap_for_training(state, loss_module)
    if cfg["tensorboard"] and dist.is_main:
        state.tensorboard = open_tensorboard(run_dir / "tensorboard", purge_step=state.step)
    state.mark_boundary()
    return state


def _wrap_for_training(state: TrainState, loss_module: nn.Module) -> None:
    """What a step calls: the loss as a forward pass, under DDP with several processes, compiled
    on request; and the noise feed when batches are split into shares."""
    module = loss_module
    if state.dist.enabled:
        if state.model.num_classes == 0:
            # A density-only model never reads its head: leave it out of the gradient
            # all-reduce (it gets no gradient in one process either).
            state.model.head.requires_grad_(False)
        # Every other parameter takes part in every loss: DDP searches for no unused ones.
        device_ids = [state.device.index] if state.device.type == "cuda" else None
        module = state.ddp = DistributedDataParallel(module, device_ids=device_ids)
    state.trained = prepare_model(module, compile=state.cfg["compile"])
    split = state.dist.enabled or state.cfg["accum_steps"] > 1
    dequantizer = getattr(state.model.flow, "dequantize", None)
    if split and isinstance(dequantizer, UniformDequantization):
        state.noise_feed = NoiseFeed(dequantizer)


def _restore(state: TrainState, saved: Mapping[str, Any]) -> None:
    """Model, optimizer, schedule, counters and RNG from a checkpoint (the EMA comes after)."""
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step = int(saved["step"])
    state.guard.load_state_dict(
        {"skipped": saved["nan_skips"], "in_a_row": saved.get("nan_in_a_row", 0)}
    )
    if "running" in saved:
        state.running.load_state_dict(saved["running"], state.device)
    state.elapsed_before = float(saved.get("elapsed_s", 0.0))
    rng = {"cpu": saved["rng"]} | ({"cuda": saved["cuda_rng"]} if "cuda_rng" in saved else {})
    per_rank = saved.get("rng_ranks")
    if state.dist.enabled and per_rank is not None and len(per_rank) == state.dist.world_size:
        rng = per_rank[state.dist.rank]
    elif state.dist.enabled:
        warnings.warn(
            f"{state.checkpoint_path} was written by {len(per_rank or [0])} process(es), resumed "
            f"by {state.dist.world_size}: the per-rank random streams restart",
            stacklevel=2,
        )
    set_rng_state({k: rng[k] for k in ("cpu", "cuda") if k in rng}, state.device)
    if state.rank_stream is not None and "own_cpu" in rng:
        state.rank_stream.state = {k[4:]: v.cpu() for k, v in rng.items() if k.startswith("own_")}


def _open_log(state: TrainState, saved: Mapping[str, Any] | None) -> None:
    """``metrics.csv`` holding exactly the rows of the steps the checkpoint has done (rank 0)."""
    if state.dist.is_main:
        remove_temporaries(state.run_dir)  # left by a run killed while writing
        state.log = MetricsLog(state.run_dir / "metrics.csv")
        if saved is None:
            state.log.rewind(0)  # a fresh start: rows of an attempt that saved nothing are void
        else:
            step = int(saved["step"])
            if "evaluated_step" in saved:
                state.evaluated_step = int(saved["evaluated_step"])
            elif state.log.has_row(step, "val"):  # a checkpoint from before this field existed
                state.evaluated_step = step
            # Rows past the checkpoint are logged again as the run replays those steps; a
            # validation the checkpoint has not done yet is run again (see _validation_due).
            state.log.rewind(step, keep_val_at_step=state.evaluated_step == step)
    state.evaluated_step = state.dist.broadcast_object(state.evaluated_step)


def _log(state: TrainState, row: Mapping[str, Any]) -> None:
    """One row of ``metrics.csv`` (and of TensorBoard), written by rank 0."""
    if state.log is not None:
        state.log.write(row)
    if state.tensorboard is not None:
        state.tensorboard.write(row)


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
    _log(
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
) -> None:
    """Train from ``state.step`` to the end of its epoch (or to ``total_steps``).

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
    _log(state, {**row, "elapsed_s": state.elapsed})
    state.evaluated_step = state.step
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
            },
            path,
        )
    state.dist.barrier()
    return path


# --------------------------------------------------------------------------- the loop


def _run(state: TrainState, interrupts: DeferredInterrupts, progress: tqdm) -> None:
    while True:
        if _validation_due(state):
            if state.unsaved:  # validation changes the state: keep a resume point before it
                save_training_checkpoint(state)
            validate(state)
        if state.step >= state.total_steps:
            return
        train_one_epoch(state, interrupts, progress)


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
