"""The fused CPU kernel of EM routing (``csrc/em_routing_cpu.cpp``): the fast path's engine on the CPU.

``models.em_fast`` streams vote-sized tensors through memory between PyTorch ops; this kernel computes
the votes, the routing iterations and the whole backward of one routing unit at a time (one receptive
field under patch competition, one image under global competition) in per-thread buffers that stay in
cache, and recomputes the votes in the backward instead of storing them. Same math, same numbers (the
tests hold it to the reference in float64 and float32, values and gradients).

It is compiled with the machine's C++ compiler on first use (about 25 s, then cached by
``torch.utils.cpp_extension`` under ``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``).
Each checkout gets its own build folder (the name carries a hash of the source's path): ninja rebuilds
whenever its build file names another source path, so checkouts sharing one folder would rebuild in turn.
Where it cannot be built, or with ``CAPSBENCH_CPU_KERNEL=0``, the fast path runs ``models.em_fast``'s
PyTorch implementation instead (slower, same results); CUDA always does.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "em_routing_cpu.cpp"
ENV_SWITCH = "CAPSBENCH_CPU_KERNEL"  # "0": never use the kernel
COST_NORMS = {"none": 0, "zscore": 1, "scaled": 2}

_enabled = True


@functools.cache
def _build():
    _put_ninja_on_path()
    from torch.utils import cpp_extension

    quiet = logging.getLogger("torch.utils.cpp_extension")
    level, quiet.level = quiet.level, logging.ERROR  # "no CUDA runtime found": irrelevant for a CPU kernel
    try:
        return cpp_extension.load(
            name=f"capsbench_em_routing_cpu_{hashlib.sha1(str(SOURCE.resolve()).encode()).hexdigest()[:8]}",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as error:  # no compiler, no headers, a read-only cache: fall back, loudly once
        reason = str(error).strip().splitlines()[-1][:200] if str(error).strip() else type(error).__name__
        warnings.warn(
            f"could not build the fused CPU EM-routing kernel ({reason}); capsule nets run the slower "
            f"PyTorch fast path instead. Install a C++ compiler (g++) to get it, or set {ENV_SWITCH}=0 to "
            "silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    finally:
        quiet.level = level


def _put_ninja_on_path() -> None:
    """torch builds with the ``ninja`` on PATH; use the one this project installs (pip ``ninja``) when
    the virtualenv is not activated."""
    try:
        import ninja
    except ImportError:
        return
    if ninja.BIN_DIR not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])


def kernel():
    """The built extension module, or None where it is turned off or cannot be built."""
    if not _enabled or os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    return _build()


@contextlib.contextmanager
def disabled():
    """Run the fast path without the kernel (tests and benchmarks compare the two)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


class CPUEMRouting(torch.autograd.Function):
    """Votes + EM routing in the fused kernel. pf (I, G, 16), W (I, J, 4, 4), offsets (I, 16) or None (no
    gradient), acts (G, I), beta_u, beta_a (J,); config = (child_of (L·I) int32, L, children, lambdas,
    cost_norm, var_floor): routing units of L groups whose children are named by child_of.
    Returns poses (G, J, 16) and activation logits (G, J)."""

    @staticmethod
    def forward(ctx, pf, W, offsets, acts, beta_u, beta_a, config):
        args = _kernel_args(pf, W, offsets, acts, beta_u, beta_a)
        mu, logit = kernel().em_forward(*args, *_config_args(config))
        ctx.save_for_backward(pf, W, offsets, acts, beta_u, beta_a)
        ctx.config = config
        return mu, logit

    @staticmethod
    def backward(ctx, d_mu, d_logit):
        pf, W, offsets, acts, beta_u, beta_a = ctx.saved_tensors
        args = _kernel_args(pf, W, offsets, acts, beta_u, beta_a)
        dtype = args[0].dtype
        d_mu, d_logit = d_mu.to(dtype).contiguous(), d_logit.to(dtype).contiguous()
        dpf, dW, d_acts, d_bu, d_ba = kernel().em_backward(*args, *_config_args(ctx.config), d_mu, d_logit)
        I, J = W.shape[:2]
        dW = dW.view(I, 4, J, 4).permute(0, 2, 1, 3)  # (I, k, J, c) -> (I, J, 4, 4)
        return (
            dpf.to(pf.dtype), dW.to(W.dtype), None, d_acts.to(acts.dtype),
            d_bu.to(beta_u.dtype), d_ba.to(beta_a.dtype), None,
        )  # fmt: skip


@torch.compiler.disable  # torch.compile runs this as it is (a graph break), never traces into it
def try_route(pf, W, offsets, acts, beta_u, beta_a, global_grid, lambdas, cost_norm, var_floor):
    """``CPUEMRouting`` applied: poses (G, J, 16) and activation logits (G, J); None where the kernel is
    off or unavailable (the caller routes another way). ``global_grid``: None for patch competition, or
    (in_hw, kernel_size, stride, types) of a global-competition ConvCaps (see ``global_children``)."""
    if kernel() is None:
        return None
    units = patch_children(pf.shape[0]) if global_grid is None else global_children(*global_grid)
    config = (*units, lambdas, cost_norm, var_floor)
    return CPUEMRouting.apply(pf, W, offsets, acts, beta_u, beta_a, config)


def _kernel_args(pf, W, offsets, acts, beta_u, beta_a):
    dtype = torch.float64 if pf.dtype == torch.float64 else torch.float32  # routing_dtype
    I, J = W.shape[:2]
    off = offsets if offsets is not None else pf.new_empty(0)
    Wrow = W.permute(0, 2, 1, 3).reshape(I, 4, J * 4)  # Wrow[i][k][j·4 + c] = W_ij[k][c]
    tensors = (pf, Wrow, off, acts, beta_u, beta_a)
    return [t.detach().to(dtype).contiguous() for t in tensors]


def _config_args(config):
    child_of, L, children, lambdas, cost_norm, var_floor = config
    return child_of, L, children, list(lambdas), COST_NORMS[cost_norm], var_floor


@functools.cache  # built once per layer geometry, not on every forward; callers only read it
def patch_children(I: int) -> tuple[torch.Tensor, int, int]:
    """Units of one group whose I children each compete alone: (child_of, L = 1, children = I)."""
    return torch.arange(I, dtype=torch.int32), 1, I


@functools.cache
def global_children(in_hw, kernel_size, stride, types) -> tuple[torch.Tensor, int, int]:
    """Units of one image (L = Ho·Wo groups) under global competition: slot i = (kh·K + kw)·B + b of
    position (ho, wo) is the child at (ho·s + kh, wo·s + kw, b) of the (H, W, B) input grid."""
    H, W = in_hw
    K, s, B = kernel_size, stride, types
    Ho, Wo = (H - K) // s + 1, (W - K) // s + 1
    ho, wo, kh, kw, b = torch.meshgrid(*(torch.arange(n) for n in (Ho, Wo, K, K, B)), indexing="ij")
    child = ((ho * s + kh) * W + (wo * s + kw)) * B + b  # (Ho, Wo, K, K, B) = (L, I)
    return child.reshape(-1).to(torch.int32), Ho * Wo, H * W * B
