"""VAE runs: a typed config, a resumable training loop in a run folder, and the evaluation.

``hybridflow vae train --dataset=fashion-mnist --posterior=iaf-dsf`` trains a
:class:`~hybridflow.models.FlowVAE` on statically binarized images (:func:`~hybridflow.data.
load_binarized`) by maximizing the ELBO, with the hybrid trainer's conventions: timm optimizer,
warmup + cosine schedule, gradient clipping, EMA weights, non-finite steps skipped, a run folder
holding ``config.json``, ``metrics.csv`` (one row per logged step and per validation),
``checkpoint.pt`` (resumed exactly: model, EMA, optimizer, schedule, step, RNG) and ``model.pt``
(EMA weights). ``hybridflow vae eval RUN`` reports −ELBO on the test split and −log p(x) by
importance sampling with ``S`` draws per image (Burda et al. 2016), the numbers of the NAF
paper's Table 1 (Huang et al. 2018), into ``RUN/eval_test.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..data import load_binarized
from ..models import POSTERIORS, FlowVAE
from ..naming import closest_name
from ..runs import CheckpointError, ConfigError, load_checkpoint, save_checkpoint
from .distributed import rng_state, set_rng_state
from .logs import MetricsLog
from .loop import (
    DeferredInterrupts,
    NonFiniteGuard,
    RunningMeans,
    backward_and_clip,
    create_ema,
    create_optimizer_and_scheduler,
)

__all__ = ["VAEConfig", "evaluate_vae", "load_vae_run", "train_vae"]


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Every setting of a VAE run (``--key=value`` on the command line)."""

    dataset: str = "fashion-mnist"
    data_root: str | None = None
    val_fraction: float = 0.1
    binarize_seed: int = 0  # the static binarization's draw
    posterior: str = "iaf-dsf"  # diagonal | iaf | iaf-dsf | iaf-ddsf
    latent_dim: int = 32
    num_flows: int = 2
    context_dim: int = 64
    width: int = 32
    made_hidden: tuple[int, ...] = (320, 320)
    num_units: int = 16
    num_layers: int = 2
    epochs: int = 50
    max_steps: int | None = None
    batch_size: int = 100
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 500
    min_lr: float = 1e-5
    grad_clip: float = 100.0
    ema_decay: float = 0.999
    kl_warmup_steps: int = 0  # β of the KL term rises linearly to 1 over these steps
    eval_every: int = 1  # epochs between validations (−ELBO of the EMA weights)
    log_every: int = 50
    seed: int = 0
    num_threads: int | None = None
    out_dir: str = "runs"
    name: str | None = None
    checkpoint_every_s: float = 120.0
    progress: bool = True

    _POSITIVE: typing.ClassVar[tuple[str, ...]] = (
        "latent_dim",
        "num_flows",
        "width",
        "num_units",
        "num_layers",
        "epochs",
        "batch_size",
        "log_every",
    )

    def __post_init__(self) -> None:
        if self.posterior not in POSTERIORS:
            raise ConfigError(
                f"posterior must be one of {', '.join(POSTERIORS)}, got {self.posterior!r}"
            )
        for key in self._POSITIVE:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be >= 1, got {getattr(self, key)}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")
        for key in ("kl_warmup_steps", "warmup_steps", "weight_decay"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps must be >= 1 or None, got {self.max_steps}")
        if self.eval_every < 1 or self.checkpoint_every_s < 0:
            raise ConfigError("eval_every must be >= 1 and checkpoint_every_s >= 0")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(
                f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}"
            )
        if not 0 <= self.ema_decay < 1 or self.grad_clip <= 0:
            raise ConfigError("ema_decay must lie in [0, 1) and grad_clip be positive")

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any], base: Mapping[str, Any] | None = None):
        """Defaults, then ``base``, then ``overrides``; strings are parsed by each key's type."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        values: dict[str, Any] = {}
        for source in (base or {}), overrides:
            for key, value in source.items():
                if key not in names:
                    guess = closest_name(key, names)
                    hint = f"; did you mean {guess!r}?" if guess else ""
                    raise ConfigError(f"unknown VAE config key {key!r}{hint}")
                values[key] = _parse(key, value, hints[key]) if isinstance(value, str) else value
        if "made_hidden" in values:
            values["made_hidden"] = tuple(int(v) for v in values["made_hidden"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @property
    def run_dir(self) -> Path:
        data = self.dataset.replace(":", "_").replace("/", "_")
        return Path(self.out_dir) / (self.name or f"vae-{data}-{self.posterior}-s{self.seed}")


def _parse(key: str, text: str, hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = args[0] if args and typing.get_origin(hint) is not tuple else hint
    if text.lower() in ("none", "null") and type(None) in typing.get_args(hint):
        return None
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if typing.get_origin(kind) is tuple or kind is tuple:
            return tuple(int(v) for v in json.loads(text))
        return kind(text)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise ConfigError(f"VAE config key {key!r} expects {hint}, got {text!r}") from None


def _build(cfg: VAEConfig, shape: tuple[int, ...]) -> FlowVAE:
    return FlowVAE(
        shape,
        cfg.latent_dim,
        cfg.posterior,
        cfg.num_flows,
        cfg.context_dim,
        cfg.width,
        cfg.made_hidden,
        cfg.num_units,
        cfg.num_layers,
    )


class _VAEMetricsLog(MetricsLog):
    FIELDS = (
        "step",
        "epoch",
        "split",
        "lr",
        "loss",
        "neg_elbo",
        "kl",
        "recon",
        "beta",
        "nan_skips",
        "elapsed_s",
    )


def _data(cfg: VAEConfig, split: str) -> torch.Tensor:
    kw = {"data_root": cfg.data_root, "val_fraction": cfg.val_fraction, "seed": cfg.seed}
    images, _ = load_binarized(cfg.dataset, split, cfg.binarize_seed, **kw)
    return images


@torch.no_grad()
def _neg_elbo(
    model: FlowVAE, images: torch.Tensor, batch: int = 500, samples: int = 1, seed: int = 0
) -> float:
    """Mean −ELBO over ``images``; its draws come from a stream of their own (a validation leaves
    the training stream where it was, so a resumed run draws the same as an uninterrupted one)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return _mean_neg_elbo(model, images, batch, samples)


