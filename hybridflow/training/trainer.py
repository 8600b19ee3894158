"""The training loop: timm optimizer, warmup + cosine schedule and EMA; CSV metrics; resumable.

A run folder holds ``config.json`` (resolved config), ``metrics.csv`` (one row per logged step or
validation), ``checkpoint.pt`` (everything needed to resume: model, EMA, optimizer, scheduler,
step and RNG state) and, at the end, ``model.pt`` (EMA weights and config, for evaluation).
"""

from __future__ import annotations

import csv
import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from tqdm.auto import tqdm

from ..data import dataset_tensors, load_dataset
from ..evaluation import evaluate_predictions, predict
from ..models import HybridModel, create_hybrid_model, resolve_lambda
from ..nets import refresh_lipschitz_layers
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import resolve_config, save_config

__all__ = [
    "TrainingDivergedError",
    "build_model_for",
    "data_info",
    "load_run",
    "perturb_levels",
    "random_shift",
    "run_dir_for",
    "train",
]


class TrainingDivergedError(RuntimeError):
    """Raised after too many consecutive non-finite losses or gradients."""


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


class _CsvLog:
    FIELDS = (
        "step",
        "epoch",
        "split",
        "lr",
        "loss",
        "ce",
        "nll_nats",
        "bpd",
        "accuracy",
        "ece",
        "brier",
        "class_nll",
        "nan_skips",
        "elapsed_s",
    )

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            with path.open("w", newline="") as f:
                csv.writer(f).writerow(self.FIELDS)

    def write(self, row: Mapping[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self.FIELDS])


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by a random offset in ``[-max_shift, max_shift]²``, filling with 0.

    Level 0 is the background of digit-like data, so the fill adds no new pixel values.
    Uses the global torch RNG, whose state checkpoints carry, so resumed runs replay it.
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n, 1))
    rows = (dy + torch.arange(h))[:, :, None]  # [n, h, 1]
    cols = (dx + torch.arange(w))[:, None, :]  # [n, 1, w]
    # Advanced indexing gathers every crop at once: [n, h, w, C] -> [n, C, h, w].
    return padded.permute(0, 2, 3, 1)[torch.arange(n)[:, None, None], rows, cols].permute(
        0, 3, 1, 2
    )


def _check_perturb_rate(rate: float) -> None:
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"perturb_rate must lie in [0, 1), got {rate}")


