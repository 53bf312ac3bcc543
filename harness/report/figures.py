"""Figures for the comparison report (`python -m harness.report NAME`).

Every function takes plain records (pandas frames, dicts, numpy arrays) and returns a matplotlib
Figure, or None when there is nothing to draw; harness/report/build.py saves them as PNGs (``save``)
and the HTML page embeds them. Capsule models are drawn in blues and CNNs in oranges throughout, so
families read the same in every figure.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display

import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

FAMILY_COLORS = {
    "capsule": ["#1f77b4", "#17becf", "#393b79", "#6baed6"],
    "cnn": ["#ff7f0e", "#d62728", "#8c564b", "#fdae6b"],
}
OTHER_COLORS = ["#2ca02c", "#9467bd", "#7f7f7f", "#bcbd22"]
FAMILY_MARKERS = {"capsule": "o", "cnn": "s"}
ATTACK_ORDER = ("fgsm", "bim", "pgd")  # panels left to right


def save(fig: plt.Figure, path) -> None:
    """Write ``fig`` as a PNG and free it."""
    fig.savefig(path, dpi=90)
    plt.close(fig)


def model_colors(models: list[tuple[str, str]]) -> dict[str, str]:
    """{model label: colour} for (label, family) pairs; each family cycles through its own palette."""
    used: dict[str, int] = {}
    out = {}
    for label, family in models:
        palette = FAMILY_COLORS.get(family, OTHER_COLORS)
        i = used.get(family, 0)
        out[label] = palette[i % len(palette)]
        used[family] = i + 1
    return out


def training_curves(
    histories: dict[str, pd.DataFrame], families: dict[str, str], matched: dict[str, int] | None = None
) -> plt.Figure | None:
    """Error per epoch: familiar (solid) and novel (dashed) test error of every model on one plot.

    ``histories[label]`` is indexed by epoch with metric columns. Without a view split the curves are
    test error (solid) and validation error (dotted). ``matched[label]`` is the epoch the matched
    protocol picked, starred on both curves.
    """
    curves = {k: h for k, h in histories.items() if h is not None and not h.empty}
    if not curves:
        return None
    colors = model_colors([(k, families.get(k, "")) for k in curves])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    has_view = any("test_novel_error" in h for h in curves.values())
    styles = (
        [("test_familiar_error", "-", "familiar"), ("test_novel_error", "--", "novel")]
        if has_view
        else [("test_error", "-", "test"), ("val_error", ":", "val")]
    )
    starred = False
    for label, h in curves.items():
        for column, style, what in styles:
            if column in h and h[column].notna().any():
                s = 100 * h[column].dropna()
                ax.plot(s.index, s.values, style, color=colors[label], marker=".", label=f"{label} {what}")
                epoch = (matched or {}).get(label)
                if epoch in s.index:
                    ax.plot(
                        [epoch], [s[epoch]], "*", color=colors[label], markersize=13, mec="black", mew=0.6
                    )
                    starred = True
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("error (%)")
    title = "Familiar vs novel viewpoints" if has_view else "Test and validation error"
    ax.set_title(title + (" (★ = matched checkpoint)" if starred else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def attack_curves(attacks: pd.DataFrame, families: dict[str, str], *, kind: str) -> plt.Figure | None:
    """One panel per attack: accuracy (kind="acc") or targeted success (kind="targeted_success") vs ε.

    ``attacks`` is the long table with columns model, attack, loss, kind, eps, value; the worst case
    over losses is drawn solid (loss == "worst") and single losses thin and dotted.
    """
    if attacks is None or attacks.empty:
        return None
    rows = attacks[attacks["kind"] == kind]
    if rows.empty:
        return None
    names = sorted(rows["attack"].unique(), key=lambda a: ATTACK_ORDER.index(a) if a in ATTACK_ORDER else 9)
    labels = list(dict.fromkeys(rows["model"]))
    colors = model_colors([(m, families.get(m, "")) for m in labels])
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], names):
        for label in labels:
            sel = rows[(rows["attack"] == name) & (rows["model"] == label)]
            for loss, group in sel.groupby("loss"):
                g = group.sort_values("eps")
                main = loss == "worst" or sel["loss"].nunique() == 1
                ax.plot(
                    g["eps"],
                    g["value"],
                    "-" if main else ":",
                    color=colors[label],
                    marker=FAMILY_MARKERS.get(families.get(label, ""), "^") if main else None,
                    linewidth=1.8 if main else 0.8,
                    label=label if main else "_nolegend_",
                )
        ax.set_title(name.upper() + (" targeted" if kind != "acc" else ""))
        ax.set_xlabel("ε ([0,1] pixel units of the model input)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy" if kind == "acc" else "targeted success rate")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def viewpoint_heatmaps(grids: dict[str, dict]) -> plt.Figure | None:
    """Azimuth × elevation error heatmaps, one panel per model, on one shared colour scale.

    ``grids[label]`` = {"error": array elevations×azimuths (NaN = no test image), "azimuths": degrees,
    "elevations": degrees, "familiar": optional bool array of the same shape (outlined cells)}.
    """
    grids = {k: g for k, g in grids.items() if g is not None}
    if not grids:
        return None
    vmax = max(float(np.nanmax(g["error"])) if np.isfinite(g["error"]).any() else 0.0 for g in grids.values())
    vmax = max(vmax * 100, 1.0)
    fig, axes = plt.subplots(
        len(grids), 1, figsize=(7.0, 2.2 * len(grids) + 0.6), squeeze=False, constrained_layout=True
    )
    image, outlined = None, False
    for ax, (label, g) in zip(axes[:, 0], grids.items()):
        err = 100 * np.asarray(g["error"], dtype=float)  # elevations × azimuths
        image = ax.imshow(err, cmap="viridis", vmin=0, vmax=vmax, aspect="auto", origin="lower")
        az, el = list(g["azimuths"]), list(g["elevations"])
        ax.set_xticks(range(len(az)), [f"{a:g}" for a in az], fontsize=6)
        ax.set_yticks(range(len(el)), [f"{e:g}" for e in el], fontsize=6)
        ax.set_ylabel("elevation (°)", fontsize=7)
        ax.set_title(label, fontsize=8)
        familiar = g.get("familiar")
        if familiar is not None:
            outlined = True
            for r, c in zip(*np.nonzero(np.asarray(familiar))):
                ax.add_patch(plt.Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, edgecolor="white", lw=0.8))
    note = "; white outline = familiar (training) viewpoints" if outlined else ""
    axes[-1, 0].set_xlabel(f"azimuth (°){note}", fontsize=7)
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="test error (%)", shrink=0.9)
    return fig


def optimisation_history(trials: pd.DataFrame, families: dict[str, str]) -> plt.Figure | None:
    """Objective per trial (dots; x = pruned) and best so far (line), one colour per model's Optuna study.

    ``trials`` has columns model, number, value, state (COMPLETE/PRUNED/FAIL/...).
    """
    if trials is None or trials.empty or trials["value"].notna().sum() == 0:
        return None
    labels = list(dict.fromkeys(trials["model"]))
    colors = model_colors([(m, families.get(m, "")) for m in labels])
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for model in labels:
        g = trials[trials["model"] == model].sort_values("number")
        done = g[(g["state"] == "COMPLETE") & g["value"].notna()]
        pruned = g[(g["state"] == "PRUNED") & g["value"].notna()]
        ax.scatter(done["number"], 100 * done["value"], color=colors[model], s=18)
        if not pruned.empty:
            ax.scatter(
                pruned["number"], 100 * pruned["value"], color=colors[model], s=22, marker="x", alpha=0.7
            )
        if not done.empty:
            best = done.set_index("number")["value"].cummin()
            ax.step(
                best.index, 100 * best.values, where="post", color=colors[model], label=f"{model} best so far"
            )
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel("familiar-view val error (%)")
    ax.set_title("Optuna optimisation history (dots = trials, x = pruned)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def param_importances(
    importances: dict[str, dict[str, float]], families: dict[str, str]
) -> plt.Figure | None:
    """Horizontal bars of hyperparameter importance, one panel per model's Optuna study."""
    importances = {k: v for k, v in importances.items() if v}
    if not importances:
        return None
    n = len(importances)
    height = max(2.4, 0.35 * max(len(v) for v in importances.values()) + 1.0)
    fig, axes = plt.subplots(1, n, figsize=(4.4 * n, height), squeeze=False)
    colors = model_colors([(m, families.get(m, "")) for m in importances])
    for ax, (model, values) in zip(axes[0], importances.items()):
        items = sorted(values.items(), key=lambda kv: kv[1])
        ax.barh([k for k, _ in items], [v for _, v in items], color=colors[model])
        ax.set_xlabel("importance (fANOVA)")
        ax.set_title(f"{model}: hyperparameter importance", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    return fig
