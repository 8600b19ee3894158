"""Inverse: iterations and time to reach 1e-5 (``resflow-cpu`` at its worst-case Lipschitz bound).

Builds the ``resflow-cpu`` backbone inside a ``FlowModel`` (logit preprocessing), runs ActNorm
data init on a batch (a training-mode forward), then emulates trained-size residual branches at
their worst case: every raw Lipschitz-layer weight is scaled up (``--weight-scale``, ×10) and
``refresh_lipschitz_layers`` converges the power iterations, so every layer is clamped to
exactly its coefficient c = 0.98 (Lip(g) bound 0.98³ ≈ 0.94 per conv branch; the fully connected
end branches have three linear layers too). The model is then put in eval mode.

A batch of 64 MNIST images (the last 64 of the npz; random levels if it is missing) is
dequantized at bin centres, logit-preprocessed and encoded by the backbone; the latent is
decoded with the backbone inverse with ``inverse_atol = inverse_rtol = tol`` on every
ResidualBlock for tol in {1e-4, 1e-5, 1e-6, 1e-7}, in float64 and float32. Reported per
(dtype, tol): the max round-trip error |h - inverse(forward(h))| on the backbone input h,
mean/max fixed-point iterations over blocks (``ResidualBlock.last_inverse``; the first
``x = z - g(z)`` counts as one), whether every block converged, whether the integer levels are
recovered, and the median time of the full inverse against that of the forward (which in eval
mode includes the 10-term roulette log-det estimate). The local Lipschitz constant of every
branch at its actual inputs (power iteration on the Jacobian, max over the batch) is recorded
too: the fixed-point iteration converges at that rate, not at the 0.94 bound.

Target: round-trip error ≤ 1e-5.

    python benchmarks/resflow_inverse.py [--threads 2] [--repeats 3] [--weight-scale 10]
                                         [--wait-idle 0] [--max-load 0.5]

Writes benchmarks/results/resflow_inverse.json and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import torch

# The script's own folder is on sys.path when it runs as `python benchmarks/...`.
from _common import (
    INPUT_SHAPE,
    RESULTS,
    environment,
    import_resflow,
    load_average,
    load_mnist,
    median_time,
    wait_for_idle,
)

TOLERANCES = (1e-4, 1e-5, 1e-6, 1e-7)
TARGET = 1e-5


def build_flow(seed: int, init_batch: torch.Tensor) -> torch.nn.Module:
    import_resflow()
    from hybridflow.models import FlowModel, create_backbone

    torch.manual_seed(seed)
    backbone = create_backbone("resflow-cpu", INPUT_SHAPE)
    flow = FlowModel(backbone, INPUT_SHAPE, num_levels=256, preprocessing="logit", logit_alpha=1e-3)
    flow.data_init(init_batch)  # ActNorm init before the weights are inflated
    return flow


def saturate(flow: torch.nn.Module, scale: float) -> dict:
    """Scale raw Lipschitz weights and refresh, so every layer sits at its coefficient."""
    from hybridflow.nets import lipschitz_layers, refresh_lipschitz_layers

    layers = list(lipschitz_layers(flow))
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(scale)
    refreshed = refresh_lipschitz_layers(flow)
    with torch.no_grad():
        # sigma/coeff > 1 means the layer is clamped: its normalized norm is exactly coeff.
        over = [float(layer.operator_norm()) / layer.coeff for layer in layers]
        normalized = [layer.coeff * min(1.0, o) for layer, o in zip(layers, over, strict=True)]
    return {
        "layers": len(layers),
        "refreshed": refreshed,
        "min_raw_sigma_over_coeff": min(over),
        "normalized_sigma_min": min(normalized),
        "normalized_sigma_max": max(normalized),
    }


def residual_blocks(module: torch.nn.Module) -> list:
    from hybridflow.transforms import ResidualBlock

    return [m for m in module.modules() if isinstance(m, ResidualBlock)]


def local_lipschitz(net: torch.nn.Module, x: torch.Tensor, iterations: int) -> float:
    """Largest per-example ``||J_g(x_i)||_2`` by power iteration on ``JᵀJ`` (max over the batch).

    The fixed-point inverse converges at the local rate, which can sit far below the global
    bound (LipSwish has slope 0.45 at 0), so this explains the iteration counts.
    """
    dims = tuple(range(1, x.dim()))
    v = torch.randn_like(x)
    v = v / v.square().sum(dims, keepdim=True).sqrt()
    sigma = torch.zeros(x.shape[0], dtype=x.dtype)
    with torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        y = net(x_in)
        u = torch.zeros_like(y, requires_grad=True)
        # Jᵀu is linear in u; differentiating <Jᵀu, v> in u gives J v (double-vjp trick).
        (jt_u,) = torch.autograd.grad(y, x_in, u, create_graph=True)
        for _ in range(iterations):
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            (jtjv,) = torch.autograd.grad(y, x_in, jv, retain_graph=True)
            sigma = jv.square().sum(dims).sqrt()
            v = jtjv / jtjv.square().sum(dims, keepdim=True).sqrt().clamp_min(1e-30)
    return float(sigma.max())


def run_dtype(
    base: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, args: argparse.Namespace
) -> dict:
    flow = copy.deepcopy(base).to(dtype)
    # Converting the power-iteration vectors rounds sigma; converge again in this precision.
    saturation = saturate(flow, 1.0)
    flow.eval()
    backbone = flow.backbone
    blocks = residual_blocks(backbone)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        block.register_forward_pre_hook(lambda m, a, i=i: inputs.setdefault(i, a[0].detach()))
        for i, block in enumerate(blocks)
    ]
    with torch.no_grad():
        h, _ = flow.dequantize(x.to(dtype), noise=0.5)  # bin centres: deterministic input
        h, _ = flow.preprocess(h)
        z, _ = backbone(h)
        for hook in hooks:
            hook.remove()
        t_forward = median_time(lambda: backbone(h), args.repeats)
    lipschitz = [
        local_lipschitz(block.net, inputs[i], args.lipschitz_iterations)
        for i, block in enumerate(blocks)
    ]

    rows = []
    for tol in TOLERANCES:
        for block in blocks:
            block.inverse_atol = block.inverse_rtol = tol
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            h_rec = backbone.inverse(z)
            stats = [block.last_inverse for block in blocks]
            t_inverse = median_time(lambda: backbone.inverse(z), args.repeats, warmup=0)
        with torch.no_grad():
            error = float((h - h_rec).abs().max())
            levels = flow.dequantize.inverse(flow.preprocess.inverse(h_rec))
            levels_exact = float((levels == x.to(dtype)).float().mean())
        iterations = [s.iterations for s in stats]
        rows.append(
            {
                "tol": tol,
                "max_abs_error": error,
                "meets_target": error <= TARGET,
                "iterations_mean": sum(iterations) / len(iterations),
                "iterations_max": max(iterations),
                "iterations_per_block": iterations,
                "all_converged": all(s.converged for s in stats),
                "max_block_residual": max(s.max_residual for s in stats),
                "non_convergence_warnings": sum(
                    issubclass(w.category, RuntimeWarning) for w in caught
                ),
                "levels_recovered_fraction": levels_exact,
                "median_inverse_s": t_inverse,
                "inverse_over_forward": t_inverse / t_forward,
            }
        )
    meeting = [r for r in rows if r["meets_target"]]
    return {
        "saturation": saturation,
        "residual_blocks": len(blocks),
        "local_lipschitz_per_block": lipschitz,
        "median_forward_s": t_forward,
        "tolerances": rows,
        "loosest_tol_meeting_target": max((r["tol"] for r in meeting), default=None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--init-size", type=int, default=256, help="ActNorm init batch")
    parser.add_argument("--weight-scale", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--wait-idle", type=float, default=0.0, help="wait ≤ this many s for a quiet box first"
    )
    parser.add_argument("--max-load", type=float, default=0.5, help="'quiet': 1-min load average")
    parser.add_argument(
        "--lipschitz-iterations", type=int, default=20, help="power iterations on J_g per block"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    idle = wait_for_idle(args.max_load, args.wait_idle)

    x_init, _, init_source = load_mnist(args.init_size, seed=args.seed)
    # The last images of the (shuffled) file: disjoint from the init batch and the training
    # batches of the other benchmarks.
    x, _, source = load_mnist(args.batch_size, offset=-args.batch_size, seed=args.seed + 1)
    flow = build_flow(args.seed, x_init)
    saturation = saturate(flow, args.weight_scale)
    results = {
        "float64": run_dtype(flow, x, torch.float64, args),
        "float32": run_dtype(flow, x, torch.float32, args),
    }

    result = {
        "what": "backbone round trip h -> z -> inverse(z) of resflow-cpu at Lip bound 0.98^3",
        "target_max_abs_error": TARGET,
        "batch_size": args.batch_size,
        "data": source,
        "init_data": init_source,
        "weight_scale": args.weight_scale,
        "lipschitz_bound_per_branch": 0.98**3,
        "saturation": saturation,
        "repeats": args.repeats,
        "seed": args.seed,
        "wait_for_idle": idle,
        "load_average_end": load_average(),
        **environment(args.threads),
        "dtypes": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "resflow_inverse.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"{'dtype':<9}{'tol':>7}{'max err':>10}{'it mean':>9}{'it max':>8}{'conv':>6}"
        f"{'levels':>8}{'inv s':>8}{'inv/fwd':>9}  target ≤ {TARGET:g}"
    )
    for dtype, res in results.items():
        for r in res["tolerances"]:
            print(
                f"{dtype:<9}{r['tol']:>7.0e}{r['max_abs_error']:>10.2e}{r['iterations_mean']:>9.1f}"
                f"{r['iterations_max']:>8d}{r['all_converged']!s:>6}"
                f"{r['levels_recovered_fraction']:>8.4f}{r['median_inverse_s']:>8.3f}"
                f"{r['inverse_over_forward']:>9.1f}  {'PASS' if r['meets_target'] else 'FAIL'}"
            )
        lip = res["local_lipschitz_per_block"]
        print(
            f"{dtype}: forward {res['median_forward_s']:.4f} s; local Lip(g) at the data "
            f"{min(lip):.3f}..{max(lip):.3f} (bound {0.98**3:.3f})"
        )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
