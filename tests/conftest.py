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
