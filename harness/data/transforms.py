"""Batched image preprocessing on the batch's device (the smallNORB pipeline of docs/smallnorb_format.md).

Everything takes a uint8 or float batch N×C×H×W and runs as a handful of tensor ops, so augmentation
keeps up with a GPU. Random choices come from an optional ``torch.Generator`` living on the batch's
device, which makes a run deterministic for a seed.

    x = to_float(batch_uint8)                                  # [0, 1]
    x = random_crop(x, 32, generator=g)                        # training
    x = random_brightness_contrast(x, generator=g)             # training
    x = center_crop(x, 32)                                     # evaluation
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The seed article's jitter (tf.image.random_brightness / random_contrast ranges).
MAX_BRIGHTNESS_DELTA = 32.0 / 255.0
CONTRAST_RANGE = (0.5, 1.5)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is returned as float32 unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def downsample(x: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased resize of a uint8 batch N×C×H×W to N×C×size×size (box filter), rounded back to uint8."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    y = F.interpolate(x.float(), size=(size, size), mode="area")
    return y.round_().clamp_(0, 255).to(torch.uint8)


def crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """Per-image crops: out[n] = x[n, :, top[n]:top[n]+size, left[n]:left[n]+size] (top, left: int64 N)."""
    n, c = x.shape[:2]
    ar = torch.arange(size, device=x.device)
    rows = (top.to(x.device)[:, None] + ar)[:, :, None]  # N×size×1
    cols = (left.to(x.device)[:, None] + ar)[:, None, :]  # N×1×size
    idx = torch.arange(n, device=x.device)[:, None, None]  # N×1×1
    out = x.permute(0, 2, 3, 1)[idx, rows, cols]  # N×size×size×C
    return out.permute(0, 3, 1, 2).contiguous()  # N×C×size×size


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size×size window of every image (the paper's test-time crop)."""
    h, w = x.shape[-2:]
    _check_size(h, w, size)
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size].contiguous()


def random_crop(x: torch.Tensor, size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """An independent uniformly placed size×size crop per image."""
    h, w = x.shape[-2:]
    _check_size(h, w, size)
    n = x.shape[0]
    top = torch.randint(0, h - size + 1, (n,), generator=generator, device=_gen_device(generator, x))
    left = torch.randint(0, w - size + 1, (n,), generator=generator, device=_gen_device(generator, x))
    return crop(x, top, left, size)


def adjust_brightness_contrast(x: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """x + delta, then contrast ``factor`` around each image-channel's mean, clipped to [0, 1].

    ``delta`` and ``factor`` are float tensors of shape N (one value per image), as
    tf.image.adjust_brightness followed by tf.image.adjust_contrast.
    """
    d = delta.to(x.device, x.dtype).view(-1, 1, 1, 1)
    f = factor.to(x.device, x.dtype).view(-1, 1, 1, 1)
    y = x + d
    mean = y.mean(dim=(-2, -1), keepdim=True)  # N×C×1×1
    return ((y - mean) * f + mean).clamp_(0.0, 1.0)


def random_brightness_contrast(
    x: torch.Tensor,
    *,
    max_delta: float = MAX_BRIGHTNESS_DELTA,
    contrast: tuple[float, float] = CONTRAST_RANGE,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Brightness shift uniform in ±max_delta and contrast factor uniform in ``contrast``, per image."""
    n = x.shape[0]
    dev = _gen_device(generator, x)
    delta = (torch.rand(n, generator=generator, device=dev) * 2 - 1) * max_delta
    lo, hi = contrast
    factor = lo + torch.rand(n, generator=generator, device=dev) * (hi - lo)
    return adjust_brightness_contrast(x, delta, factor)


def norb_preprocess(
    x: torch.Tensor, *, train: bool, size: int = 32, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The paper's smallNORB pipeline on 48×48 batches: train = random crop + jitter, eval = centre crop."""
    x = to_float(x)
    if not train:
        return center_crop(x, size)
    x = random_crop(x, size, generator=generator)
    return random_brightness_contrast(x, generator=generator)


def _check_size(h: int, w: int, size: int) -> None:
    if h < size or w < size:
        raise ValueError(
            f"cannot crop {size}×{size} from {h}×{w} images; use images of at least {size}×{size}"
        )


def _gen_device(generator: torch.Generator | None, x: torch.Tensor) -> torch.device:
    # random numbers are drawn on the generator's device (or the batch's) and moved by crop()/adjust_*
    return generator.device if generator is not None else x.device
