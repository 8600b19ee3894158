"""Shared test settings: float64 by default (``--dtype`` selects another), CPU only."""

from __future__ import annotations

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--dtype", default="float64", choices=["float32", "float64"])


@pytest.fixture(autouse=True)
def _default_dtype(request: pytest.FixtureRequest):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, request.config.getoption("--dtype")))
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def one_thread():
    """Run a test on one intra-op thread, then restore the setting.

    Tiny models launch many small kernels; on a loaded 2-core machine intra-op threading made
    them 10-30x slower (the workers wait for busy cores).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


#: Backbone and head settings of a tiny RealNVP hybrid for 8×8 digits (seconds to train).
TINY_REALNVP = {
    "backbone_args": {
        "num_scales": 2,
        "couplings_per_scale": 1,
        "final_couplings": 1,
        "hidden_channels": 8,
        "num_res_blocks": 1,
    },
    "head_args": {"width": 8},
}

#: ``hybridflow train`` options of a tiny digits run (add ``--max_steps``, ``--out_dir``).
TINY_RUN_ARGS = (
    *(f"--{group}.{k}={v}" for group, args in TINY_REALNVP.items() for k, v in args.items()),
    "--batch_size=32",
    "--warmup_steps=1",
    "--progress=false",
    "--eval_every=0",
    "--num_threads=1",
)
