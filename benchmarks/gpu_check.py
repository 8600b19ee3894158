"""GPU check: one prepared script for a machine with a CUDA GPU, at most ~8 minutes.

What it runs, each section timed and recorded (a section that fails is recorded with its error
and the others go on):

1. **conformance**: the float64 round trip and ``log|det J|`` against ``slogdet`` of the autograd
   Jacobian, on the device, for a tiny model of every image family;
2. **train_step**: one training step of every image backbone in float32, in bf16 autocast (ours
   keeps log-dets float32) and under ``torch.compile``: seconds per step and the bits/dim
   difference from float32 on the same weights, batch and seed (compiled code draws its
   dequantization noise from another generator, so its difference includes the noise's);
   peak device memory;
3. **nccl**: a 2-process ``torchrun`` training run (NCCL) when two GPUs exist, else skipped
   with the reason;
4. **peer_pairs**: every image pair of ``benchmarks/peer_pairs`` whose peer is installed, timed
   in turns on the device at batch 64 and 256 (eval and train), ours / peer.

    python benchmarks/gpu_check.py          # on the GPU machine: results/gpu_check.json
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/g.json   # CI: the code paths

``--tiny`` shrinks every model to 1×8×8 inputs and one step, for a CPU check of the code paths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, cpu_model

from hybridflow.models import create_hybrid_model
from hybridflow.models.precision import autocast_context
from hybridflow.reports import git_commit

#: Image backbones timed at 1×28×28 (the CPU-sized named configurations) with their tiny
#: stand-ins for ``--tiny`` and for the float64 conformance check (1×8×8, D = 64).
BACKBONES = {
    "realnvp": {
        "num_scales": 2,
        "couplings_per_scale": 1,
        "final_couplings": 1,
        "hidden_channels": 8,
        "num_res_blocks": 1,
    },
    "coupling": {"num_scales": 2, "blocks_per_scale": 1, "hidden_channels": 8},
    "coupling+1x1": {"num_scales": 2, "blocks_per_scale": 1, "hidden_channels": 8},
    "flowpp-cpu": {
        "checkerboard_steps": (1, 1),
        "channel_steps": 1,
        "hidden_channels": 8,
        "num_blocks": 1,
        "num_components": 2,
    },
    "resflow-cpu": {
        "num_scales": 2,
        "blocks_per_scale": 1,
        "hidden_channels": 8,
        "fc_blocks": 1,
        "fc_hidden": 16,
    },
}
FULL_SHAPE, TINY_SHAPE = (1, 28, 28), (1, 8, 8)
NUM_CLASSES, LEVELS = 10, 256


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _model(name: str, shape: tuple[int, ...], tiny_args: bool, device, **backbone_args):
    torch.manual_seed(0)
    config = {
        "backbone": name,
        "backbone_args": {**(BACKBONES[name] if tiny_args else {}), **backbone_args},
        "head_args": {"width": 8} if tiny_args else {},
    }
    model = create_hybrid_model(config, shape, LEVELS, NUM_CLASSES).to(device)
    x = torch.randint(0, LEVELS, (64, *shape), device=device).float()
    model.data_init(x)
    return model


def _batch(shape, batch: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, LEVELS, (batch, *shape), generator=gen).float().to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen).to(device)
    return x, y


def check_conformance(device: torch.device) -> dict:
    """Float64 round trip and log-det against slogdet of the Jacobian, one example per family."""
    out = {}
    for name in BACKBONES:
        try:
            out[name] = _conformance_of(name, device)
        except Exception as err:  # one family's failure must not hide the others'
            out[name] = {"passed": False, "error": f"{type(err).__name__}: {err}"}
    return out


def _conformance_of(name: str, device: torch.device) -> dict:
    """One family's tiny model in float64 (resflow with exact log-dets)."""
    extra = {"logdet": "exact"} if name.startswith("resflow") else {}
    model = _model(name, TINY_SHAPE, True, device, **extra).double().eval()
    with torch.no_grad():  # away from the identity start (zero-initialised output layers)
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    flow = model.flow.backbone
    x = torch.rand(1, *TINY_SHAPE, dtype=torch.float64, device=device) * 4 - 2

    def forward_flat(v: torch.Tensor, flow=flow) -> torch.Tensor:
        return flow(v.view(1, *TINY_SHAPE))[0].reshape(-1)

    z, logdet = flow(x)
    jac = torch.autograd.functional.jacobian(forward_flat, x.reshape(-1))
    exact = torch.linalg.slogdet(jac).logabsdet
    back = flow.inverse(z)
    return {
        "logdet_error": float((logdet.reshape(()) - exact).abs()),
        "round_trip_error": float((back - x).abs().max()),
        "passed": bool(
            torch.isclose(logdet.reshape(()), exact, rtol=1e-6, atol=1e-6)
            and torch.allclose(back, x, atol=1e-5)
        ),
    }


