"""Setting up a training run: the run folder, data, model, optimizer, schedule and EMA, resumed
from ``checkpoint.pt``, as one :class:`TrainState` that the loop (:mod:`.trainer`) advances."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ..data import dataset_tensors, load_dataset
from ..models import HybridModel, Lambda
from ..models.precision import prepare_model
from ..runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    build_model_for,
    data_info,
    legacy_config,
    legacy_flags,
    load_checkpoint,
    remove_temporaries,
    run_dir_for,
    save_config,
)
from ..transforms import UniformDequantization
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
    in_memory,
    read_examples,
)
from .logs import MetricsLog
from .loop import (
    NonFiniteGuard,
    RunningMeans,
    create_ema,
    create_optimizer_and_scheduler,
)
from .monitor import TensorBoardLog, open_tensorboard
from .semisupervised import keep_labels
from .stopping import StopRecord, still_stopped

__all__ = ["TrainData", "TrainState", "log_row", "setup"]


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
    val_history: list[tuple[int, float]] = field(default_factory=list)  # the monitored metric
    stopped: StopRecord | None = None  # why training ended, once it has
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
    stopped = saved.get("stopped") if saved is not None else None
    if stopped and not still_stopped(stopped, cfg, total_steps):
        stopped = None  # resumed with a longer schedule or budget: it trains on
    done = saved is not None and (int(saved["step"]) >= total_steps or stopped is not None)
    if done and (run_dir / MODEL_FILE).exists():
        return None  # already finished: keep its model.pt (and its recorded train time)
    if saved is None and cfg["resume"] and (run_dir / MODEL_FILE).exists():
        # A finished run kept without its checkpoint (a packed study, or checkpoint.pt deleted
        # to save space): finished if its schedule or stop still holds, else it cannot go on.
        final = load_checkpoint(run_dir / MODEL_FILE, device)
        record = final.get("stopped")
        if int(final.get("step", 0)) >= total_steps or (
            record and still_stopped(record, cfg, total_steps)
        ):
            return None
        raise CheckpointError(
            f"{run_dir} holds a finished model.pt (step {final.get('step')}) but no "
            f"{CHECKPOINT_FILE}, and this config trains further ({total_steps} steps): restore "
            "the checkpoint, or train into a new folder (--name)"
        )

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
    try:
        state.model.load_state_dict(saved["model"])
    except RuntimeError as err:
        legacy = legacy_config(state.cfg)
        hint = (
            ""
            if legacy is None
            else "; if it was written before a default layout changed, resume with "
            + legacy_flags(state.cfg, legacy)
        )
        raise CheckpointError(
            f"{state.checkpoint_path} does not fit the model its config describes{hint}: {err}"
        ) from err
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step = int(saved["step"])
    state.guard.load_state_dict(
        {"skipped": saved["nan_skips"], "in_a_row": saved.get("nan_in_a_row", 0)}
    )
    if "running" in saved:
        state.running.load_state_dict(saved["running"], state.device)
    state.elapsed_before = float(saved.get("elapsed_s", 0.0))
    state.val_history = [(int(s), float(v)) for s, v in saved.get("val_history", [])]
    record = saved.get("stopped")
    if record and still_stopped(record, state.cfg, state.total_steps):
        state.stopped = StopRecord.from_dict(record)
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


def log_row(state: TrainState, row: Mapping[str, Any]) -> None:
    """One row of ``metrics.csv`` (and of TensorBoard), written by rank 0."""
    if state.log is not None:
        state.log.write(row)
    if state.tensorboard is not None:
        state.tensorboard.write(row)
