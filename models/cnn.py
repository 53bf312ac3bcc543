"""Baseline CNNs of Hinton, Sabour & Frosst, "Matrix capsules with EM routing" (ICLR 2018), §5.

The paper's baseline: conv 5×5/32 + 2×2 max-pool, conv 5×5/64 + pool, FC 1024 + dropout, FC classes
(SAME padding; ≈4.2M parameters on 32×32). ``cnn_small`` has the same shape with widths chosen so its
parameter count is within 10% of ``em_capsnet``'s (≈310K), for a like-for-like comparison.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models._registry import register_model
from models.normalization import PerImageStandardize


class BaselineCNN(nn.Module):
    family = "cnn"
    default_loss = "cross_entropy"
    default_lr = 1e-3  # the runner's optim.lr when left at 0 (docs/capsule_recipe.md)
    default_schedule = "exponential"  # the runner's optim.schedule when left at "auto" (same doc)

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 5,
        input_size: int = 32,
        widths: tuple[int, int] = (32, 64),
        hidden: int = 1024,
        dropout: float = 0.5,
    ):
        super().__init__()
        c1, c2 = widths
        self.num_classes = num_classes
        self.normalize = PerImageStandardize()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        side = input_size // 4  # two 2×2 pools after SAME convolutions
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


@register_model
def cnn_baseline(**kwargs) -> BaselineCNN:
    """The paper's CNN baseline (≈4.2M parameters on 32×32)."""
    return BaselineCNN(**dict(dict(widths=(32, 64), hidden=1024), **kwargs))


@register_model
def cnn_small(**kwargs) -> BaselineCNN:
    """The baseline's shape at em_capsnet's parameter budget (≈320K parameters on 32×32)."""
    return BaselineCNN(**dict(dict(widths=(16, 32), hidden=150), **kwargs))
