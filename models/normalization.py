"""Input normalisation that lives inside the model, so attacks work in [0, 1] pixel space."""

from __future__ import annotations

import torch
import torch.nn as nn


class PerImageStandardize(nn.Module):
    """(x - mean) / max(std, 1/sqrt(numel)) per image, as tf.image.per_image_standardization (the paper)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)  # N×(C·H·W)
        mean = flat.mean(dim=1, keepdim=True)
        std = flat.std(dim=1, unbiased=False, keepdim=True)
        floor = flat.shape[1] ** -0.5
        return ((flat - mean) / std.clamp_min(floor)).view_as(x)