def _mean_neg_elbo(model: FlowVAE, images: torch.Tensor, batch: int, samples: int) -> float:
    model.eval()
    total = sum(
        float(-model.elbo(images[i : i + batch], samples).sum())
        for i in range(0, len(images), batch)
    )
    return total / len(images)


def train_vae(config: VAEConfig | Mapping[str, Any] | None = None, **overrides: Any) -> Path:
    """Train (or resume) a VAE run on the CPU; return its folder. Ctrl-C or SIGTERM saves a
    checkpoint at the next step boundary first."""
    cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_overrides(overrides, config)
    if isinstance(config, VAEConfig) and overrides:
        cfg = VAEConfig.from_overrides(overrides, cfg.to_dict())
    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.json"
    if config_path.exists() and json.loads(config_path.read_text()) != json.loads(
        json.dumps(cfg.to_dict())
    ):
        raise ConfigError(
            f"{run_dir} holds a run with another config: use another --name or folder"
        )
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    if (run_dir / "model.pt").exists():
        return run_dir
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    train_x, val_x = _data(cfg, "train"), _data(cfg, "val")
    model = _build(cfg, tuple(train_x.shape[1:]))
    steps_per_epoch = len(train_x) // cfg.batch_size
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    optimizer, scheduler = create_optimizer_and_scheduler(
        model,
        opt="adamw",
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        total_steps=total,
        warmup_steps=cfg.warmup_steps,
        min_lr=cfg.min_lr,
        warmup_lr_init=cfg.lr / 100,
    )
    ema = create_ema(model, decay=cfg.ema_decay, use_warmup=True)
    log = _VAEMetricsLog(run_dir / "metrics.csv")
    guard = NonFiniteGuard(50, "lower lr or raise kl_warmup_steps")
    step, elapsed_before, validated_step = 0, 0.0, -1
    running = RunningMeans()
    ckpt = run_dir / "checkpoint.pt"
    if ckpt.exists():
        saved = load_checkpoint(ckpt)
        try:
            model.load_state_dict(saved["model"])
            ema.module.load_state_dict(saved["ema"])
        except RuntimeError as err:
            raise CheckpointError(
                f"{ckpt} does not fit the model its config describes: {err}"
            ) from err
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, elapsed_before = int(saved["step"]), float(saved["elapsed_s"])
        validated_step = int(saved["validated_step"])
        guard.load_state_dict(saved["guard"])
        running.load_state_dict(saved["running"], torch.device("cpu"))
        set_rng_state({"cpu": saved["rng"]}, torch.device("cpu"))
        log.rewind(step, keep_val_at_step=validated_step == step)
    else:
        log.rewind(0)
    started, last_save = time.time(), time.time()
    boundary_rng = rng_state(torch.device("cpu"))["cpu"]  # the RNG where the last step ended

    def elapsed() -> float:
        return elapsed_before + time.time() - started

    def save() -> None:
        save_checkpoint(
            {
                "model": model.state_dict(),
                "ema": ema.module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "validated_step": validated_step,
                "guard": guard.state_dict(),
                "running": running.state_dict(),
                "rng": boundary_rng,
                "elapsed_s": elapsed(),
                "config": cfg.to_dict(),
            },
            ckpt,
        )

    progress = tqdm(
        total=total, initial=step, disable=not cfg.progress, desc=run_dir.name, leave=False
    )
    # Signals land between steps (all of a step's update or none), where the state is saved.
    with progress, DeferredInterrupts() as interrupts:
        try:
            while True:
                epochs_done, offset = divmod(step, steps_per_epoch)
                due = step > 0 and offset == 0 and epochs_done % cfg.eval_every == 0
                if due and validated_step != step:
                    row = {"step": step, "epoch": epochs_done, "split": "val"}
                    log.write(
                        {**row, "neg_elbo": _neg_elbo(ema.module, val_x), "elapsed_s": elapsed()}
                    )
                    validated_step = step
                if step >= total:
                    break
                order = torch.randperm(
                    len(train_x),
                    generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epochs_done),
                )
                model.train()
                for idx in order.split(cfg.batch_size)[offset:steps_per_epoch]:
                    if step >= total:
                        break
                    x = train_x[idx]
                    beta = (
                        min(1.0, (step + 1) / cfg.kl_warmup_steps) if cfg.kl_warmup_steps else 1.0
                    )
                    # One draw per image; β weighs the KL part log q(z|x) − log p(z) (1: ELBO).
                    recon, kl = model.elbo_terms(x)
                    loss = (-recon + beta * kl).mean()
                    finite = backward_and_clip(loss, model, optimizer, cfg.grad_clip)
                    with interrupts.deferred():
                        guard.record(finite, step)
                        if finite:
                            optimizer.step()
                            ema.update(model, step=step)
                            running.add("loss", loss)
                            running.add("neg_elbo", (kl - recon).mean())
                            running.add("kl", kl.mean())
                            running.add("recon", -recon.mean())
                            running.step()
                        step += 1
                        scheduler.step_update(step)
                        if step % cfg.log_every == 0 and running.steps:
                            row = {"step": step, "epoch": epochs_done, "split": "train"}
                            row |= {"lr": optimizer.param_groups[0]["lr"], **running.means()}
                            row |= {"beta": beta, "nan_skips": guard.skipped}
                            log.write({**row, "elapsed_s": elapsed()})
                            running = RunningMeans()
                        boundary_rng = rng_state(torch.device("cpu"))["cpu"]
                    progress.update(1)
                    if time.time() - last_save > cfg.checkpoint_every_s:
                        save()
                        last_save = time.time()
        except KeyboardInterrupt:
            save()
            raise
    save()
    save_checkpoint(
        {
            "model": ema.module.state_dict(),
            "config": cfg.to_dict(),
            "image_shape": list(train_x.shape[1:]),
            "step": step,
            "train_time_s": elapsed_before + time.time() - started,
            "nan_skips": guard.skipped,
        },
        run_dir / "model.pt",
    )
    return run_dir


