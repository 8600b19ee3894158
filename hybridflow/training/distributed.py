"""Data-parallel training under ``torchrun``: the process group, collectives and random streams.

``torchrun --standalone --nproc_per_node=N -m hybridflow train --key=value ...`` starts N
processes that run :func:`~hybridflow.training.train` with the same config (gloo on CPU, NCCL on
GPUs, one GPU per process). Without ``torchrun`` (``WORLD_SIZE`` unset or 1) everything here
reduces to no-ops and the run is the single-process run, bit for bit.

Random numbers come from two streams on every rank:

* the **shared** stream, the default torch generators seeded with ``seed`` on every rank: it draws
  whatever is random about the *global* batch (random shifts, level perturbation, uniform
  dequantization noise), identically on every rank, so each rank cuts its share from the same
  global draws and the run sees the inputs one process would see;
* the rank's **own** stream (:class:`RankStream`), swapped in for the model's forward and backward
  passes and for validation: dropout masks, residual-flow probes and roulette draws, variational
  dequantization noise. These are per rank and differ from what one process would draw.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "Distributed",
    "LossModule",
    "RankStream",
    "init_distributed",
    "resolve_device",
    "rng_state",
    "set_rng_state",
]


def resolve_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of this process: ``auto`` is CUDA when available; under ``torchrun`` each
    process takes GPU ``LOCAL_RANK``."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda" and world_size > 1:
        if device.index is not None:
            raise ValueError(
                f"device {spec!r} names one GPU, but torchrun starts {world_size} processes: "
                "give --device=cuda (or auto) and each process takes GPU LOCAL_RANK"
            )
        device = torch.device("cuda", local_rank)
    return device


class Distributed:
    """This process's place in a data-parallel run: rank ``0`` of ``1`` without ``torchrun``.

    Args:
        device: The device this process trains on.
        rank: Global rank.
        world_size: Number of processes.
        owns_group: Whether :meth:`close` destroys the process group (it was created here).
    """

    def __init__(
        self, device: torch.device, rank: int = 0, world_size: int = 1, owns_group: bool = False
    ) -> None:
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.owns_group = owns_group

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs and writes files."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (``n`` divisible by the world size)."""
        per_rank = n // self.world_size
        return slice(self.rank * per_rank, (self.rank + 1) * per_rank)

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over ranks in place and return it (no host synchronisation)."""
        if self.enabled:
            dist.all_reduce(tensor)
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def init_distributed(device_spec: str = "auto") -> Distributed:
    """Join the ``torchrun`` process group (``WORLD_SIZE`` > 1) or describe a single process.

    The backend is NCCL on CUDA and gloo on CPU. A process group that already exists (e.g. one a
    test or a launcher created) is reused and left open.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(resolve_device(device_spec))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = resolve_device(device_spec, local_rank, world_size)
    owns_group = not dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owns_group:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            device_id=device if device.type == "cuda" else None,
        )
    if dist.get_world_size() != world_size:
        raise RuntimeError(
            f"WORLD_SIZE={world_size} but the process group has {dist.get_world_size()} ranks"
        )
    return Distributed(device, dist.get_rank(), world_size, owns_group)


# --------------------------------------------------------------------------- random streams


def rng_state(device: torch.device) -> dict[str, Tensor]:
    """The default generators' states: CPU, and CUDA when ``device`` is a GPU."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":  # dequantization noise and dropout are drawn on the device
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    """Restore what :func:`rng_state` returned (also when a checkpoint mapped it to a GPU)."""
    torch.set_rng_state(state["cpu"].cpu())
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class RankStream:
    """A random stream of this rank's own, swapped into the default generators on demand.

    Args:
        seed: The run's seed; the stream is seeded from ``(seed, rank)``.
        rank: This process's rank.
        device: The training device (its CUDA generator is swapped too).
    """

    def __init__(self, seed: int, rank: int, device: torch.device) -> None:
        self.device = device
        own_seed = (seed + 1) * 1_000_003 + rank  # distinct per rank, never the shared seed
        self.state = {"cpu": torch.Generator().manual_seed(own_seed).get_state()}
        if device.type == "cuda":
            gen = torch.Generator(device=device).manual_seed(own_seed)
            self.state["cuda"] = gen.get_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Draw from this rank's stream inside the block; the shared stream is left untouched."""
        shared = rng_state(self.device)
        set_rng_state(self.state, self.device)
        try:
            yield
        finally:
            self.state = rng_state(self.device)
            set_rng_state(shared, self.device)


class LossModule(nn.Module):
    """``model.loss(x, y, lam)`` as a forward pass: what DDP wraps and ``torch.compile`` compiles.

    DDP synchronizes gradients only for work done through its own ``forward``, and
    ``torch.compile(model)`` compiles only ``forward``, so the training loss must be one.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, y: Tensor, lam: float) -> dict[str, Tensor]:
        return self.model.loss(x, y, lam)
