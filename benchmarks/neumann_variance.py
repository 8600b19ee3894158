"""Variance of the residual log-det gradient estimators on a trained Residual Flow.

The training gradient of a roulette log-det estimate (Chen et al. 2019, "Residual Flows",
Theorems 1-2) can be formed three ways, all unbiased:

* ``neumann``: the library's: ``sum_{k=1}^{N} (-1)^(k+1) / P(N >= k) · vᵀ J^(k-1) ∂J v``,
  the powers up to ``vᵀ J^(N-1)``, each weighted as the value's term ``k``; with exact traces
  it is the gradient of the value estimate itself;
* ``neumann-theorem2``: the indexing of the paper's Theorem 2 and of the reference code,
  ``sum_{k=0}^{N} (-1)^k / P(N >= k) · vᵀ J^k ∂J v``: one power more (``vᵀ J^N``, which the
  value computed anyway), each power weighted as the value's term of the same index (defined
  here only, for the comparison);
* ``backprop``: differentiate through every term of the value (``grad="backprop"``).

Each is drawn ``--draws`` times on one fixed batch and dequantization noise, so the spread is
the estimator's alone (probes and roulette); draw ``i`` has the same probes and roulette count
for all three. Reported per estimator: the total variance (sum over parameters of each
coordinate's variance) and its ratio to ``neumann``'s with a paired bootstrap 90% interval, and
a robust spread, the median over pairs of draws of half their squared distance. The robust one
matters: with a Poisson tail the roulette weights ``1 / P(K >= j)`` grow like ``j! / 2^j``,
faster than ``|J^j|²`` shrinks, so the variance is carried by the rare long draws of a sample
(in theory it is unbounded) and the sample total variance is noisy.

Model: the shipped ``fashion-mnist/resflow-lam1overD`` (``resflow-cpu``, or ``--model`` another
shipped name), its flow's loss ``NLL / D`` on 64 Fashion-MNIST test images (random levels
without the data set).

    python benchmarks/neumann_variance.py [--draws 100] [--threads 2]

Writes benchmarks/results/neumann_variance.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
from _common import RESULTS, cpu_model, environment, source_digest
from torch import Tensor

from hybridflow.nets import lipschitz_layers, refresh_lipschitz_layers
from hybridflow.pretrained import load_pretrained
from hybridflow.transforms import ResidualBlock
from hybridflow.transforms.base import sum_except_batch
from hybridflow.transforms.residual import _Draw

MODEL = "fashion-mnist/resflow-lam1overD"
ESTIMATORS = ("neumann", "neumann-theorem2", "backprop")


def neumann_theorem2(
    block: ResidualBlock, g_x: Tensor, x: Tensor, draw: _Draw
) -> tuple[Tensor, Tensor]:
    """``ResidualBlock._neumann`` with the paper's indexing: powers 0..N, ``c_0 = 1``."""
    value = x.new_zeros(x.shape[0])
    surrogate = x.new_zeros(x.shape[0])
    for v in draw.probes:
        w, left = v, v
        for k, weight in enumerate(draw.weights, start=1):
            (w,) = torch.autograd.grad(g_x, x, w, retain_graph=True)
            value = value + ((-1) ** (k + 1) * weight / k) * sum_except_batch(w * v)
            left = left + ((-1) ** k * weight) * w
        (left_j,) = torch.autograd.grad(g_x, x, left, retain_graph=True, create_graph=True)
        surrogate = surrogate + sum_except_batch(left_j * v)
    return value / len(draw.probes), surrogate / len(draw.probes)


def configure(flow: torch.nn.Module, estimator: str) -> None:
    """Switch every residual block of ``flow`` to ``estimator``."""
    for block in flow.modules():
        if not isinstance(block, ResidualBlock):
            continue
        block.grad_mode = "backprop" if estimator == "backprop" else "neumann"
        if estimator == "neumann-theorem2":
            block._neumann = neumann_theorem2.__get__(block)  # this block only
        else:
            block.__dict__.pop("_neumann", None)


def total_variance(gram: Tensor, rows: Tensor | None = None) -> float:
    """``sum_j var(g[:, j])`` of the draws ``rows`` (default all), from their Gram matrix
    ``g gᵀ``: ``(sum_i |g_i|² - n |mean|²) / (n - 1)``, so resampling never copies ``g``."""
    if rows is not None:
        gram = gram[rows][:, rows]
    n = gram.shape[0]
    return float((gram.diagonal().sum() - gram.sum() / n) / (n - 1))


