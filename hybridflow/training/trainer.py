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

Seams for data-parallel training: :func:`~hybridflow.training.batches.epoch_batches` (each rank's
share of a batch), :class:`~hybridflow.training.logs.MetricsLog` and
:func:`save_training_checkpoint` (written by rank 0 only) and :func:`validate` (run by every rank,
on the EMA copy, never through the DDP wrapper).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from ..data import dataset_tensors, load_dataset
from ..evaluation import evaluate_predictions, predict
from ..models import HybridModel, create_hybrid_model, resolve_lambda
from .batches import check_perturb_rate, epoch_batches, perturb_levels, random_shift
from .checkpoint import CheckpointError, load_checkpoint, remove_temporaries, save_checkpoint
from .config import resolve_config, save_config
from .logs import MetricsLog
from .loop import (
    DeferredInterrupts,
    NonFiniteGuard,
    RunningMeans,
    TrainingDivergedError,
    backward_and_clip,
    create_optimizer_and_scheduler,
    finalize_ema,
)

__all__ = [
    "TrainData",
    "TrainState",
    "TrainingDivergedError",
    "build_model_for",
    "data_info",
    "finalize",
    "load_run",
    "perturb_levels",
    "random_shift",
    "run_dir_for",
    "save_training_checkpoint",
    "setup",
    "train",
    "train_one_epoch",
    "validate",
]


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def run_dir_for(config: Mapping[str, Any]) -> Path:
    """``out_dir/name``; the name defaults to ``<dataset>-<backbone>-lam<λ>-s<seed>``."""
    name = config.get("name") or (
        f"{config['dataset'].replace(':', '_').replace('/', '_')}-{config['backbone']}"
        f"-lam{str(config['lam']).replace('/', 'over')}-s{config['seed']}"
    )
    return Path(config["out_dir"]) / name


def data_info(dataset) -> dict[str, Any]:
    """What a model needs to know of its data: example shape, alphabet size, class count."""
    return {
        "shape": list(dataset.shape),
        "num_levels": dataset.num_levels,
        "num_classes": dataset.num_classes,
    }


def build_model_for(config: Mapping[str, Any], info: Mapping[str, Any]) -> HybridModel:
    """The model a config describes, sized by :func:`data_info`."""
    return create_hybrid_model(
        config, tuple(info["shape"]), info["num_levels"], info["num_classes"]
    )


# --------------------------------------------------------------------------- state and set-up


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":  # dequantization noise is drawn on the device
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


@dataclass(frozen=True)
class TrainData:
    """The splits as the loop reads them (a data-parallel run would hold its rank's shard)."""

    train_set: Any
    val_set: Any
    images: torch.Tensor  # training inputs
    labels: torch.Tensor  # training labels, -1 where unknown
    labelled: str  # "all", "some" or "none" of the training examples carry a label
    info: dict[str, Any]  # data_info(train_set): what the model is sized by


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
    ema: ModelEmaV3 = field(init=False)
    log: MetricsLog = field(init=False)
    guard: NonFiniteGuard = field(init=False)
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
        return self.run_dir / "checkpoint.pt"

    @property
    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.started

    def mark_boundary(self) -> None:
        """Record that the state is consistent between two steps (what a checkpoint may save)."""
        self.rng = _rng_state(self.device)
        self.consistent = True
        self.unsaved = True


def _load_training_data(cfg: Mapping[str, Any]) -> TrainData:
    data_kw = {
        "data_root": cfg["data_root"],
        "seed": cfg["seed"],
        "val_fraction": cfg["val_fraction"],
        "download": cfg["download"],
    }
    train_set = load_dataset(cfg["dataset"], "train", **data_kw)
    val_set = load_dataset(cfg["dataset"], "val", **data_kw)
    images, labels = dataset_tensors(train_set)
    if cfg["augment_shift"] and images.dim() != 4:
        raise ValueError("augment_shift needs image data; set --augment_shift=0")
    if cfg["perturb_rate"] and getattr(train_set, "num_levels", None) is None:
        raise ValueError("perturb_rate needs discrete data (levels); set --perturb_rate=0")
    check_perturb_rate(float(cfg["perturb_rate"]))
    if len(images) < cfg["batch_size"]:
        raise ValueError(
            f"batch_size {cfg['batch_size']} exceeds the {len(images)} training examples"
        )
    labelled = _labelled(labels, cfg)
    return TrainData(train_set, val_set, images, labels, labelled, data_info(train_set))


def _labelled(labels: torch.Tensor, cfg: Mapping[str, Any]) -> str:
    """Which training examples carry a label (-1 marks unlabelled ones); refuse λ = 0 without."""
    known = labels >= 0
    if bool(known.all()):
        return "all"
    if bool(known.any()):
        return "some"  # semi-supervised: unlabelled examples contribute λ·NLL only
    if resolve_lambda(cfg["lam"], 1) == 0:
        raise ValueError(
            f"dataset {cfg['dataset']!r} has no labels, and λ = 0 trains only the classifier: "
            "use --lam=1 (or 1/D) for density-only training"
        )
    return "none"


