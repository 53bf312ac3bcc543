"""The fused CPU kernel (models/em_cpu.py): used when built, off by switch, a clean fallback, deterministic.
Its numbers are tested with every fast-path test (tests/conftest.py runs them on both engines)."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch

import models
from models import em_cpu
from models.capsules import ConvCaps


def kernel_or_skip():
    if em_cpu.kernel() is None:
        pytest.skip("the fused CPU kernel could not be built here")


def class_logits(model, x):
    return model.class_caps(*model.conv_caps2(*model.conv_caps1(*model.primary_caps(model.conv1(x)))))[1]


def test_fast_path_runs_the_kernel_unless_turned_off():
    kernel_or_skip()
    torch.manual_seed(0)
    model = models.create_model("em_capsnet_small", input_size=28)
    x = torch.rand(2, 1, 28, 28)
    assert "CPUEMRouting" in class_logits(model, x).grad_fn.next_functions[0][0].name()
    with em_cpu.disabled():
        assert em_cpu.kernel() is None
        assert "FastEMRouting" in class_logits(model, x).grad_fn.next_functions[0][0].name()


def test_environment_switch(monkeypatch):
    monkeypatch.setenv(em_cpu.ENV_SWITCH, "0")
    assert em_cpu.kernel() is None


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    from torch.utils import cpp_extension

    def fail(**kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(em_cpu, "_build", functools.cache(em_cpu._build.__wrapped__))  # a fresh cache
    with pytest.warns(RuntimeWarning, match=r"could not build .*command not found.*Install a C\+\+ compiler"):
        assert em_cpu.kernel() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert em_cpu.kernel() is None  # said once
        model = models.create_model("em_capsnet_small", input_size=28)
        grad_fn = class_logits(model, torch.rand(2, 1, 28, 28)).grad_fn
    assert "FastEMRouting" in grad_fn.next_functions[0][0].name()


@pytest.mark.parametrize("competition", ["patch", "global"])
def test_gradients_do_not_depend_on_threads(competition):
    """Partial sums over fixed blocks of units, added in order: bitwise the same on 1 and 2 threads."""
    kernel_or_skip()
    torch.manual_seed(0)
    layer = ConvCaps(4, 5, 3, 1, [0.01, 0.02, 0.03], competition=competition)
    poses = torch.randn(6, 7, 7, 4, 16, requires_grad=True)
    acts = torch.rand(6, 7, 7, 4, requires_grad=True)
    threads, grads = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            mu, a = layer(poses, acts)
            inputs = [poses, acts, *layer.parameters()]
            grads.append(torch.autograd.grad(mu.sum() + a.square().sum(), inputs))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*grads):
        assert torch.equal(one, two)


def test_torch_compile_runs_the_kernel_as_is():
    """torch.compile of a capsule net breaks its graph around the kernel (no tracing into it, no warning)
    and gives the eager numbers."""
    kernel_or_skip()
    torch.manual_seed(0)
    model = models.create_model("em_capsnet_small", input_size=28, competition="patch")
    x = torch.rand(3, 1, 28, 28)
    want = model(x)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(Dynamo does not know how to trace|Dynamo detected)")
        got = torch.compile(model)(x)
    # float32 rounding of the compiled elementwise ops, relative to logits of size ~4 (class scale 3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
