"""Helpers shared by the Residual Flow benchmarks (not a benchmark itself).

Kept next to the scripts so each one stays runnable as ``python benchmarks/<name>.py`` (the
script's folder is on ``sys.path`` then) without installing anything beyond the package.
"""

from __future__ import annotations

import hashlib
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
# An explicit path on purpose: the package must not depend on this folder (users get MNIST
# through torchvision), but benchmarks may, and fall back to random levels without it.
MNIST_NPZ = Path("/work/shared/data/mnist10k.npz")
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def load_mnist(n: int, offset: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``n`` MNIST digits from ``offset`` as float levels ``[n, 1, 28, 28]``, labels, source.

    Falls back to random integer levels and labels (seeded) when the npz is missing; the source
    string says which, so the result files record it.
    """
    if MNIST_NPZ.exists():
        with np.load(MNIST_NPZ) as data:
            x_all, y_all = data["x"], data["y"]
        if offset < 0:
            offset = len(x_all) + offset
        x = torch.from_numpy(x_all[offset : offset + n].astype(np.float32)).unsqueeze(1)
        y = torch.from_numpy(y_all[offset : offset + n].astype(np.int64))
        if len(x) == n:
            return x, y, f"mnist:{MNIST_NPZ}[{offset}:{offset + n}]"
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, *INPUT_SHAPE), generator=g).float()
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return x, y, "random-levels (mnist10k.npz missing)"


def import_resflow() -> None:
    """Register the ``resflow*`` backbones (``hybridflow.models`` may not import them yet)."""
    import hybridflow.models.resflow  # noqa: F401


def build_hybrid(backbone_kw: dict, seed: int = 0, head_width: int = 256) -> torch.nn.Module:
    """``HybridModel(FlowModel(resflow-cpu(**backbone_kw)))`` built from ``seed``."""
    import_resflow()
    from hybridflow.models import FlowModel, HybridModel, create_backbone

    torch.manual_seed(seed)
    backbone = create_backbone("resflow-cpu", INPUT_SHAPE, **backbone_kw)
    flow = FlowModel(backbone, INPUT_SHAPE, num_levels=256, preprocessing="logit", logit_alpha=1e-3)
    return HybridModel(flow, NUM_CLASSES, head="resflow", width=head_width)


def max_rss_gib() -> float:
    """Peak resident set size of this process so far, GiB (Linux reports ru_maxrss in KiB)."""
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


def _status_gib(key: str) -> float | None:
    """A memory field of ``/proc/self/status`` (kB there), GiB; ``None`` off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def current_rss_gib() -> float | None:
    """Resident set size right now, GiB (Linux only; ``None`` elsewhere)."""
    return _status_gib("VmRSS")


def peak_rss_of_this_process_gib() -> float | None:
    """Peak resident set size of this process alone (``VmHWM``), GiB (Linux only).

    Unlike :func:`max_rss_gib`, not inherited: a child started by ``subprocess`` reports its
    parent's ``ru_maxrss`` until it exceeds it.
    """
    return _status_gib("VmHWM")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(repeats))


def timed_hybrid_steps(
    model: torch.nn.Module, opt: torch.optim.Optimizer, batches: list, warmup: int
) -> tuple[list[float], list[float], list[float]]:
    """Run one λ = 1/D hybrid training step per batch; time the steps after ``warmup``.

    Returns:
        Wall seconds and CPU-over-wall ratios of the timed steps, and the loss of every step.
    """
    times, losses, cpu_over_wall = [], [], []
    for i, (x, y) in enumerate(batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        model.train()
        loss = model.loss(x, y, "1/D")["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        elapsed = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        losses.append(loss.item())
        if i >= warmup:
            times.append(elapsed)
            cpu_over_wall.append(cpu / elapsed)
    return times, cpu_over_wall, losses


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: other jobs on a shared box inflate step times (OpenMP threads
    spin while their partner is descheduled), so results record how busy the machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def wait_for_idle(max_load: float, timeout_s: float, poll_s: float = 10.0) -> dict:
    """Wait until the 1-minute load average is ≤ ``max_load`` (at most ``timeout_s``).

    For shared machines: a parent calls this before each measured child so the child does not
    start while other jobs hold the cores. ``timeout_s <= 0`` does not wait.
    """
    start = time.monotonic()
    load = load_average()
    while (
        timeout_s > 0
        and load is not None
        and load[0] > max_load
        and time.monotonic() - start < timeout_s
    ):
        time.sleep(poll_s)
        load = load_average()
    return {
        "waited_s": round(time.monotonic() - start, 1),
        "load_average": load,
        "idle": load is not None and load[0] <= max_load,
    }


def contention_summary(times: list[float], cpu_over_wall: list[float], threads: int) -> dict:
    """Flag timed steps that shared the cores with other jobs.

    A step that had its ``threads`` cores to itself uses about ``threads`` CPU seconds per wall
    second; on a shared box the ratio drops towards 1 and the step takes several times longer.
    The plain median stays the headline number; the median over steps at ≥ 85% of ``threads``
    is what the configuration costs on an otherwise idle machine.
    """
    clean = [t for t, r in zip(times, cpu_over_wall, strict=True) if r >= 0.85 * threads]
    return {
        "cpu_over_wall_per_step": [round(r, 3) for r in cpu_over_wall],
        "cpu_over_wall_median": statistics.median(cpu_over_wall),
        "uncontended_steps": len(clean),
        "median_step_s_uncontended": statistics.median(clean) if clean else None,
    }


def source_digest() -> str:
    """SHA-256 over the package's Python sources: ties a result to the code it measured (the
    package is edited while benchmarks run)."""
    import hybridflow

    root = Path(hybridflow.__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def environment(threads: int) -> dict:
    return {
        "hybridflow_source_sha256_16": source_digest(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