def setup(cfg: Mapping[str, Any]) -> TrainState | None:
    """Run folder, data, model, optimizer, schedule and EMA, resumed from ``checkpoint.pt``.

    Returns ``None`` when the run already finished (its ``model.pt`` is kept as it is).
    """
    cfg = dict(cfg)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    device = _device(cfg["device"])
    torch.manual_seed(cfg["seed"])

    data = _load_training_data(cfg)
    model = build_model_for(cfg, data.info).to(device)
    steps_per_epoch = len(data.images) // cfg["batch_size"]
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
    )
    ckpt_path = run_dir / "checkpoint.pt"
    saved = load_checkpoint(ckpt_path, device) if cfg["resume"] and ckpt_path.exists() else None
    if saved is not None and int(saved["step"]) >= total_steps and (run_dir / "model.pt").exists():
        return None  # already finished: keep its model.pt (and its recorded train time)

    lam = resolve_lambda(cfg["lam"], model.dim)
    state = TrainState(
        cfg, run_dir, device, data, model, optimizer, scheduler, lam, steps_per_epoch, total_steps
    )
    state.guard = NonFiniteGuard(
        cfg["max_nan_skips"], f"last good checkpoint: {ckpt_path}. Lower lr or raise grad_clip."
    )
    _open_log(state, saved)
    if saved is None:
        # Data-dependent ActNorm init on a fixed batch, before the EMA copy is taken.
        gen = torch.Generator().manual_seed(cfg["seed"])
        init_idx = torch.randperm(len(data.images), generator=gen)[:512]
        model.data_init(data.images[init_idx].to(device))
    else:
        _restore(state, saved)
    state.ema = ModelEmaV3(model, decay=cfg["ema_decay"], use_warmup=cfg["ema_warmup"])
    if saved is not None:
        state.ema.module.load_state_dict(saved["ema"])
    state.mark_boundary()
    return state


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
    torch.set_rng_state(saved["rng"])
    if "cuda_rng" in saved and state.device.type == "cuda":
        torch.cuda.set_rng_state(saved["cuda_rng"], state.device)


def _open_log(state: TrainState, saved: Mapping[str, Any] | None) -> None:
    """``metrics.csv`` holding exactly the rows of the steps the checkpoint has done."""
    remove_temporaries(state.run_dir)  # left by a run killed while writing
    state.log = MetricsLog(state.run_dir / "metrics.csv")
    if saved is None:
        state.log.rewind(0)  # a fresh start: rows of an attempt that saved nothing are void
        return
    step = int(saved["step"])
    if "evaluated_step" in saved:
        state.evaluated_step = int(saved["evaluated_step"])
    elif state.log.has_row(step, "val"):  # a checkpoint from before this field existed
        state.evaluated_step = step
    # Rows past the checkpoint are logged again as the run replays those steps; a validation
    # the checkpoint has not done yet is run again (see _validation_due).
    state.log.rewind(step, keep_val_at_step=state.evaluated_step == step)


# --------------------------------------------------------------------------- one epoch


def _training_batch(
    state: TrainState, batch_idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (augmented) and labels of one batch, on the device."""
    cfg = state.cfg
    x = random_shift(state.data.images[batch_idx], cfg["augment_shift"])
    if cfg["perturb_rate"]:
        x = perturb_levels(x, float(cfg["perturb_rate"]), state.data.train_set.num_levels)
    return x.to(state.device), state.data.labels[batch_idx].to(state.device)


@torch.no_grad()
def _accumulate(
    running: RunningMeans, terms: Mapping[str, torch.Tensor], y: torch.Tensor, labelled: str
) -> None:
    """Add one step's batch means to the running statistics (no host sync)."""
    running.step()
    for key in ("loss", "nll", "bpd"):
        running.add(key, terms[key].mean())
    if labelled == "none":
        return  # no classification term: ce and accuracy stay empty in metrics.csv
    running.add("ce", terms["ce"].mean())
    correct = terms["logits"].argmax(1) == y
    if labelled == "all":
        running.add("accuracy", correct.float().mean())
    else:  # accuracy among the labelled examples of the batch, if it has any
        count = (y >= 0).sum()
        accuracy = (correct & (y >= 0)).sum() / count.clamp(min=1)
        running.add("accuracy", accuracy, weight=(count > 0).double())


def _log_train_row(state: TrainState, epoch: int) -> dict[str, float | None]:
    means = state.running.means()
    state.log.write(
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
        }
    )
    state.running = RunningMeans()
    return means