def median_half_squared_distance(gram: Tensor) -> float:
    """Median over pairs of draws of ``|g_i - g_j|² / 2``: its mean is the total variance, its
    median a spread that rare huge draws do not dominate (no centre to estimate first)."""
    d = gram.diagonal()
    pairs = torch.triu_indices(len(d), len(d), offset=1)
    half = (d[pairs[0]] + d[pairs[1]] - 2 * gram[pairs[0], pairs[1]]) / 2
    return float(half.median())


def paired_bootstrap(grams: dict[str, Tensor], n: int = 2000) -> dict[str, list[float]]:
    """5th and 95th percentiles of each estimator's total variance over ``neumann``'s, over
    resamples of the draw indices. Draw ``i`` has the same probes and roulette count for every
    estimator (same seed, same draws consumed), so the same indices resample all of them."""
    g = torch.Generator().manual_seed(0)
    draws = next(iter(grams.values())).shape[0]
    ratios: dict[str, list[float]] = {name: [] for name in grams}
    for _ in range(n):
        rows = torch.randint(draws, (draws,), generator=g)
        base = total_variance(grams["neumann"], rows)
        for name, gram in grams.items():
            ratios[name].append(total_variance(gram, rows) / base)
    return {
        name: [sorted(r)[int(0.05 * n)], sorted(r)[int(0.95 * n) - 1]] for name, r in ratios.items()
    }


def load_batch(batch: int) -> tuple[Tensor, str]:
    try:
        from hybridflow.data import load_dataset

        images = load_dataset("fashion-mnist", "test").images
        return images[:batch].float(), "fashion-mnist test"
    except Exception as error:  # the shipped model still runs; the numbers are then on noise
        g = torch.Generator().manual_seed(0)
        return torch.randint(0, 256, (batch, 1, 28, 28), generator=g).float(), repr(error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=MODEL, help="a shipped model name")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    flow = load_pretrained(args.model).flow.train()
    # The same function for every draw: converged power iterations, then none per forward
    # (otherwise the weights drift during the first estimator's draws and inflate its spread).
    refresh_lipschitz_layers(flow)
    for layer in lipschitz_layers(flow):
        layer.train_iterations = 0
    x, source = load_batch(args.batch)
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(1))
    params = [p for p in flow.parameters() if p.requires_grad]
    grads: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    for estimator in ESTIMATORS:
        configure(flow, estimator)
        torch.manual_seed(2)  # the same probe and roulette draws for every estimator
        rows, start = [], time.perf_counter()
        for _ in range(args.draws):
            loss = -flow.log_prob(x, u).mean() / math.prod(x.shape[1:])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        grads[estimator] = torch.stack(rows)
        seconds[estimator] = (time.perf_counter() - start) / args.draws
        print(f"{estimator}: {seconds[estimator]:.2f} s per gradient", flush=True)
    grams = {name: (g.double() @ g.double().T).cpu() for name, g in grads.items()}
    intervals = paired_bootstrap(grams)
    spread = {name: median_half_squared_distance(gram) for name, gram in grams.items()}
    base = total_variance(grams["neumann"])
    rows = {}
    for estimator, g in grads.items():
        rows[estimator] = {
            "total_variance": total_variance(grams[estimator]),
            "ratio_to_neumann": total_variance(grams[estimator]) / base,
            "ratio_to_neumann_90": intervals[estimator],
            "median_half_squared_distance": spread[estimator],
            "median_ratio_to_neumann": spread[estimator] / spread["neumann"],
            "median_norm": float(g.norm(dim=1).median()),
            "seconds_per_gradient": seconds[estimator],
        }
    print(
        "\n| estimator | total variance | × neumann (paired 90% bootstrap) "
        "| median pairwise spread | × neumann | s/grad |"
    )
    print("|---|---|---|---|---|---|")
    for estimator, r in rows.items():
        lo, hi = r["ratio_to_neumann_90"]
        print(
            f"| {estimator} | {r['total_variance']:.4g} | {r['ratio_to_neumann']:.2f} "
            f"({lo:.2f}–{hi:.2f}) | {r['median_half_squared_distance']:.4g} | "
            f"{r['median_ratio_to_neumann']:.2f} | {r['seconds_per_gradient']:.2f} |"
        )
    out = {
        "model": args.model,
        "data": source,
        "batch": args.batch,
        "draws": args.draws,
        "estimators": rows,
        "cpu": cpu_model(),
        "environment": environment(args.threads),
        "source_digest": source_digest(),
    }
    (RESULTS / "neumann_variance.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
