"""The pairs timed by ``benchmarks/peers.py``: one module per family of flows.

Every module defines ``cases(tiny: bool) -> list[Case]``. A case is one pair (our model and the
peer library's) at one setting; building a side returns a :class:`Side`, a few callables the
harness times. Peer code is imported from the installed package (``pip install -e .[bench]``) or
from a checkout the user names with ``--peer-path NAME=DIR``; it is never copied here. A side
whose peer cannot be imported raises :class:`PeerMissing`, and the harness skips the case with
the message.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "MODULES",
    "Case",
    "PeerMissing",
    "Side",
    "all_cases",
    "all_parity_cases",
    "count_parameters",
    "import_peer",
    "peer_checkout",
    "set_peer_paths",
    "speed_targets",
    "standard_normal_log_prob",
    "target_at",
]

MODULES = ("autoregressive", "coupling", "resflow", "flowpp")
_PEER_PATHS: dict[str, Path] = {}


class PeerMissing(RuntimeError):  # noqa: N818 (named for the state it reports)
    """The peer library of a case is not installed or its checkout was not given."""


@dataclass
class Side:
    """One model of a pair, ready to time.

    Attributes:
        label: What it is, e.g. ``"zuko 1.6.0 MAF"``.
        module: The model (its parameters are counted and trained).
        log_prob: Per-example log-likelihood ``[B]`` of a batch from ``Case.make_input``.
        sample: Draws ``n`` examples (``None`` where the pair does not time sampling).
        train_loss: Scalar loss of one training step (default: ``-log_prob(x).mean()``).
    """

    label: str
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor] | None = None
    train_loss: Callable[[Tensor], Tensor] | None = None

    def loss(self, x: Tensor) -> Tensor:
        return self.train_loss(x) if self.train_loss is not None else -self.log_prob(x).mean()


@dataclass
class Case:
    """One pair at one setting.

    Attributes:
        pair: Family and peer, e.g. ``"maf-affine/zuko"``.
        setting: What varies within the pair, e.g. ``"D=64"``.
        make_input: ``batch -> x`` (the same tensor is fed to both sides).
        build_ours: Builds our side.
        build_peer: Builds the peer's side (raises :class:`PeerMissing`).
        batches: Batch sizes timed (full run).
        targets: Ours / peer time at or below which a mode passes, per mode (``"eval"``,
            ``"train"``, ``"sample"``, ``"memory"``): one number for every batch, or a dict
            ``{"batch": target}`` (:func:`speed_targets`); a mode or batch without one is
            recorded only.
        sample_batches: Batch sizes at which sampling is timed (a subset of ``batches``).
        memory_batch: Batch of the training step whose peak memory is measured (``None``: no
            memory measurement).
        note: What differs between the two sides and anything a reader must know.
        param_tolerance: Largest relative difference of the parameter counts (5%; a case
            allowed more says why in its note).
    """

    pair: str
    setting: str
    make_input: Callable[[int], Tensor]
    build_ours: Callable[[], Side]
    build_peer: Callable[[], Side]
    batches: tuple[int, ...] = (1, 64, 1024)
    targets: dict[str, float | dict[str, float]] = field(default_factory=dict)
    sample_batches: tuple[int, ...] = ()
    memory_batch: int | None = 64
    note: str = ""
    param_tolerance: float = 0.05

    @property
    def key(self) -> str:
        return f"{self.pair} {self.setting}"


def speed_targets(
    training_batches: tuple[int, ...],
    training: float = 0.8,
    single: float = 1.0,
    **others: float | dict[str, float],
) -> dict[str, float | dict[str, float]]:
    """The speed issue's targets: train and eval at most ``training`` × the peer's time at the
    pair's training batches and ``single`` × at batch 1; ``others`` add or replace modes."""
    per_batch = {"1": single, **{str(b): training for b in training_batches}}
    return {"eval": dict(per_batch), "train": dict(per_batch), **others}


def target_at(targets: dict, mode: str, batch: int | str) -> float | None:
    """The target of ``mode`` at ``batch`` (``None``: recorded, no target)."""
    target = targets.get(mode)
    return target.get(str(batch)) if isinstance(target, dict) else target


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """``log N(z; 0, I)`` summed over all but the batch dimension."""
    return (-0.5 * z.pow(2) - 0.5 * torch.log(torch.tensor(2 * torch.pi))).flatten(1).sum(1)


def set_peer_paths(paths: dict[str, str]) -> None:
    """Record ``--peer-path NAME=DIR`` checkouts (also read from ``HYBRIDFLOW_PEER_<NAME>``)."""
    _PEER_PATHS.update({name: Path(path).expanduser().resolve() for name, path in paths.items()})


def peer_checkout(name: str, hint: str) -> Path:
    """The checkout of peer ``name``, or :class:`PeerMissing` saying how to give it."""
    path = _PEER_PATHS.get(name)
    env = os.environ.get(f"HYBRIDFLOW_PEER_{name.upper().replace('-', '_')}")
    if path is None and env:
        path = Path(env).expanduser().resolve()
    if path is None:
        raise PeerMissing(f"{name}: no checkout given (--peer-path {name}=DIR; {hint})")
    if not path.is_dir():
        raise PeerMissing(f"{name}: {path} is not a directory")
    return path


def import_peer(module: str, extra: str = "bench") -> object:
    """``importlib.import_module(module)`` or :class:`PeerMissing` naming the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise PeerMissing(
            f"{module} is not installed ({error}); pip install -e .[{extra}]"
        ) from None


def _family_modules() -> list[object]:
    """The family modules written so far, imported with ``benchmarks/`` on ``sys.path``."""
    here = str(Path(__file__).resolve().parent.parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    modules = []
    for name in MODULES:
        try:
            modules.append(importlib.import_module(f"peer_pairs.{name}"))
        except ModuleNotFoundError as error:
            if error.name != f"peer_pairs.{name}":
                raise
    return modules


def all_parity_cases() -> list:
    """Every pair trained side by side by ``recipes/parity.py`` (``parity_cases()`` of each
    family module), in order."""
    return [c for m in _family_modules() if hasattr(m, "parity_cases") for c in m.parity_cases()]


def all_cases(tiny: bool, only: str | None = None) -> list[Case]:
    """Every case of every module, in order; ``only`` keeps the cases whose key (pair and
    setting, e.g. ``"maf-affine/zuko D=8"``) contains it.

    ``tiny`` keeps the first setting of each pair (the harness's CI mode).
    """
    cases = [c for m in _family_modules() for c in m.cases(tiny)]
    cases = [c for c in cases if only is None or only in c.key]
    if tiny:  # CI: the first setting of every pair keeps the harness from rotting, in seconds
        firsts: dict[str, Case] = {}
        for case in cases:
            firsts.setdefault(case.pair, case)
        cases = list(firsts.values())
    return cases
