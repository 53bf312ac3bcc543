"""Checkpoints: atomic writes, the model record other commands rebuild from, and full resume state.

A model record is ``{"model_name", "model_kwargs", "state_dict", "epoch"}``: enough to rebuild the model
with ``models.create_model(model_name, **model_kwargs)`` and ``load_state_dict`` (no pickled classes).
The resume state adds the optimiser, scheduler, RNG states, history and config of the run so that an
interrupted run continues exactly where it stopped.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace``: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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
    record = torch.load(path, map_location="cpu", weights_only=True)
    missing = {"model_name", "model_kwargs", "state_dict", "epoch"} - set(record)
    if missing:
        raise ValueError(f"{path} is not a capsbench model record (missing {', '.join(sorted(missing))})")
    return record


def rng_state() -> dict[str, Any]:
    """Every random number generator the training loop draws from (python, numpy, torch CPU and CUDA)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
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
    # RNG states hold numpy arrays and tuples: not loadable with weights_only=True; this is our own file
    return torch.load(path, map_location="cpu", weights_only=False)
