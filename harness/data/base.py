"""The in-memory dataset every loader returns, and the data error type.

An ``ArrayDataset`` holds uint8 images at their stored size (48×48 for smallNORB-format data, 28×28 for
MNIST-likes) and turns batches into model input with ``preprocess`` on whatever device the batch is on.
Indexing gives single items with evaluation preprocessing, for inspection and for torch DataLoaders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from harness.data import transforms
from harness.errors import CapsbenchError

META_COLUMNS = ("instance", "elevation", "azimuth", "lighting")


class DataError(CapsbenchError, RuntimeError):
    """A dataset problem; the message is one line saying what is wrong and how to fix it."""


@dataclass
class Part:
    """Everything a loader reads from one file set (the training files or the test files)."""

    images: np.ndarray | torch.Tensor  # uint8 N×C×S×S with every channel the data has
    labels: np.ndarray  # int64 N
    meta: pd.DataFrame | None  # META_COLUMNS as raw codes, or None
    identity: dict[str, str]  # file name -> sha256


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: how to load its parts and how its images become model input."""

    name: str
    classes: tuple[str, ...]
    input_size: int  # side of the model input
    augment: str  # "norb" | "none" (see ArrayDataset)
    channels: int  # channels stored (2 = smallNORB's stereo pair)
    load: Callable[..., Part]  # load(folder, part: "train"|"test", *, progress, **options) -> Part
    doc: str = ""


class ArrayDataset(torch.utils.data.Dataset):
    """Images, labels and viewpoint metadata of one split of one dataset.

    Args:
        name: registry name ("smallnorb", "fashion_mnist", ...).
        split: "train" | "val" | "test".
        images: uint8 tensor N×C×S×S at the stored size.
        labels: int64 tensor N.
        meta: DataFrame with META_COLUMNS (raw codes), row-aligned with images; None if the data has none.
        classes: class names, index = label.
        input_size: side of the model input produced by ``preprocess`` (32 NORB, 28 MNIST).
        identity: file name -> sha256 of the files the data came from (for tracking).
        augment: "norb" (random crop + brightness/contrast jitter, centre crop for eval) or "none".
    """

    def __init__(
        self,
        name: str,
        split: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        meta: pd.DataFrame | None,
        classes: Sequence[str],
        input_size: int,
        identity: dict[str, str],
        augment: str = "none",
    ):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(
                f"{name}/{split}: images must be uint8 N×C×S×S, got {images.dtype} {tuple(images.shape)}"
            )
        if len(labels) != len(images) or (meta is not None and len(meta) != len(images)):
            raise DataError(
                f"{name}/{split}: images, labels and meta have different lengths; rebuild the dataset"
            )
        if augment not in ("norb", "none"):
            raise ValueError(f"augment must be 'norb' or 'none', got {augment!r}")
        self.name = name
        self.split = split
        self.images = images
        self.labels = labels.to(torch.int64)
        self.meta = meta.reset_index(drop=True) if meta is not None else None
        self.classes = list(classes)
        self.in_channels = int(images.shape[1])
        self.input_size = int(input_size)
        self.identity = dict(identity)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.preprocess(self.images[i : i + 1], train=False)[0]
        return x, int(self.labels[i])

    def preprocess(
        self, x: torch.Tensor, *, train: bool, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """uint8 batch N×C×S×S -> float batch N×C×input_size×input_size in [0, 1], on x's device."""
        if self.augment == "norb":
            return transforms.norb_preprocess(x, train=train, size=self.input_size, generator=generator)
        x = transforms.to_float(x)
        return transforms.center_crop(x, self.input_size)

    def select(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> ArrayDataset:
        """A new dataset with only the given rows (in that order), e.g. for a quick run on a subset."""
        idx = torch.as_tensor(np.asarray(index), dtype=torch.int64)
        meta = self.meta.iloc[idx.numpy()] if self.meta is not None else None
        return ArrayDataset(
            self.name,
            self.split,
            self.images[idx],
            self.labels[idx],
            meta,
            self.classes,
            self.input_size,
            self.identity,
            self.augment,
        )

    def __repr__(self) -> str:
        c, s = self.images.shape[1], self.images.shape[-1]
        return (
            f"ArrayDataset({self.name}/{self.split}: {len(self)} images {c}×{s}×{s} -> {self.input_size}, "
            f"{len(self.classes)} classes)"
        )
