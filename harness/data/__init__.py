"""Dataset registry: smallNORB, synthnorb, Fashion-MNIST and MNIST behind one call.

    ds = get_dataset("synthnorb", "train", view="azimuth")          # familiar azimuths only
    test_novel = get_dataset("synthnorb", "test", view="azimuth", subset="novel")
    for x, y, index in iterate(ds, 32, shuffle=True, train=True, seed=0, device="cpu"): ...

Data root: ``$CAPSBENCH_DATA``, else ``<project>/data``; a dataset lives in ``<root>/<name>``. ``root=``
may name either the dataset's own folder or a data root that holds ``<name>/``. Validation rows are a
deterministic held-out fraction of the training files, never of the test files. See docs/contracts.md.
"""

from __future__ import annotations

import difflib
import enum
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.data.base import ArrayDataset, DataError, DatasetSpec, Part
from harness.paths import PROJECT_ROOT
from models.choices import parse_choice

VAL_SEED = 20180215  # fixed: the held-out rows never change between runs


class Split(enum.StrEnum):
    TRAIN = "train"
    VAL = "val"
    TEST = "test"


class View(enum.StrEnum):
    AZIMUTH = "azimuth"
    ELEVATION = "elevation"


VIEWS = ("none", *View)  # the data.view setting: no split, or a novel-viewpoint split


class Subset(enum.StrEnum):
    ALL = "all"
    FAMILIAR = "familiar"
    NOVEL = "novel"


# The paper's familiar viewpoints (§5.1), as raw codes: azimuths 300..40 degrees, the 3 lowest elevations.
FAMILIAR_CODES = {
    View.AZIMUTH: ("azimuth", frozenset({30, 32, 34, 0, 2, 4})),
    View.ELEVATION: ("elevation", frozenset({0, 1, 2})),
}

_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    if spec.name in _DATASETS:
        raise ValueError(f"dataset {spec.name!r} is already registered; pick another name")
    _DATASETS[spec.name] = spec
    return spec


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def get_spec(name: str) -> DatasetSpec:
    if name not in _DATASETS:
        close = difflib.get_close_matches(name, list_datasets(), n=3, cutoff=0.4)
        hint = (
            f"did you mean {', '.join(close)}?" if close else f"known datasets: {', '.join(list_datasets())}"
        )
        raise DataError(f"unknown dataset {name!r}: {hint} (see harness.data.list_datasets())")
    return _DATASETS[name]


def data_root() -> Path:
    """$CAPSBENCH_DATA, else <project>/data."""
    return Path(os.environ.get("CAPSBENCH_DATA") or PROJECT_ROOT / "data")


def dataset_folder(name: str, root: str | Path | None = None) -> Path:
    """The folder with ``name``'s files: <root>/<name> if that exists (or root is None), else root itself."""
    if root is None or str(root) == "":
        return data_root() / name
    root = Path(root)
    return root / name if (root / name).is_dir() else root


def _view(view) -> View | None:
    if view is None or str(view) in ("", "none"):
        return None
    return parse_choice(View, str(view), "view", DataError)


def familiar_mask(meta: pd.DataFrame, view) -> np.ndarray:
    """True where a row's viewpoint is familiar under ``view`` ("azimuth" | "elevation"; None: all True)."""
    v = _view(view)
    if meta is None:
        raise DataError("this dataset has no viewpoint metadata; use view=None")
    if v is None:
        return np.ones(len(meta), dtype=bool)
    column, codes = FAMILIAR_CODES[v]
    return meta[column].isin(codes).to_numpy()


def held_out(n: int, fraction: float) -> np.ndarray:
    """Sorted row indices of the validation rows: a fixed pseudo-random ``fraction`` of n."""
    perm = np.random.default_rng(VAL_SEED).permutation(n)
    return np.sort(perm[: int(round(n * fraction))])