def _apply_step(
    state: TrainState, terms: Mapping[str, torch.Tensor], y: torch.Tensor, finite: bool, epoch: int
) -> dict[str, float | None] | None:
    """Everything a step changes after its backward pass (all or nothing); the logged means."""
    state.consistent = False
    state.guard.record(finite, state.step)
    if finite:
        state.optimizer.step()
        state.ema.update(state.model, step=state.step)
        _accumulate(state.running, terms, y, state.data.labelled)
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
    """Train from ``state.step`` to the end of its epoch (or to ``total_steps``)."""
    cfg = state.cfg
    epoch, offset = divmod(state.step, state.steps_per_epoch)
    state.model.train()
    batches = epoch_batches(len(state.data.images), cfg["batch_size"], cfg["seed"], epoch)
    for batch_idx in batches[offset:]:
        if state.step >= state.total_steps:
            break
        x, y = _training_batch(state, batch_idx)
        terms = state.model.loss(x, y, state.lam)
        loss = terms["loss"].mean()
        finite = backward_and_clip(loss, state.model, state.optimizer, cfg["grad_clip"])
        with interrupts.deferred():
            logged = _apply_step(state, terms, y, finite, epoch)
        _show_progress(progress, logged)
        if time.time() - state.last_save > cfg["checkpoint_every_s"]:
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
    """Score the finalized EMA model on the validation split and log the row."""
    state.consistent = False  # finalizing the EMA and the evaluation's noise change the state
    model = finalize_ema(state.ema.module)
    metrics = evaluate_predictions(
        predict(
            model,
            state.data.val_set,
            batch_size=state.cfg["eval_batch_size"],
            dequant_samples=state.cfg["eval_dequant_samples"],
            device=state.device,
        )
    )
    state.log.write(
        {
            "step": state.step,
            "epoch": state.step // state.steps_per_epoch,
            "split": "val",
            **metrics,
            "elapsed_s": state.elapsed,
        }
    )
    state.evaluated_step = state.step
    state.model.train()
    state.mark_boundary()
    return metrics


# --------------------------------------------------------------------------- checkpoints


def save_training_checkpoint(state: TrainState) -> None:
    """Write ``checkpoint.pt`` from the last step boundary (atomic; the resume point)."""
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
    save_checkpoint(payload, state.checkpoint_path)
    state.last_save = time.time()
    state.unsaved = False


def finalize(state: TrainState) -> Path:
    """Write ``model.pt``: the finalized EMA weights with the config and data info."""
    finalize_ema(state.ema.module)
    path = state.run_dir / "model.pt"
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


def train(config: Mapping[str, Any] | None = None, **overrides: Any) -> Path:
    """Train a hybrid model; return its run folder.

    ``config`` is merged over :data:`~hybridflow.training.config.DEFAULTS`, then ``overrides``.
    With ``resume=True`` (default) an existing ``checkpoint.pt`` in the run folder is continued.
    Ctrl-C or SIGTERM saves a checkpoint at the next step boundary and re-raises
    ``KeyboardInterrupt``.
    """
    cfg = resolve_config(overrides, base=config)
    state = setup(cfg)
    if state is None:
        return run_dir_for(cfg)
    progress = tqdm(
        total=state.total_steps,
        initial=state.step,
        disable=not cfg["progress"],
        desc=state.run_dir.name,
        leave=False,
    )
    with progress, DeferredInterrupts() as interrupts:
        try:
            _run(state, interrupts, progress)
        except KeyboardInterrupt:
            if state.consistent:
                save_training_checkpoint(state)
            raise
    save_training_checkpoint(state)
    finalize(state)
    return state.run_dir


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[HybridModel, dict[str, Any]]:
    """Load a finished run's EMA model (``model.pt``) in eval mode, with its config."""
    run_dir = Path(run_dir)
    path = run_dir / "model.pt"
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a folder: give a run folder (runs/NAME)")
    if not path.exists() and not (run_dir / "config.json").exists():
        raise CheckpointError(
            f"{run_dir} is not a run folder (no config.json or model.pt): give the folder "
            "`hybridflow train` printed, e.g. runs/NAME, or pretrained:NAME"
        )
    if not path.exists():
        raise CheckpointError(
            f"{run_dir} has no model.pt: the run did not finish (resume it with "
            f"`hybridflow train --config {run_dir / 'config.json'}`)"
        )
    state = load_checkpoint(path, map_location=device)
    cfg = resolve_config(base=state["config"])
    if "data" not in state:
        raise CheckpointError(f"{path} lacks the 'data' entry (shape, levels, classes)")
    model = build_model_for(cfg, state["data"]).to(device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(
            f"{path} does not match the model its config describes: {err}"
        ) from err
    return model.eval(), cfg