def _variant_timing(model, x, y, loss_fn, device: torch.device, repeats: int) -> dict:
    """Seconds per training step of ``loss_fn`` (first step apart: it compiles or warms up)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(x, y)["loss"].mean().backward()
        opt.step()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = _timed(step, device)
    entry = {
        "first_step_s": first,
        "step_s": statistics.median(_timed(step, device) for _ in range(repeats)),
    }
    if device.type == "cuda":
        entry["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return entry


def _bpd(model, loss_fn, x, y) -> float:
    """Mean bits/dim in eval mode (training-mode forwards update spectral-norm vectors), with the
    same dequantization noise and estimator draws for every variant."""
    model.eval()
    torch.manual_seed(3)
    with torch.no_grad():
        value = float(loss_fn(x, y)["bpd"].mean())
    model.train()
    return value


def check_train_step(device: torch.device, tiny: bool, compile_models: bool) -> dict:
    """Seconds per training step in float32 / bf16 / compile; bits/dim against float32."""
    shape, batch = (TINY_SHAPE, 8) if tiny else (FULL_SHAPE, 64)
    repeats = 1 if tiny else 5
    out = {}
    for i, name in enumerate(BACKBONES):
        model = _model(name, shape, tiny, device)
        x, y = _batch(shape, batch, device)

        def plain(x, y, model=model):
            return model.loss(x, y, "1/D")

        def bf16(x, y, model=model):
            with autocast_context("bf16", device):
                return model.loss(x, y, "1/D")

        variants = {"float32": plain, "bf16": bf16}
        if compile_models and (not tiny or i == 0):  # compiling takes a while on CPU
            variants["compile"] = torch.compile(plain)
        entry: dict = {}
        reference = _bpd(model, plain, x, y)
        for variant, loss_fn in variants.items():  # on the same weights: before any step
            try:
                entry[variant] = {"bpd_minus_float32": _bpd(model, loss_fn, x, y) - reference}
            except Exception as err:  # a variant that fails is recorded; the others go on
                entry[variant] = {"error": f"{type(err).__name__}: {err}"}
        for variant, loss_fn in variants.items():
            if "error" not in entry[variant]:
                try:
                    entry[variant] |= _variant_timing(model, x, y, loss_fn, device, repeats)
                except Exception as err:
                    entry[variant] = {"error": f"{type(err).__name__}: {err}"}
        out[name] = entry
    return out


def check_nccl(device: torch.device) -> dict:
    """Two processes, one GPU each, training a tiny model for 2 steps through torchrun."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return {"skipped": f"needs 2 CUDA devices, this machine has {count}"}
    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "hybridflow", "train", "--device=cuda", "--max_steps=2", "--batch_size=64",
            "--warmup_steps=1", "--progress=false", "--eval_every=0", f"--out_dir={tmp}",
        ]  # fmt: skip
        started = time.time()
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        return {"returncode": done.returncode, "wall_s": time.time() - started,
                "tail": (done.stdout + done.stderr)[-1500:]}  # fmt: skip


def check_peer_pairs(device: torch.device, tiny: bool, only: str | None) -> list[dict]:
    """Image pairs whose peer is installed, ours / peer on the device, timed in turns."""
    from peer_pairs import PeerMissing, all_cases
    from peers import build, make_step

    batches = (2,) if tiny else (64, 256)
    rounds = 1 if tiny else 5
    out = []
    for case in all_cases(tiny, only):
        if len(case.make_input(1).shape) != 4:
            continue  # vector pairs stay on the CPU benchmark
        entry: dict = {"pair": case.pair, "setting": case.setting}
        try:
            sides = dict(zip(("ours", "peer"), build(case), strict=True))
        except PeerMissing as missing:
            out.append({**entry, "skipped": str(missing)})
            continue
        try:
            for side in sides.values():
                side.module.to(device)
            for batch in batches:
                x = case.make_input(batch).to(device)
                steps = {n: make_step(s, x) for n, s in sides.items()}
                evals = {n: (lambda s=s, x=x: s.log_prob(x)) for n, s in sides.items()}
                times: dict = {n: {"train": [], "eval": []} for n in sides}
                for r in range(rounds + 1):
                    for n in ("ours", "peer") if r % 2 == 0 else ("peer", "ours"):
                        for mode, fn in (("train", steps[n]), ("eval", evals[n])):
                            t = _timed(fn, device)
                            if r:  # the first round warms up
                                times[n][mode].append(t)
                entry[f"batch{batch}"] = {
                    mode: statistics.median(times["ours"][mode])
                    / statistics.median(times["peer"][mode])
                    for mode in ("train", "eval")
                }
        except Exception as err:  # e.g. a peer that makes CPU tensors inside its forward
            entry["error"] = f"{type(err).__name__}: {err}"
        out.append(entry)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="1×8×8 models, one step (CI)")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--only", help="peer pairs whose name contains this text")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device here: run it on the GPU machine, or --device cpu --tiny")
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32 in every number here
    torch.backends.cudnn.allow_tf32 = False
    sections: dict[str, Callable[[], object]] = {
        "conformance": lambda: check_conformance(device),
        "train_step": lambda: check_train_step(device, args.tiny, not args.no_compile),
        "nccl": lambda: check_nccl(device),
        "peer_pairs": lambda: check_peer_pairs(device, args.tiny, args.only),
    }
    result: dict = {
        "command": " ".join(["python", "benchmarks/gpu_check.py", *sys.argv[1:]]),
        "commit": git_commit(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    for name, run in sections.items():
        started = time.time()
        try:
            result[name] = run()
        except Exception:  # one section's failure must not cost the others
            result[name] = {"error": traceback.format_exc(limit=4)}
        result[f"{name}_s"] = round(time.time() - started, 1)
        print(f"{name}: {result[f'{name}_s']} s", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    conformance = result["conformance"]
    failed = (
        ["all (see its error)"]
        if "error" in conformance
        else [n for n, r in conformance.items() if not r["passed"]]
    )
    print(f"wrote {args.out}; conformance failures: {failed or 'none'}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