def get_dataset(
    name: str,
    split: str,
    *,
    view: str | None = None,
    subset: str = "all",
    channels: int = 1,
    root: str | Path | None = None,
    val_fraction: float = 0.1,
    progress: bool = True,
    **options,
) -> ArrayDataset:
    """One split of a registered dataset (see docs/contracts.md "Data").

    split: train | val | test. view: None | azimuth | elevation (train/val then keep familiar
    viewpoints only). subset: all | familiar | novel (test only, needs a view). channels: 1, or 2 for
    smallNORB-format stereo pairs. ``options`` go to the dataset's loader (e.g. download=False for MNIST).
    """
    spec = get_spec(name)
    split = parse_choice(Split, str(split), "split", DataError)
    v = _view(view)
    subset = parse_choice(Subset, str(subset), "subset", DataError)
    if subset is not Subset.ALL and split is not Split.TEST:
        raise DataError(
            f"subset={subset.value!r} applies to the test split only; use subset='all' for {split.value}"
        )
    if subset is not Subset.ALL and v is None:
        raise DataError(
            f"subset={subset.value!r} needs a viewpoint split; pass view='azimuth' or 'elevation'"
        )
    if channels not in range(1, spec.channels + 1):
        raise DataError(
            f"{name} has {spec.channels} channel(s); use channels in 1..{spec.channels}, not {channels}"
        )
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split is Split.VAL and val_fraction == 0:
        raise DataError("val_fraction is 0, so there is no validation split; use val_fraction > 0")

    folder = dataset_folder(name, root)
    part: Part = spec.load(folder, "test" if split is Split.TEST else "train", progress=progress, **options)
    n = len(part.labels)
    if split is Split.TEST:
        rows = np.arange(n)
    else:
        val = held_out(n, val_fraction)
        rows = val if split is Split.VAL else np.setdiff1d(np.arange(n), val)
    if v is not None:
        if part.meta is None:
            raise DataError(
                f"{name} has no viewpoint metadata, so view={v.value!r} is not possible; use view=None"
            )
        familiar = familiar_mask(part.meta, v)
        if subset is Subset.NOVEL:
            rows = rows[~familiar[rows]]
        elif subset is Subset.FAMILIAR or split is not Split.TEST:  # train/val: familiar views only
            rows = rows[familiar[rows]]
    images = part.images[rows, :channels] if len(rows) else part.images[:0, :channels]
    images = (
        torch.from_numpy(np.ascontiguousarray(images))
        if isinstance(images, np.ndarray)
        else images.contiguous()
    )
    meta = part.meta.iloc[rows].reset_index(drop=True) if part.meta is not None else None
    return ArrayDataset(
        name,
        split.value,
        images,
        torch.from_numpy(np.asarray(part.labels)[rows]),
        meta,
        spec.classes,
        spec.input_size,
        part.identity,
        spec.augment,
    )


def iterate(
    dataset: ArrayDataset,
    batch_size: int,
    *,
    shuffle: bool,
    train: bool,
    seed: int,
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches ``(x float [0,1] on device, y int64 on device, index int64 cpu)``, deterministic for ``seed``.

    uint8 images move to the device first and are preprocessed there (train=True: augmentation).
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    device = torch.device(device)
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(n)
    gen = torch.Generator(device=device).manual_seed(seed + 1) if train else None
    pin = device.type == "cuda"
    for start in range(0, n, batch_size):
        index = order[start : start + batch_size]  # cpu int64
        xb, yb = dataset.images[index], dataset.labels[index]
        if pin:
            xb, yb = xb.pin_memory(), yb.pin_memory()
        xb, yb = xb.to(device, non_blocking=pin), yb.to(device, non_blocking=pin)
        yield dataset.preprocess(xb, train=train, generator=gen), yb, index


# the modules that register datasets (imported last: they use register_dataset above)
from harness.data import mnist, smallnorb, synthnorb  # noqa: E402, F401

__all__ = [
    "ArrayDataset",
    "DataError",
    "DatasetSpec",
    "Part",
    "Split",
    "View",
    "Subset",
    "FAMILIAR_CODES",
    "register_dataset",
    "list_datasets",
    "get_spec",
    "get_dataset",
    "iterate",
    "familiar_mask",
    "held_out",
    "data_root",
    "dataset_folder",
]