def load_vae_run(run_dir: str | Path) -> tuple[FlowVAE, VAEConfig]:
    """The EMA model of a finished VAE run (eval mode) and its config."""
    saved = load_checkpoint(Path(run_dir) / "model.pt")
    cfg = VAEConfig.from_overrides({}, saved["config"])
    model = _build(cfg, tuple(saved["image_shape"]))
    model.load_state_dict(saved["model"])
    return model.eval(), cfg


def evaluate_vae(
    run_dir: str | Path, samples: int = 1000, nll_images: int | None = 1000, seed: int = 0
) -> dict[str, Any]:
    """Test −ELBO (every image, 1 draw each) and −log p(x) by importance sampling with
    ``samples`` draws per image on the first ``nll_images`` test images (``None``: all);
    written to ``RUN/eval_test.json``. ``seed`` fixes the draws; the global stream is left as
    it was. Runs on the CPU (as :func:`train_vae`)."""
    model, cfg = load_vae_run(run_dir)
    test_x = _data(cfg, "test")
    neg_elbo = _neg_elbo(model, test_x, seed=seed)
    subset = test_x if nll_images is None else test_x[:nll_images]
    chunk = max(1, min(samples, 20_000 // max(1, len(subset[:50]))))
    with torch.random.fork_rng():  # the caller's stream stays where it was
        torch.manual_seed(seed + 1)
        nll = torch.cat(
            [
                -model.log_likelihood(subset[i : i + 50], samples, chunk)
                for i in range(0, len(subset), 50)
            ]
        )
    neg_elbo_subset = _neg_elbo(model, subset, seed=seed)
    result = {
        "dataset": cfg.dataset,
        "posterior": cfg.posterior,
        "test_images": len(test_x),
        "neg_elbo": neg_elbo,
        "nll_images": len(subset),
        "samples": samples,
        "neg_log_likelihood": float(nll.mean()),
        "neg_log_likelihood_se": float(nll.std() / math.sqrt(len(nll))),
        "neg_elbo_on_nll_images": neg_elbo_subset,
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
    (Path(run_dir) / "eval_test.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
