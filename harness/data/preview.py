"""A PNG contact sheet of a smallNORB-format dataset: categories × azimuths, both cameras.

python -m harness.data preview synthnorb            # -> <data root>/synthnorb/preview-test.png
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from harness.data import DataError, dataset_folder, get_dataset, get_spec  # noqa: E402
from harness.viewpoint import azimuth_degrees, elevation_degrees  # noqa: E402


def preview(
    name: str,
    *,
    root: str | Path | None = None,
    out: str | Path | None = None,
    split: str = "test",
    instance: int | None = None,
    elevation: int | None = None,
    lighting: int | None = None,
    progress: bool = True,
) -> Path:
    """Write the grid (rows: category × camera, columns: azimuth) and return the PNG's path.

    instance / elevation / lighting are raw codes; None picks the smallest present in the split.
    """
    if get_spec(name).channels != 2:
        raise DataError(f"preview draws smallNORB-format (stereo) datasets; {name} is not one")
    # val_fraction=0: "train" shows every record of the training files
    ds = get_dataset(name, split, root=root, channels=2, val_fraction=0.0, progress=progress)
    meta = ds.meta
    pick = {}
    for col, val in (("instance", instance), ("elevation", elevation), ("lighting", lighting)):
        present = sorted(meta[col].unique())
        if val is None:
            val = int(present[0])
        elif val not in present:
            raise DataError(f"{col} code {val} is not in {name}/{split}; choose one of {present}")
        pick[col] = val
    rows = meta.index[
        (meta.instance == pick["instance"])
        & (meta.elevation == pick["elevation"])
        & (meta.lighting == pick["lighting"])
    ]
    azimuths = sorted(meta.azimuth.unique())
    S = ds.images.shape[-1]
    ncat = len(ds.classes)
    sheet = np.full((ncat * 2 * S, len(azimuths) * S), 255, np.uint8)  # (category, camera) × azimuth tiles
    labels = ds.labels.numpy()
    for r in rows:
        c, a = int(labels[r]), azimuths.index(meta.azimuth[r])
        for cam in range(2):
            y = (2 * c + cam) * S
            sheet[y : y + S, a * S : (a + 1) * S] = ds.images[r, cam].numpy()
    out = Path(out) if out else dataset_folder(name, root) / f"preview-{split}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(len(azimuths) * 0.75 + 1.5, ncat * 1.5 + 1), dpi=110)
    ax.imshow(sheet, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ticks = [f"{azimuth_degrees(a)}°" for a in azimuths]
    ax.set_xticks((np.arange(len(azimuths)) + 0.5) * S, ticks, fontsize=7)
    ax.set_yticks(
        (np.arange(2 * ncat) + 0.5) * S,
        [f"{ds.classes[i // 2]} {'LR'[i % 2]}" for i in range(2 * ncat)],
        fontsize=8,
    )
    ax.set_xlabel("azimuth (raw code × 10)")
    ax.set_title(
        f"{name} {split}: instance {pick['instance']}, elevation {elevation_degrees(pick['elevation'])}°, "
        f"lighting {pick['lighting']} ({S}×{S}, L/R camera)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
