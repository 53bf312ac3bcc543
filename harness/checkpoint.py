"""Checkpoints: atomic writes, the model record other commands rebuild from, and full resume state.

A model record is ``{"model_name", "model_kwargs", "state_dict", "epoch"}``: enough to rebuild the model
with ``models.create_model(model_name, **model_kwargs)`` and ``load_state_dict`` (no pickled classes).
The resume state adds the optimiser, scheduler, RNG states, history and config of the run so that an
interrupted run continues exactly where it stopped.

Every file is read with ``torch.load(weights_only=True)``: tensors and plain Python data only, so a planted
file can never run code (it is refused with ``UnsafeCheckpointError``); a damaged one raises
``CheckpointError``. Both messages are one line naming the file. Files are written with the permissions
the umask gives (like every other file the project writes).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from harness.errors import CapsbenchError

RECORD_KEYS = {"model_name", "model_kwargs", "state_dict", "epoch"}
RESUME_KEYS = RECORD_KEYS | {"optimizer", "scheduler", "rng", "config", "history", "best", "train_seconds"}
# resume.pt files written before RNG states were stored as lists hold the numpy MT19937 key as an array:
# exactly these numpy globals rebuild it (torch documents them as safe to allow; numpy 1.x: numpy.core)
_NUMPY_CORE = getattr(np, "_core", None) or np.core
_LEGACY_NUMPY_RNG = [np.ndarray, np.dtype, np.dtypes.UInt32DType, _NUMPY_CORE.multiarray._reconstruct]


class CheckpointError(CapsbenchError, RuntimeError):
    """A checkpoint file that cannot be used (damaged, truncated, not a capsbench checkpoint)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that asks to rebuild objects other than tensors and plain data: it could run code."""


def atomic_save(obj: Any, path: str | Path, *, previous: str | Path | None = None) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``: never a half-written file.

    With ``previous``, the file ``path`` held until now is kept under that name (renamed, not copied).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as open() does
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        if previous is not None and path.is_file():
            os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def safe_load(path: str | Path) -> Any:
    """``torch.load(weights_only=True)`` on the CPU, with one-line errors that name the file."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY_RNG):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", str(e))
        name = found and (found.group(1) or found.group(2))
        what = f"a reference to {name}" if name else "objects other than tensors and plain data"
        raise UnsafeCheckpointError(
            f"{path}: refused: it holds {what}, which could run code when loaded; capsbench never writes "
            "that, so the file did not come from capsbench: delete it and do not use the run it came with"
        ) from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except Exception as e:  # truncated or overwritten: torch's zip reader, EOF, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]  # torch adds advice
        raise CheckpointError(f"{path} is damaged or truncated ({reason[:120]})") from None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module behind ``torch.compile`` (its state_dict keys carry no ``_orig_mod.`` prefix)."""
    return getattr(model, "_orig_mod", model)


def model_record(model: nn.Module, epoch: int) -> dict[str, Any]:
    """The record from which ``tracking.load_model`` rebuilds a model; tensors are copied to the CPU."""
    model = unwrap(model)
    return {
        "model_name": model.model_name,
        "model_kwargs": dict(model.model_kwargs),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "epoch": epoch,
    }


def load_record(path: str | Path) -> dict[str, Any]:
    return _checked(safe_load(path), RECORD_KEYS, path, "model record")


def rng_state() -> dict[str, Any]:
    """Every random number generator the training loop draws from (python, numpy, torch CPU and CUDA).

    Plain tuples, lists and tensors only, so that the state loads with ``weights_only=True``.
    """
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, key.tolist(), pos, has_gauss, gauss),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def resume_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    epoch: int,
    config: dict[str, Any],
    history: list[dict[str, float]],
    best: dict[str, Any],
    train_seconds: float,
) -> dict[str, Any]:
    """Full state after ``epoch`` completed epochs."""
    return {
        **model_record(model, epoch),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "config": config,
        "history": history,
        "best": best,
        "train_seconds": train_seconds,
    }


def load_resume_state(path: str | Path) -> dict[str, Any]:
    return _checked(safe_load(path), RESUME_KEYS, path, "resume state")


def _checked(obj: Any, keys: set[str], path: str | Path, what: str) -> dict[str, Any]:
    missing = keys - set(obj) if isinstance(obj, dict) else keys
    if missing:
        raise CheckpointError(f"{path} is not a capsbench {what} (missing {', '.join(sorted(missing))})")
    return obj
