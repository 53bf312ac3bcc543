"""Device selection: ``auto`` picks CUDA, then Apple MPS, then the CPU; explicit names are checked."""

from __future__ import annotations

import contextlib

import torch

from harness.errors import CapsbenchError


class DeviceError(CapsbenchError, ValueError):
    """A device name that is unknown or not available on this machine."""


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` -> an available torch.device."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise DeviceError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {name!r} asked for but CUDA is not available here; use --device auto or cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)"
            )
    elif device.type == "mps" and not _mps_available():
        raise DeviceError(
            f"device {name!r} asked for but MPS is not available here; use --device auto or cpu"
        )
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {name!r}: use auto, cpu, cuda, cuda:N or mps")
    return device


def describe(device: torch.device) -> str:
    """A human-readable device label for the run's ``device`` tag, e.g. ``cuda:0 (NVIDIA H100)``."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    if device.type == "cpu":
        return f"cpu ({torch.get_num_threads()} threads)"
    return str(device)


def autocast(device: torch.device, precision: str):
    """Autocast context for ``precision`` ("fp32" = no autocast, "bf16")."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise DeviceError(f"unknown precision {precision!r}: use fp32 or bf16")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so that wall-clock timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
