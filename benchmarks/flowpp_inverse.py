"""Flow++ inverse (sampling direction) cost vs forward, and bisection iterations to 1e-5.

Issue target: the whole inverse of a CPU-sized Flow++ costs ≤ 4× its forward. Measured at several
per-coupling bisection tolerances, with the end-to-end round-trip error each one gives. The model is
``flowpp-cpu`` on 1×28×28 MNIST (logit space), trained for a few maximum-likelihood steps so its
mixtures are not the identity. Times are medians of repeated passes in this process; bisection
iterations are counted per coupling call. Writes ``results/flowpp_inverse.json``.

    python benchmarks/flowpp_inverse.py
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

# The script's own folder is on sys.path when it runs as `python benchmarks/...`.
from _common import RESULTS, environment, load_mnist, median_time, source_digest

from hybridflow.models import create_backbone
from hybridflow.nets import FlowppConditioner
from hybridflow.transforms import MixLogisticCoupling, mixlogistic

TARGET = 4.0


def count_bisection_iterations(log: list[int]):
    """Wrap the module's bisection so every call records the iterations its loop runs."""
    original = mixlogistic.mixture_inverse_cdf

    def counted(u_logit, logit_weights, means, log_scales, tol=1e-6, max_iter=100):
        scales = log_scales.clamp(min=mixlogistic.LOG_SCALE_MIN).exp()
        ends = means + scales * u_logit.unsqueeze(-1)
        width = float((ends.max(-1).values - ends.min(-1).values).max())
        # The loop halves every bracket until the widest is ≤ tol.
        log.append(min(max_iter, max(0, math.ceil(math.log2(max(width, tol) / tol)))))
        return original(u_logit, logit_weights, means, log_scales, tol=tol, max_iter=max_iter)

    mixlogistic.mixture_inverse_cdf = counted


def main() -> None:
    parser = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument(
        "--spread",
        type=float,
        default=0.05,
        help="std of noise added to every conditioner's zero-initialized output layer after "
        "training, so mixture components differ as in a long-trained model",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tols", type=float, nargs="+", default=[1e-5, 1e-6, 1e-8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--float64-mixture",
        action="store_true",
        help="run the mixture math in float64 (results/flowpp_inverse_float64_mixture.json)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x_levels, _, source = load_mnist(args.batch_size * (args.train_steps + 1), seed=args.seed)
    u = (x_levels + torch.rand_like(x_levels)) / 256
    x_all = torch.logit(u.clamp(1e-4, 1 - 1e-4))
    model = create_backbone("flowpp-cpu", (1, 28, 28))
    model.train()
    model.data_init(x_all[: args.batch_size])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for xb in x_all[args.batch_size :].split(args.batch_size):
        z, logdet = model(xb)
        nll = -(-0.5 * z.flatten(1).pow(2).sum(1) + logdet).mean() / xb[0].numel()
        opt.zero_grad()
        nll.backward()
        opt.step()
    train_s = time.perf_counter() - start
    # A few CPU steps leave every mixture's components almost equal (the bracket is then exact
    # and bisection needs no steps); spreading the output layers makes bisection do real work.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, FlowppConditioner):
                module.conv_out.weight.add_(args.spread * torch.randn_like(module.conv_out.weight))
                module.conv_out.bias.add_(args.spread * torch.randn_like(module.conv_out.bias))
    model.eval()

    x = x_all[: args.batch_size]
    couplings = [m for m in model.modules() if isinstance(m, MixLogisticCoupling)]
    for coupling in couplings:
        coupling.float64_mixture = args.float64_mixture
    iterations: list[int] = []
    count_bisection_iterations(iterations)
    with torch.no_grad():
        z, _ = model(x)
        forward_s = median_time(lambda: model(x), args.repeats)
    by_tol = []
    for tol in args.tols:
        for coupling in couplings:
            coupling.inverse_tol = tol
        model.float()
        with torch.no_grad():
            iterations.clear()
            error32 = float((model.inverse(z) - x).abs().max())
            per_call = list(iterations)
            inverse_s = median_time(lambda: model.inverse(z), args.repeats)
            model.double()
            x64 = x.double()
            error64 = float((model.inverse(model(x64)[0]) - x64).abs().max())
        by_tol.append(
            {
                "coupling_tol": tol,
                "median_inverse_s": inverse_s,
                "inverse_over_forward": inverse_s / forward_s,
                "pass": inverse_s / forward_s <= TARGET,
                "bisection_iterations_per_coupling": per_call,
                "max_abs_round_trip_error_float32": error32,
                "max_abs_round_trip_error_float64": error64,
            }
        )
    result = {
        "what": "flowpp-cpu inverse vs forward on 1x28x28 MNIST in logit space, batch "
        f"{args.batch_size}, after {args.train_steps} Adam steps",
        "data": source,
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_steps": args.train_steps,
        "train_s": round(train_s, 2),
        "conditioner_output_spread": args.spread,
        "float64_mixture": args.float64_mixture,
        "final_train_nll_nats_per_dim": nll.item(),
        "median_forward_s": forward_s,
        "target_inverse_over_forward": TARGET,
        "tolerances": by_tol,
        "hybridflow_source_sha256_16": source_digest(),
        **environment(args.threads),
    }
    RESULTS.mkdir(exist_ok=True)
    suffix = "_float64_mixture" if args.float64_mixture else ""
    out = RESULTS / f"flowpp_inverse{suffix}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for row in by_tol:
        print(json.dumps(row))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