def perturb_levels(
    x: torch.Tensor, rate: float, num_levels: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace each entry of ``x`` by a uniform random level in ``[0, num_levels)`` w.p. ``rate``.

    The input perturbation of the background model in Ren et al. 2019, "Likelihood Ratios for
    Out-of-Distribution Detection" (§4): the perturbed data keep the population-level background
    statistics but lose semantic structure. Uses the global torch RNG unless ``generator`` is given.
    """
    _check_perturb_rate(rate)
    if rate == 0.0:
        return x
    replace = torch.rand(x.shape, generator=generator) < rate
    noise = torch.randint(0, num_levels, x.shape, generator=generator).to(x.dtype)
    return torch.where(replace.to(x.device), noise.to(x.device), x)


def _batches(n: int, batch_size: int, seed: int, epoch: int):
    """Seeded permutation per epoch: resuming mid-epoch replays the same order."""
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=gen)
    for i in range(n // batch_size):  # drop the ragged last batch: every step sees a full batch
        yield perm[i * batch_size : (i + 1) * batch_size]


def train(config: Mapping[str, Any] | None = None, **overrides: Any) -> Path:
    """Train a hybrid model; return its run folder.

    ``config`` is merged over :data:`~hybridflow.training.config.DEFAULTS`, then ``overrides``.
    With ``resume=True`` (default) an existing ``checkpoint.pt`` in the run folder is continued.
    """
    cfg = resolve_config(overrides, base=config)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.json")
    if cfg["num_threads"]:
        torch.set_num_threads(int(cfg["num_threads"]))
    device = _device(cfg["device"])
    torch.manual_seed(cfg["seed"])

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
    _check_perturb_rate(float(cfg["perturb_rate"]))
    if len(images) < cfg["batch_size"]:
        raise ValueError(
            f"batch_size {cfg['batch_size']} exceeds the {len(images)} training examples"
        )

    info = data_info(train_set)
    model = build_model_for(cfg, info).to(device)
    lam = resolve_lambda(cfg["lam"], model.dim)
    steps_per_epoch = len(images) // cfg["batch_size"]
    total_steps = int(cfg["max_steps"] or cfg["epochs"] * steps_per_epoch)

    optimizer = create_optimizer_v2(
        model, opt=cfg["opt"], lr=cfg["lr"], weight_decay=cfg["weight_decay"]
    )
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=total_steps,
        lr_min=cfg["min_lr"],
        warmup_t=cfg["warmup_steps"],
        warmup_lr_init=cfg["lr"] * 1e-2,
        t_in_epochs=False,
    )
    step, nan_skips = 0, 0
    ckpt_path = run_dir / "checkpoint.pt"
    state = (
        load_checkpoint(ckpt_path, map_location=device)
        if cfg["resume"] and ckpt_path.exists()
        else None
    )
    if state is not None and int(state["step"]) >= total_steps and (run_dir / "model.pt").exists():
        return run_dir  # already finished: keep its model.pt (and its recorded train time)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, nan_skips = int(state["step"]), int(state["nan_skips"])
        torch.set_rng_state(state["rng"])
    else:
        # Data-dependent ActNorm init on a fixed batch, before the EMA copy is taken.
        init_idx = torch.randperm(
            len(images), generator=torch.Generator().manual_seed(cfg["seed"])
        )[:512]
        model.data_init(images[init_idx].to(device))
    ema = ModelEmaV3(model, decay=cfg["ema_decay"], use_warmup=cfg["ema_warmup"])
    if state is not None:
        ema.module.load_state_dict(state["ema"])

    log = _CsvLog(run_dir / "metrics.csv")

    def checkpoint() -> None:
        save_checkpoint(
            {
                "model": model.state_dict(),
                "ema": ema.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "nan_skips": nan_skips,
                "rng": torch.get_rng_state(),
                "config": dict(cfg),
                "data": info,
            },
            ckpt_path,
        )

    # Turn SIGTERM into KeyboardInterrupt so a killed job still leaves a resumable checkpoint.
    previous_handler = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    except ValueError:  # not in the main thread
        previous_handler = None

    start_time, last_ckpt = time.time(), time.time()
    running: dict[str, float] = {}
    consecutive_nan = 0
    bar = tqdm(
        total=total_steps, initial=step, disable=not cfg["progress"], desc=run_dir.name, leave=False
    )
    model.train()
    try:
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            for batch_idx in list(_batches(len(images), cfg["batch_size"], cfg["seed"], epoch))[
                offset:
            ]:
                if step >= total_steps:
                    break
                x = random_shift(images[batch_idx], cfg["augment_shift"])
                if cfg["perturb_rate"]:
                    x = perturb_levels(x, float(cfg["perturb_rate"]), train_set.num_levels)
                x = x.to(device)
                y = labels[batch_idx].to(device)
                terms = model.loss(x, y, lam)
                loss = terms["loss"].mean()
                optimizer.zero_grad(set_to_none=True)
                finite = bool(torch.isfinite(loss))
                if finite:
                    loss.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
                    finite = bool(torch.isfinite(grad_norm))
                if not finite:
                    # Skip the update; the step counter still advances (schedule stays aligned).
                    nan_skips += 1
                    consecutive_nan += 1
                    optimizer.zero_grad(set_to_none=True)
                    if consecutive_nan > cfg["max_nan_skips"]:
                        raise TrainingDivergedError(
                            f"{consecutive_nan} consecutive non-finite losses at step {step}; "
                            f"last good checkpoint: {ckpt_path}. Lower lr or raise grad_clip."
                        )
                else:
                    consecutive_nan = 0
                    optimizer.step()
                    ema.update(model, step=step)
                    with torch.no_grad():
                        for key in ("loss", "ce", "nll", "bpd"):
                            running[key] = running.get(key, 0.0) + terms[key].mean().item()
                        running["acc"] = (
                            running.get("acc", 0.0)
                            + (terms["logits"].argmax(1) == y).float().mean().item()
                        )
                        running["n"] = running.get("n", 0) + 1
                step += 1
                scheduler.step_update(step)
                bar.update(1)
                if step % cfg["log_every"] == 0 and running.get("n"):
                    n = running["n"]
                    row = {
                        "step": step,
                        "epoch": epoch,
                        "split": "train",
                        "lr": optimizer.param_groups[0]["lr"],
                        "loss": running["loss"] / n,
                        "ce": running["ce"] / n,
                        "nll_nats": running["nll"] / n,
                        "bpd": running["bpd"] / n,
                        "accuracy": running["acc"] / n,
                        "nan_skips": nan_skips,
                        "elapsed_s": time.time() - start_time,
                    }
                    log.write(row)
                    bar.set_postfix(bpd=f"{row['bpd']:.3f}", acc=f"{row['accuracy']:.3f}")
                    running = {}
                if time.time() - last_ckpt > cfg["checkpoint_every_s"]:
                    checkpoint()
                    last_ckpt = time.time()
            epoch_done = step % steps_per_epoch == 0
            if (
                epoch_done
                and cfg["eval_every"]
                and (step // steps_per_epoch) % cfg["eval_every"] == 0
            ):
                # EMA copies stale power-iteration vectors with the weights: refresh them first.
                refresh_lipschitz_layers(ema.module)
                metrics = evaluate_predictions(
                    predict(
                        ema.module,
                        val_set,
                        batch_size=cfg["eval_batch_size"],
                        dequant_samples=cfg["eval_dequant_samples"],
                        device=device,
                    )
                )
                log.write(
                    {
                        "step": step,
                        "epoch": step // steps_per_epoch,
                        "split": "val",
                        **metrics,
                        "elapsed_s": time.time() - start_time,
                    }
                )
                model.train()
    except KeyboardInterrupt:
        checkpoint()
        bar.close()
        raise
    finally:
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    bar.close()
    checkpoint()
    refresh_lipschitz_layers(ema.module)
    save_checkpoint(
        {
            "model": ema.module.state_dict(),
            "config": dict(cfg),
            "data": info,
            "step": step,
            "nan_skips": nan_skips,
            "train_time_s": time.time() - start_time,
        },
        run_dir / "model.pt",
    )
    return run_dir


def load_run(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[HybridModel, dict[str, Any]]:
    """Load a finished run's EMA model (``model.pt``) in eval mode, with its config."""
    run_dir = Path(run_dir)
    path = run_dir / "model.pt"
    if not path.exists():
        raise CheckpointError(
            f"{run_dir} has no model.pt: the run did not finish (resume it with "
            f"`hybridflow train --out_dir=... --name={run_dir.name}`)"
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
