"""bfloat16 autocast on both sides of a pair: speed, and the bits/dim error it makes.

Our models keep log-determinants, dequantization and the logit transform in float32 under
``torch.autocast`` (``--amp=bf16``); a peer run under plain ``torch.autocast`` computes them in
bfloat16 wherever its ops autocast. For each side this measures, in the same process and in
turns: a training step in float32 and under autocast, and the per-example bits/dim difference of
``log_prob`` under autocast from float32 on the same inputs (eval mode, same weights). Whether
bf16 is fast at all depends on the CPU: the ``/proc/cpuinfo`` flags ``avx512_bf16`` and
``amx_bf16`` are recorded beside the numbers (without either, bf16 matmuls are emulated).
"""

from __future__ import annotations

import math
import statistics
from contextlib import nullcontext
from pathlib import Path

import torch

from . import Side

__all__ = ["BF16_FLAGS", "bf16_comparison", "cpu_bf16_flags"]

BF16_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def cpu_bf16_flags() -> list[str]:
    """Which of :data:`BF16_FLAGS` this CPU has (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    return [f for f in BF16_FLAGS if f in flags]


def _autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def _bits_per_dim_error(side: Side, x: torch.Tensor) -> dict[str, float]:
    """Median and max over examples of |bits/dim under autocast − bits/dim in float32|."""
    side.module.eval()
    with torch.no_grad():
        exact = side.log_prob(x).double()
        with _autocast(True):
            mixed = side.log_prob(x).double()
    per_dim = (mixed - exact).abs() / (x[0].numel() * math.log(2))
    finite = torch.isfinite(per_dim)
    return {
        "median_abs_bpd_error": float(per_dim[finite].median()) if finite.any() else math.inf,
        "max_abs_bpd_error": float(per_dim[finite].max()) if finite.any() else math.inf,
        "non_finite": int((~finite).sum()),
    }


def bf16_comparison(
    sides: dict[str, Side], x: torch.Tensor, rounds: int, warmup: int, timed
) -> dict:
    """Training-step seconds in float32 and bf16 autocast for every side, timed in turns, the
    speed ratios, and each side's bits/dim error under autocast."""
    opts = {n: torch.optim.Adam(s.module.parameters(), lr=1e-5) for n, s in sides.items()}

    def step(name: str, bf16: bool) -> None:
        side = sides[name]
        side.module.train()
        opts[name].zero_grad(set_to_none=True)
        with _autocast(bf16):
            loss = side.loss(x)
        loss.float().backward()
        opts[name].step()

    # A side whose code fails under autocast (e.g. a float32 buffer meeting a bf16 product in a
    # dtype-strict op) is recorded with the error and timed in float32 only.
    failed: dict[str, str] = {}
    for name in sides:
        try:
            step(name, True)
        except RuntimeError as error:
            failed[name] = f"{type(error).__name__}: {error}"
    times: dict[tuple[str, bool], list[float]] = {
        (n, b): [] for n in sides for b in (False, True) if not (b and n in failed)
    }
    keys = list(times)
    for r in range(warmup + rounds):
        for name, bf16 in keys if r % 2 == 0 else keys[::-1]:
            t = timed(lambda n=name, b=bf16: step(n, b))
            if r >= warmup:
                times[(name, bf16)].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict = {"cpu_bf16_flags": cpu_bf16_flags(), "batch": x.shape[0]}
    for name in sides:
        if name in failed:
            out[name] = {"train_s_float32": med[(name, False)], "bf16_error": failed[name]}
            continue
        out[name] = {
            "train_s_float32": med[(name, False)],
            "train_s_bf16": med[(name, True)],
            "bf16_speedup": med[(name, False)] / med[(name, True)],
            **_bits_per_dim_error(sides[name], x),
        }
    if {"ours", "peer"} <= set(sides) and "ours" not in failed:
        out["ratio_ours_bf16_to_peer_float32"] = med[("ours", True)] / med[("peer", False)]
    if {"ours", "peer"} <= set(sides) and not failed:
        out["ratio_ours_bf16_to_peer_bf16"] = med[("ours", True)] / med[("peer", True)]
    return out
