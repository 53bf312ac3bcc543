"""The runner's learning-rate schedule: the base rate times a factor of training progress, set every step.

    exponential   lr · lr_decay^k during epoch k + 1 (k = 0, 1, ...): a step down per epoch
    cosine        lr · ½ (1 + cos(π p / E)), p = epochs done (fractional): from lr to 0 by the end of E
                  epochs, E = optim.schedule_epochs or train.epochs (a study's trial, shorter than its
                  final run, trains the first epochs of the final run's cosine)

The factor is a pure function of (settings, steps done), so a resumed run continues it exactly, a changed
``optim.lr`` scales the rest of it and a changed ``train.epochs`` stretches the cosine (when
``optim.schedule_epochs`` is 0) from the next epoch.
"""

from __future__ import annotations

import math
from enum import StrEnum

import torch

from harness.config import RunConfig
from models.choices import parse_choice


class Schedule(StrEnum):
    EXPONENTIAL = "exponential"
    COSINE = "cosine"


AUTO = "auto"  # optim.schedule's default: the model's ``default_schedule``
CHOICES = (AUTO, *(s.value for s in Schedule))


def resolve(name: str, default_schedule: str) -> str:
    """``"auto"`` -> the model's ``default_schedule``; otherwise the named schedule (checked)."""
    return parse_choice(Schedule, default_schedule if name == AUTO else name, "optim.schedule").value


def lr_factor(cfg: RunConfig, progress: float) -> float:
    """The base rate's multiplier after ``progress`` epochs of training (fractional; 0 = the first step)."""
    if cfg.optim.schedule == Schedule.EXPONENTIAL:  # a resolved name, checked by check_config
        return cfg.optim.lr_decay ** math.floor(progress + 1e-9)  # exact at epoch boundaries
    length = cfg.optim.schedule_epochs or cfg.train.epochs
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, length) / length))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: RunConfig, steps_per_epoch: int, steps_done: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler to step after every optimiser step, at rate ``cfg.optim.lr`` times the factor of
    ``steps_done`` + the steps taken since (a resumed run counts on from where it stopped)."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = cfg.optim.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, (steps_done + step) / steps_per_epoch)
    )


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Optimiser steps in one pass over ``n_images`` (the last batch may be short)."""
    return max(1, math.ceil(n_images / batch_size))
