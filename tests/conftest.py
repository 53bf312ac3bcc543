"""Shared fixtures."""

from __future__ import annotations

import pytest

from models import em_cpu


@pytest.fixture(params=["cpu-kernel", "torch-ops"])
def fast_engine(request):
    """Runs a test on each engine of the fast path: the fused CPU kernel and the PyTorch ops (as on CUDA)."""
    if request.param == "torch-ops":
        with em_cpu.disabled():
            yield request.param
        return
    if em_cpu.kernel() is None:
        pytest.skip("the fused CPU kernel could not be built here (see the warning)")
    yield request.param
