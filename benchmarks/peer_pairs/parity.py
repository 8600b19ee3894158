"""Side-by-side training of a pair (ours, the peer's) on identical inputs, for the parity recipe.

One loop trains both models of a pair in lockstep: at every step both see the same batch, the
same dequantization noise ``u`` and the same optimizer (Adam), learning-rate schedule (linear
warmup + cosine, timm), gradient-norm clipping and EMA, all built by the library's own training
pieces (:mod:`hybridflow.training.loop`) for both sides alike. Which side steps first alternates
every step, so a noisy machine slows both equally; each side's training seconds are measured
around its own step only. At evenly spaced checkpoints both EMA models are scored on the same
validation examples with the same fixed noise; at the end on the test split. Each side is
scored by its own ``log_prob`` with every Jacobian it has (dequantization, logit), in nats of
the data's own alphabet, so ``bits/dim = -log_prob / (D ln 2)`` compares like with like.

A run folder holds ``state.pt`` (rewritten atomically at every checkpoint: both models,
optimizers, schedules, EMAs, RNG states and the history) and, once finished, ``result.json``
and ``scored.pt`` (the EMA weights the test split was scored with);
an interrupted run resumes from its last checkpoint and a finished one is not run again.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hybridflow.runs import load_checkpoint, save_checkpoint
from hybridflow.training.batches import epoch_batches
from hybridflow.training.loop import (
    backward_and_clip,
    create_ema,
    create_optimizer_and_scheduler,
)

__all__ = [
    "SIDES",
    "ParityCase",
    "ParityData",
    "ParitySide",
    "RunClaimed",
    "TrainSettings",
    "claim",
    "current_result",
    "finished",
    "image_data",
    "rescore",
    "retire_stale",
    "run_seed",
    "stale_revision",
    "vector_data",
]

SIDES = ("ours", "peer")
VAL_NOISE_SEED, TEST_NOISE_SEED, IW_NOISE_SEED = 1_000_003, 2_000_003, 3_000_003


@dataclass
class ParitySide:
    """One model of a pair, ready to train side by side.

    Attributes:
        label: What it is, e.g. ``"normflows 1.7.3 Glow steps"``.
        module: The trained parameters (its EMA copy is what gets scored).
        loss: ``(x, y, u) -> scalar`` training loss of a batch for ``module``; ``u`` is the
            dequantization noise in ``[0, 1)`` (``None`` for continuous data).
        score: ``(module, x, u) -> (log_prob [B] in nats, logits [B, K] or None)`` for any copy
            of ``module`` (the EMA copy), in eval mode, without gradients.
        finalize: Makes an EMA copy ready to score (e.g. power iterations to convergence for
            spectrally normalised layers); ``None`` when nothing is needed.
    """

    label: str
    module: nn.Module
    loss: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    score: Callable[[nn.Module, Tensor, Tensor | None], tuple[Tensor, Tensor | None]]
    finalize: Callable[[nn.Module], None] | None = None


@dataclass
class ParityData:
    """The splits of a pair's data set (levels as float for images, points for vectors).

    Attributes:
        num_levels: Pixel alphabet (256) or ``None`` for continuous data.
        true_log_prob: The data's exact log-density (nats) where known (2-D toys).
        source: Where the data came from, for the report.
    """

    train_x: Tensor
    train_y: Tensor
    val_x: Tensor
    val_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_levels: int | None
    source: str
    true_log_prob: Callable[[Tensor], Tensor] | None = None

    @property
    def dim(self) -> int:
        return math.prod(self.train_x.shape[1:])


@dataclass(frozen=True)
class TrainSettings:
    """The optimisation both sides share (Adam with the Residual Flows reference's betas).

    ``select="best"`` scores each side's test split with its EMA weights at the checkpoint of
    its best validation bits/dim (early stopping, the MAF and NAF papers' protocol for small
    tables); ``"final"`` with the weights after the last step. ``iw_samples > 0`` adds the
    importance-weighted bound with that many noise draws per example (Flow++ eq. 13; Burda et
    al. 2016) on the first ``iw_size`` test examples, after the test split is scored.
    """

    steps: int = 1500
    batch: int = 64
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    min_lr: float = 1e-5
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    evals: int = 12
    eval_batch: int = 256
    val_size: int = 1000
    test_size: int | None = None  # None: the whole test split
    select: str = "final"  # or "best": the checkpoint with the best validation bits/dim
    iw_samples: int = 0
    iw_size: int = 0

    def smoke(self) -> TrainSettings:
        """A few steps on a few examples: the code path, not the numbers."""
        return replace(
            self,
            steps=4,
            batch=min(self.batch, 8),
            warmup_steps=2,
            evals=2,
            val_size=8,
            test_size=8,
            eval_batch=8,
            iw_samples=min(self.iw_samples, 2),
            iw_size=min(self.iw_size, 8),
        )


@dataclass
class ParityCase:
    """One pair on one data set.

    Attributes:
        pair: ``"<ours>/<peer>"``, e.g. ``"realnvp/normflows"``.
        setting: The data set (and task variant), e.g. ``"fashion-mnist"``.
        task: ``"density"`` or ``"hybrid"`` (λ = 1/D: ``CE + NLL / D``; accuracy reported).
        load_data: Builds the splits (``smoke``: a few examples, random where files are absent).
        build_ours, build_peer: ``(data, seed, smoke) -> ParitySide``.
        settings: Shared optimisation; ``seeds`` runs of it.
        differences: Every remaining difference between the two sides, for the report.
        revision: Bumped when a side changes (a library default, the pair's configuration):
            runs of an older revision are neither resumed, restored nor reported.
        findings: Where ours is behind: what the trace found and the measurement behind it
            (the report lists every miss, with this or "not traced yet").
    """

    pair: str
    setting: str
    task: str
    load_data: Callable[[bool], ParityData]
    build_ours: Callable[[ParityData, int, bool], ParitySide]
    build_peer: Callable[[ParityData, int, bool], ParitySide]
    settings: TrainSettings = field(default_factory=TrainSettings)
    seeds: int = 3
    differences: tuple[str, ...] = ()
    revision: int = 0
    findings: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.pair} {self.setting}"

    @property
    def folder_name(self) -> str:
        """``key`` as a file name: ``realnvp--normflows__fashion-mnist``."""
        name = f"{self.pair}__{self.setting}".replace("λ=1/D", "lam1overD").replace("/", "--")
        return re.sub(r"[^A-Za-z0-9_.+-]+", "_", name)


def _noise(shape: torch.Size, seed: int) -> Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _batch(n: int, batch: int, seed: int, step: int, cache: dict[int, list[Tensor]]) -> Tensor:
    per_epoch = n // batch
    epoch, i = divmod(step, per_epoch)
    if epoch not in cache:
        cache.clear()
        cache[epoch] = epoch_batches(n, batch, seed, epoch)
    return cache[epoch][i]


def _score_all(
    side: ParitySide, module: nn.Module, x: Tensor, u: Tensor | None, batch: int
) -> tuple[Tensor, Tensor | None]:
    """``(log_prob [N] float64, logits [N, K] or None)`` of ``module`` over ``x`` in batches."""
    log_probs, logits = [], []
    for i in range(0, len(x), batch):
        lp, lg = side.score(module, x[i : i + batch], None if u is None else u[i : i + batch])
        log_probs.append(lp.double())
        if lg is not None:
            logits.append(lg.double())
    return torch.cat(log_probs), torch.cat(logits) if logits else None


def _ready(side: ParitySide, module: nn.Module) -> None:
    """Make an EMA copy ready to score: the side's ``finalize``, eval mode."""
    if side.finalize is not None:
        side.finalize(module)
    module.eval()


@torch.no_grad()
def _evaluate(
    side: ParitySide,
    module: nn.Module,
    x: Tensor,
    y: Tensor,
    u: Tensor | None,
    batch: int,
    dim: int,
) -> dict[str, float]:
    """Mean bits/dim (and accuracy, CE where the side classifies) of the EMA ``module``."""
    _ready(side, module)
    lp, logits = _score_all(side, module, x, u, batch)
    finite = torch.isfinite(lp)
    # A side can give a few examples a non-finite log-likelihood (an unbounded scale map): the
    # means are over the finite ones, and the share of finite ones is reported beside them.
    mean = lp[finite].mean() if bool(finite.any()) else lp.new_tensor(math.nan)
    out = {"bpd": float(-mean / (dim * math.log(2))), "log_prob": float(mean)}
    out["finite"] = float(finite.double().mean())
    # A mean can be carried by a few examples: the median, and the share of examples a model
    # codes worse than 8 bits/dim (a uniform model of 256 levels), show whether it is.
    bpd = (-lp / (dim * math.log(2))).nan_to_num(math.inf)
    out["median_bpd"] = float(bpd.median())
    out["above_8_bpd"] = float((bpd > 8).double().mean())
    if logits is not None:
        out["accuracy"] = float((logits.argmax(1) == y).double().mean())
        out["ce"] = float(nn.functional.cross_entropy(logits, y))
    return out


@torch.no_grad()
def _evaluate_iw(
    side: ParitySide, module: nn.Module, x: Tensor, samples: int, batch: int, dim: int
) -> dict[str, float]:
    """Importance-weighted bound ``log (1/S) Σ_s p(x, u_s) / q(u_s | x)`` of the EMA ``module``.

    Each draw ``s`` is the side's own ``score`` at the noise ``u_s`` (seeded, the same for both
    sides): with uniform dequantization ``q = 1`` and ``u_s`` is the noise, with variational
    dequantization the side draws ``ε`` from ``u_s`` and ``score`` is its one-sample bound.
    The bound never decreases with ``S`` in expectation, so the two sides compare at equal ``S``.
    """
    _ready(side, module)
    log_w = torch.stack(  # [S, N]
        [
            _score_all(side, module, x, _noise(x.shape, IW_NOISE_SEED + k), batch)[0]
            for k in range(samples)
        ]
    )
    bound = torch.logsumexp(log_w, 0) - math.log(samples)
    finite = torch.isfinite(bound)
    mean = bound[finite].mean() if bool(finite.any()) else bound.new_tensor(math.nan)
    # The one-sample bound averaged over the same S draws: the IW bound is never below it for
    # any example (Jensen), so the gap is what importance weighting bought.
    kept = log_w[:, finite]
    single = kept[torch.isfinite(kept)].mean() if bool(finite.any()) else bound.new_tensor(math.nan)
    return {
        "bpd": float(-mean / (dim * math.log(2))),
        "single_bpd": float(-single / (dim * math.log(2))),
        "finite": float(finite.double().mean()),
        "samples": samples,
        "examples": len(x),
    }


def _score_test(
    side: ParitySide,
    module: nn.Module,
    data: ParityData,
    n_test: int,
    settings: TrainSettings,
) -> dict[str, Any]:
    """The test split's numbers of ``module``: :func:`_evaluate` on the first ``n_test``
    examples at the test noise, and the importance-weighted bound where ``settings`` asks."""
    x, y = data.test_x[:n_test], data.test_y[:n_test]
    u = _noise(x.shape, TEST_NOISE_SEED) if data.num_levels is not None else None
    out = _evaluate(side, module, x, y, u, settings.eval_batch, data.dim)
    if settings.iw_samples:
        out["iw"] = _evaluate_iw(
            side, module, x[: settings.iw_size], settings.iw_samples, settings.eval_batch, data.dim
        )
    return out


def _numpy_rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
        "name": name,
    }


def _set_numpy_rng_state(state: dict[str, Any]) -> None:
    np.random.set_state(
        (
            state["name"],
            state["keys"].numpy().astype(np.uint32),
            state["pos"],
            state["has_gauss"],
            state["cached"],
        )
    )


class RunClaimed(RuntimeError):  # noqa: N818 (named for the state it reports)
    """Another live process is training this run folder."""


@contextlib.contextmanager
def claim(folder: Path) -> Iterator[None]:
    """Hold ``folder/running.pid`` while training, so that two invocations of the recipe (e.g.
    one per core with different ``--only``) never train the same run; a stale file left by a
    killed process is taken over."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / "running.pid"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(lock.read_text() or 0), 0)
            except (ProcessLookupError, ValueError):
                lock.unlink(missing_ok=True)  # its process is gone
                continue
            except PermissionError:
                pass  # alive, another user's
            raise RunClaimed(f"{folder} is being trained by process {lock.read_text()}") from None
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def current_result(case: ParityCase, folder: Path) -> dict | None:
    """The ``result.json`` in ``folder`` if it is a finished run of ``case``'s current revision."""
    path = folder / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    return result if result.get("revision", 0) == case.revision else None


def finished(case: ParityCase, folder: Path) -> bool:
    """Whether ``folder`` holds a finished run of ``case`` at its current revision."""
    return current_result(case, folder) is not None


def stale_revision(state_path: Path, revision: int) -> bool:
    """Whether an in-progress ``state.pt`` was trained by another revision of its case."""
    return load_checkpoint(state_path)["config"].get("revision", 0) != revision


def retire_stale(case: ParityCase, folder: Path, log: Callable[[str], None] = print) -> None:
    """Move a ``result.json`` or ``state.pt`` of another revision of ``case`` aside (kept as
    ``result.revisionN.json`` / ``state.stale.pt``), so the run trains or restores afresh."""
    path, state_path = folder / "result.json", folder / "state.pt"
    if path.exists() and current_result(case, folder) is None:
        old = json.loads(path.read_text()).get("revision", 0)
        log(f"  {path} is of revision {old}: kept as result.revision{old}.json")
        path.replace(folder / f"result.revision{old}.json")
    if state_path.exists() and stale_revision(state_path, case.revision):
        log(f"  {state_path} is of an older revision: training from the start")
        state_path.replace(folder / "state.stale.pt")


def rescore(case: ParityCase, seed: int, folder: Path, data: ParityData | None = None) -> dict:
    """Score a finished run's kept weights (``scored.pt``) on its test split again with the
    current :func:`_evaluate` and update its ``result.json`` (e.g. after a metric was added)."""
    result = current_result(case, folder)
    if result is None:
        raise ValueError(
            f"{folder} holds no finished run of {case.key} at its revision {case.revision}: "
            "train it again instead"
        )
    s = TrainSettings(**{**result["settings"], "betas": tuple(result["settings"]["betas"])})
    data = data if data is not None else case.load_data(False)
    weights = load_checkpoint(folder / "scored.pt")["model"]
    for name, build in (("ours", case.build_ours), ("peer", case.build_peer)):
        torch.manual_seed(seed)
        np.random.seed(seed)
        side = build(data, seed, False)
        side.module.load_state_dict(weights[name])
        result["test"][name] = _score_test(side, side.module, data, result["data"]["test"], s)
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return result


def run_seed(
    case: ParityCase,
    seed: int,
    folder: Path,
    *,
    smoke: bool = False,
    log: Callable[[str], None] = print,
    data: ParityData | None = None,
) -> dict[str, Any]:
    """Train both sides of ``case`` from ``seed`` in ``folder`` (resuming); the result dict."""
    folder.mkdir(parents=True, exist_ok=True)
    result_path, state_path = folder / "result.json", folder / "state.pt"
    if (result := current_result(case, folder)) is not None:
        return result
    retire_stale(case, folder, log)
    s = case.settings.smoke() if smoke else case.settings
    data = data if data is not None else case.load_data(smoke)
    torch.manual_seed(seed)
    np.random.seed(seed)
    sides = {"ours": case.build_ours(data, seed, smoke)}
    torch.manual_seed(seed)
    np.random.seed(seed)  # the reference codes draw some of their randomness with numpy
    sides["peer"] = case.build_peer(data, seed, smoke)
    opts, scheds, emas = {}, {}, {}
    for name, side in sides.items():
        opts[name], scheds[name] = create_optimizer_and_scheduler(
            side.module,
            opt="adam",
            lr=s.lr,
            weight_decay=0.0,
            total_steps=s.steps,
            warmup_steps=s.warmup_steps,
            min_lr=s.min_lr,
            warmup_lr_init=s.lr / 100,
            opt_args={"betas": s.betas},
        )
        emas[name] = create_ema(side.module, decay=s.ema_decay, use_warmup=True)
    params = {
        n: sum(p.numel() for p in side.module.parameters() if p.requires_grad)
        for n, side in sides.items()
    }
    val_x, val_y = data.val_x[: s.val_size], data.val_y[: s.val_size]
    n_test = len(data.test_x) if s.test_size is None else min(s.test_size, len(data.test_x))
    discrete = data.num_levels is not None
    val_u = _noise(val_x.shape, VAL_NOISE_SEED) if discrete else None
    state: dict[str, Any] = {
        "step": 0,
        "train_s": dict.fromkeys(SIDES, 0.0),
        "skipped": dict.fromkeys(SIDES, 0),
        "loss_sum": dict.fromkeys(SIDES, 0.0),
        "loss_n": 0,
        "history": [],
        "best": {name: {"bpd": math.inf, "step": 0} for name in SIDES},
    }
    best_weights: dict[str, dict[str, Tensor]] = {}
    if state_path.exists():
        ckpt = load_checkpoint(state_path)
        for name, side in sides.items():
            side.module.load_state_dict(ckpt["model"][name])
            emas[name].module.load_state_dict(ckpt["ema"][name])
            opts[name].load_state_dict(ckpt["optimizer"][name])
            scheds[name].load_state_dict(ckpt["scheduler"][name])
        state = ckpt["config"]["state"]
        best_weights = ckpt.get("best_weights", {})
        torch.set_rng_state(ckpt["rng"]["torch"])
        _set_numpy_rng_state(ckpt["rng"]["numpy"])
        log(f"  resumed at step {state['step']}")

    def checkpoint() -> None:
        """Score both EMA models on the validation examples; save everything (atomically)."""
        row: dict[str, Any] = {"step": state["step"]}
        for name, side in sides.items():
            row[name] = _evaluate(
                side, emas[name].module, val_x, val_y, val_u, s.eval_batch, data.dim
            )
            row[name]["train_s"] = state["train_s"][name]
            row[name]["train_loss"] = state["loss_sum"][name] / max(state["loss_n"], 1)
            state["loss_sum"][name] = 0.0
            side.module.train()
            if s.select == "best" and row[name]["bpd"] < state["best"][name]["bpd"]:
                state["best"][name] = {"bpd": row[name]["bpd"], "step": state["step"]}
                best_weights[name] = copy.deepcopy(emas[name].module.state_dict())
        state["loss_n"] = 0
        state["history"].append(row)
        log(
            f"  step {state['step']}/{s.steps}: "
            + ", ".join(
                f"{n} val {row[n]['bpd']:.4f} bits/dim"
                + (f" acc {row[n]['accuracy']:.4f}" if "accuracy" in row[n] else "")
                + f" ({row[n]['train_s']:.0f} s)"
                for n in SIDES
            )
        )
        save_checkpoint(
            {
                "model": {n: side.module.state_dict() for n, side in sides.items()},
                "ema": {n: e.module.state_dict() for n, e in emas.items()},
                "optimizer": {n: o.state_dict() for n, o in opts.items()},
                "scheduler": {n: sc.state_dict() for n, sc in scheds.items()},
                "config": {
                    "state": state,
                    "case": case.key,
                    "seed": seed,
                    "revision": case.revision,
                },
                "rng": {"torch": torch.get_rng_state(), "numpy": _numpy_rng_state()},
                "best_weights": best_weights,
            },
            state_path,
        )

    if not state["history"]:
        checkpoint()  # the untrained models: where both curves start
    eval_steps = {round(s.steps * k / s.evals) for k in range(1, s.evals + 1)}
    cache: dict[int, list[Tensor]] = {}
    for side in sides.values():
        side.module.train()
    while state["step"] < s.steps:
        step = state["step"]
        idx = _batch(len(data.train_x), s.batch, seed, step, cache)
        x, y = data.train_x[idx], data.train_y[idx]
        u = _noise(x.shape, seed * 7_919_993 + step) if discrete else None
        for name in SIDES if step % 2 == 0 else SIDES[::-1]:
            side, start = sides[name], time.perf_counter()
            loss = side.loss(x, y, u)
            if backward_and_clip(loss, side.module, opts[name], s.grad_clip):
                opts[name].step()
                emas[name].update(side.module, step=step)
                state["loss_sum"][name] += float(loss.detach())
            else:
                state["skipped"][name] += 1
            scheds[name].step_update(step + 1)
            state["train_s"][name] += time.perf_counter() - start
        state["loss_n"] += 1
        state["step"] = step + 1
        if state["step"] in eval_steps:
            checkpoint()
    for name, weights in best_weights.items():
        emas[name].module.load_state_dict(weights)
    test = {
        name: _score_test(side, emas[name].module, data, n_test, s) for name, side in sides.items()
    }
    if data.true_log_prob is not None:
        true_lp = data.true_log_prob(data.test_x[:n_test].double())
        test["true"] = {
            "bpd": float(-true_lp.mean() / (data.dim * math.log(2))),
            "log_prob": float(true_lp.mean()),
        }
    result = {
        "case": case.key,
        "pair": case.pair,
        "setting": case.setting,
        "task": case.task,
        "revision": case.revision,
        "seed": seed,
        "labels": {n: side.label for n, side in sides.items()},
        "parameters": params,
        "settings": asdict(s),
        "smoke": smoke,
        "data": {
            "source": data.source,
            "dim": data.dim,
            "num_levels": data.num_levels,
            "train": len(data.train_x),
            "val": len(val_x),
            "test": n_test,
        },
        "history": state["history"],
        "test": test,
        "train_s": state["train_s"],
        "skipped": state["skipped"],
        "s_per_step": {n: state["train_s"][n] / s.steps for n in SIDES},
        "selected_step": {
            n: state["best"][n]["step"] if s.select == "best" else s.steps for n in SIDES
        },
    }
    # The scored weights stay for later rescoring (more test examples, other bounds).
    save_checkpoint(
        {
            "model": {n: e.module.state_dict() for n, e in emas.items()},
            "config": {"case": case.key, "seed": seed, "select": s.select},
        },
        folder / "scored.pt",
    )
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(result_path)
    state_path.unlink(missing_ok=True)
    return result


def image_data(name: str = "fashion-mnist", smoke: bool = False) -> ParityData:
    """Train/val/test levels of an image set of :func:`hybridflow.data.load_dataset`.

    ``smoke`` takes a few examples, and random levels where the files are absent (CI without
    the Debian package), so the code path still runs.
    """
    from hybridflow.data import load_dataset

    try:
        splits = {p: load_dataset(name, p) for p in ("train", "val", "test")}
    except Exception as error:  # whatever is missing, a smoke run goes on
        if not smoke:
            raise
        g = torch.Generator().manual_seed(0)
        fake = {
            p: (
                torch.randint(0, 256, (64, 1, 28, 28), generator=g).float(),
                torch.randint(0, 10, (64,), generator=g),
            )
            for p in ("train", "val", "test")
        }
        return ParityData(
            *fake["train"],
            *fake["val"],
            *fake["test"],
            num_levels=256,
            source=f"random levels ({type(error).__name__}: {name} absent)",
        )
    n = 64 if smoke else None
    arrays = [
        t
        for p in ("train", "val", "test")
        for t in (splits[p].images[:n].float(), splits[p].labels[:n])
    ]
    return ParityData(
        *arrays,
        num_levels=splits["train"].num_levels,
        source=f"{name} via hybridflow.data.load_dataset (val = 10% of train)",
    )


def vector_data(name: str, smoke: bool = False) -> ParityData:
    """Splits of a 2-D toy (``toy:NAME``, exact log-density attached) or a table (``sk:NAME``)."""
    from hybridflow.data.tabular import load_tabular
    from hybridflow.data.toy import make_toy_dataset, toy_log_density

    if name.startswith("toy:"):
        splits = {p: make_toy_dataset(name, p) for p in ("train", "val", "test")}
        true = lambda pts: toy_log_density(name, pts)  # noqa: E731
        source = f"{name} (hybridflow.data.toy: 20,000 / 2,000 / 10,000 points)"
    else:
        splits = {p: load_tabular(name, p) for p in ("train", "val", "test")}
        true = None
        source = f"{name} (scikit-learn's bundled table, standardised; 70/10/20 split)"
    n = 64 if smoke else None
    arrays = [
        t
        for p in ("train", "val", "test")
        for t in (splits[p].points[:n].float(), splits[p].labels[:n])
    ]
    return ParityData(*arrays, num_levels=None, source=source, true_log_prob=true)
