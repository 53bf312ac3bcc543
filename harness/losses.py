"""Losses and margin schedules of the common runner.

Spread loss (Hinton, Sabour & Frosst 2018, §3.1) on class activations a = sigmoid(logits):

    L = sum_{i != t} max(0, m - (a_t - a_i))^2        (summed over classes, averaged over the batch)

The margin m grows during training. ``LossConfig`` parameterises it by a schedule name, ``margin_start``,
``margin_end`` and ``margin_ramp_epochs``; ``e`` below is training progress in epochs (0 at the first step,
fractional within an epoch):

- ``linear`` (the seed article: 0.2 -> 0.9 by +0.1 per epoch): m = start + (end - start) min(1, e / ramp).
  With start=0.2, end=0.9, ramp=7 it equals the seed's margin at the start of every epoch.
- ``sigmoid`` (the official code): m = start + (end - start) sigmoid(min(10, 14 e / ramp - 4)).
  The official m = 0.2 + 0.79 sigmoid(min(10, step / 50000 - 4)) is start=0.2, end=0.99 and
  ramp = 700000 / steps_per_epoch epochs (the 14 units of the sigmoid's argument are 700k steps).
- ``constant``: m = end throughout (start and ramp are ignored).
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F

from harness.config import LossConfig
from models.choices import parse_choice


class LossName(enum.StrEnum):
    AUTO = "auto"
    SPREAD = "spread"
    CROSS_ENTROPY = "cross_entropy"


class MarginSchedule(enum.StrEnum):
    LINEAR = "linear"
    SIGMOID = "sigmoid"
    CONSTANT = "constant"


def spread_loss(logits: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Spread loss on a = sigmoid(logits) (N×classes), averaged over the batch."""
    a = torch.sigmoid(logits.float())  # N×K
    a_t = a.gather(1, target[:, None])  # N×1
    gap = F.relu(margin - (a_t - a)) ** 2  # N×K; the target column is margin^2, removed below
    others = torch.ones_like(gap).scatter_(1, target[:, None], 0.0)
    return (gap * others).sum(dim=1).mean()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Cross-entropy on logits (``margin`` is accepted and ignored, for a common signature)."""
    return F.cross_entropy(logits.float(), target)


def resolve_loss_name(name: str, default_loss: str) -> LossName:
    """``"auto"`` -> the model's ``default_loss``; otherwise the named loss (checked)."""
    loss = parse_choice(LossName, name, "loss")
    if loss is LossName.AUTO:
        loss = parse_choice(LossName, default_loss, "model default_loss")
    return loss


def get_loss(name: LossName | str):
    """The loss function ``f(logits, target, margin) -> scalar`` for a resolved loss name."""
    loss = parse_choice(LossName, name, "loss")
    if loss is LossName.AUTO:
        raise ValueError("resolve 'auto' with resolve_loss_name(name, model.default_loss) first")
    return spread_loss if loss is LossName.SPREAD else cross_entropy


def check_loss_config(cfg: LossConfig) -> None:
    """Fail early, with the fix, on a schedule name or parameters that make no sense."""
    parse_choice(LossName, cfg.name, "loss.name")
    parse_choice(MarginSchedule, cfg.margin_schedule, "loss.margin_schedule")
    if not (0.0 <= cfg.margin_start <= 1.0 and 0.0 <= cfg.margin_end <= 1.0):
        raise ValueError(
            f"loss.margin_start={cfg.margin_start} and loss.margin_end={cfg.margin_end} must lie in [0, 1] "
            "(activations are in [0, 1])"
        )
    if cfg.margin_ramp_epochs <= 0:
        raise ValueError(f"loss.margin_ramp_epochs={cfg.margin_ramp_epochs} must be > 0")


def margin_at(cfg: LossConfig, progress: float) -> float:
    """Spread-loss margin after ``progress`` epochs of training (0 = the first step)."""
    schedule = parse_choice(MarginSchedule, cfg.margin_schedule, "loss.margin_schedule")
    start, end, ramp = cfg.margin_start, cfg.margin_end, cfg.margin_ramp_epochs
    if schedule is MarginSchedule.CONSTANT:
        return end
    if schedule is MarginSchedule.LINEAR:
        return start + (end - start) * min(1.0, max(0.0, progress) / ramp)
    x = min(10.0, 14.0 * progress / ramp - 4.0)
    return start + (end - start) / (1.0 + math.exp(-x))


def official_ramp_epochs(steps_per_epoch: int) -> float:
    """``margin_ramp_epochs`` that reproduces the official sigmoid schedule at this many steps per epoch."""
    return 700_000 / steps_per_epoch
