"""Evaluation as small pure functions: predictions, error rates, per-viewpoint tables and plots.

    logits, labels = predict(model, dataset, device=device)
    err = error_rate(logits.argmax(1), labels)
    tables = viewpoint_errors(logits.argmax(1), labels, dataset.meta)
    plot_viewpoint_heatmap(tables["grid"], "heatmap.png")

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from harness import data  # noqa: E402
from harness.device import autocast  # noqa: E402
from harness.viewpoint import azimuth_degrees, elevation_degrees  # noqa: E402


@torch.inference_mode()
def predict(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode logits (float32, CPU, N×classes) and labels (int64, CPU, N) in dataset order."""
    device = torch.device(device)
    logits, labels = [], []
    with _eval_mode(model):
        for x, y, _ in data.iterate(dataset, batch_size, shuffle=False, train=False, seed=0, device=device):
            with autocast(device, precision):
                out = model(x)
            logits.append(out.float().cpu())
            labels.append(y.cpu())
    if not logits:
        raise ValueError(f"dataset {getattr(dataset, 'name', '?')}/{getattr(dataset, 'split', '?')} is empty")
    return torch.cat(logits), torch.cat(labels)


@torch.inference_mode()
def predict_multicrop(
    model: nn.Module,
    dataset,
    *,
    batch_size: int = 128,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    stride: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean softmax over a grid of crops (every ``stride`` pixels, corners and centre included).

    Multi-crop testing of the paper's best smallNORB figure: each stored S×S image (48 for NORB) is cut
    into input_size crops (32) at offsets 0, stride, ..., S - input_size on both axes, and the class
    probabilities are averaged. Returns log of the mean probabilities (usable as logits) and labels.
    """
    device = torch.device(device)
    images, labels = dataset.images, dataset.labels  # N×C×S×S uint8, N
    side, crop = images.shape[-1], dataset.input_size
    if side <= crop:
        raise ValueError(
            f"multi-crop needs images larger than the model's input ({side} <= {crop}); "
            "turn train.multicrop off for this dataset"
        )
    offsets = sorted(set(range(0, side - crop + 1, stride)) | {side - crop, (side - crop) // 2})
    out = []
    with _eval_mode(model):
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].to(device).float().div_(255)  # B×C×S×S
            probs = 0
            for dy in offsets:
                for dx in offsets:
                    with autocast(device, precision):
                        logit = model(batch[:, :, dy : dy + crop, dx : dx + crop])  # B×K
                    probs = probs + logit.float().softmax(dim=1)
            out.append((probs / len(offsets) ** 2).log().cpu())
    return torch.cat(out), labels.clone()


def error_rate(preds: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of wrong predictions."""
    if len(preds) != len(labels) or len(labels) == 0:
        raise ValueError(f"error_rate needs equal, non-empty lengths (got {len(preds)} and {len(labels)})")
    return (preds != labels).double().mean().item()


def masked_error(preds: torch.Tensor, labels: torch.Tensor, mask: np.ndarray) -> float:
    """Error rate on the rows where ``mask`` is True (NaN when the mask selects nothing)."""
    mask = torch.as_tensor(np.asarray(mask, dtype=bool))
    return error_rate(preds[mask], labels[mask]) if bool(mask.any()) else float("nan")


def viewpoint_errors(
    preds: torch.Tensor, labels: torch.Tensor, meta: pd.DataFrame
) -> dict[str, pd.DataFrame]:
    """Error tables by viewpoint, keyed by factor, with raw codes as in ``meta``.

    ``cells``: one row per (azimuth, elevation) with n, errors, error; ``grid``: error pivoted to
    elevation rows × azimuth columns; ``lighting``, ``azimuth``, ``elevation``: one row per value.
    """
    if meta is None:
        raise ValueError("viewpoint_errors needs viewpoint metadata; this dataset has none")
    if len(meta) != len(preds):
        raise ValueError(f"meta has {len(meta)} rows but there are {len(preds)} predictions")
    frame = meta[["azimuth", "elevation", "lighting"]].reset_index(drop=True).copy()
    frame["wrong"] = (preds != labels).numpy().astype(np.int64)

    def table(keys: list[str]) -> pd.DataFrame:
        t = frame.groupby(keys, sort=True)["wrong"].agg(n="size", errors="sum").reset_index()
        t["error"] = t["errors"] / t["n"]
        return t

    cells = table(["azimuth", "elevation"])
    grid = cells.pivot(index="elevation", columns="azimuth", values="error")
    return {
        "cells": cells,
        "grid": grid,
        "lighting": table(["lighting"]),
        "azimuth": table(["azimuth"]),
        "elevation": table(["elevation"]),
    }


def viewpoint_tables_to_json(tables: dict[str, pd.DataFrame]) -> dict:
    """JSON-ready form of ``viewpoint_errors`` (lists of records; the grid is rebuilt from ``cells``)."""
    return {k: v.to_dict(orient="records") for k, v in tables.items() if k != "grid"}


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """Counts, true class rows × predicted class columns."""
    flat = labels.long() * num_classes + preds.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes).numpy()


def plot_viewpoint_heatmap(
    grid: pd.DataFrame, path: str | Path, title: str = "test error by viewpoint", view: str | None = None
) -> Path:
    """Error per (elevation, azimuth) cell, axes in degrees.

    With ``view`` ("azimuth" | "elevation") the familiar (training) columns or rows are outlined in white.
    """
    values = grid.to_numpy(dtype=float)  # elevations × azimuths
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * grid.shape[1] + 2), max(3.0, 0.45 * grid.shape[0] + 1.5)))
    im = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=max(1e-9, float(np.nanmax(values))))
    ax.set_xticks(range(grid.shape[1]), [f"{azimuth_degrees(a)}" for a in grid.columns], rotation=90)
    ax.set_yticks(range(grid.shape[0]), [f"{elevation_degrees(e)}" for e in grid.index])
    if view in data.FAMILIAR_CODES:
        column, codes = data.FAMILIAR_CODES[view]
        labels = grid.columns if column == "azimuth" else grid.index
        for k, code in enumerate(labels):
            if int(code) in codes:
                xy, w, h = (
                    ((k - 0.5, -0.5), 1, grid.shape[0])
                    if column == "azimuth"
                    else ((-0.5, k - 0.5), grid.shape[1], 1)
                )
                ax.add_patch(plt.Rectangle(xy, w, h, fill=False, edgecolor="white", linewidth=1.5))
        title += f" (outlined: familiar {column}s)"
    ax.set_xlabel("azimuth (degrees)")
    ax.set_ylabel("elevation (degrees)")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="error")
    return _save(fig, path)


def plot_confusion(
    cm: np.ndarray, classes: list[str], path: str | Path, title: str = "confusion (test)"
) -> Path:
    """Row-normalised confusion matrix with counts written in the cells."""
    rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 * len(classes) + 2.5, 1.0 * len(classes) + 1.5))
    ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j, i, str(cm[i, j]), ha="center", va="center", color="white" if rates[i, j] > 0.5 else "black"
            )
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model.eval()`` inside, the model's own mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
