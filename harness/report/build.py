"""Write a study's report: draw its figures, lay out its page, write ``report.{md,html}`` + PNGs and log
them to the study's parent run with the summary metrics and the answer as the run's description.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from harness import tracking
from harness.data import familiar_mask
from harness.paths import PROJECT_ROOT
from harness.report import figures as figs
from harness.report.fanova import importances
from harness.report.notes import parent_note
from harness.report.page import build_blocks
from harness.report.records import StudyRecords, collect
from harness.report.render import render_html, render_markdown
from harness.report.tables import comparison_table, side_by_side, summary_metrics
from harness.viewpoint import azimuth_degrees, elevation_degrees


def write_report(name: str, *, out_dir: str | Path | None = None, log: bool = True) -> Path:
    """Write ``reports/NAME/report.{md,html}`` + PNGs; with ``log``, also log them to the parent run with the
    summary metrics, the description and the experiment's runs view. Returns the HTML path."""
    records = collect(name)
    out = Path(out_dir) if out_dir else reports_root() / name
    out.mkdir(parents=True, exist_ok=True)
    log = log and records.parent is not None
    table = comparison_table(records)
    if log:  # first, so that the page's link to the runs names the view
        summary = summary_metrics(table) if not table.empty else {}
        tracking.share_runs_view(records.parent.experiment_id, side_by_side(summary))
    figures, skipped = make_figures(records, out)
    blocks = build_blocks(records, table, figures, skipped)
    (out / "report.md").write_text(render_markdown(blocks))
    path = out / "report.html"
    path.write_text(render_html(blocks, out))
    if log:
        with tempfile.TemporaryDirectory(prefix="capsbench-report-") as tmp:
            for file in ["report.md", "report.html", *(f for f, _ in figures)]:
                shutil.copy2(out / file, tmp)  # only what this report wrote, not the rest of out_dir
            tracking.log_artifacts(records.parent.run_id, tmp, "report")
        parent = tracking.TrackedRun(records.parent.run_id, system_metrics=False)
        parent.log_metrics(summary)
        parent.set_tags({"mlflow.note.content": parent_note(records, path)})
    return path


def reports_root() -> Path:
    """``$CAPSBENCH_REPORTS`` if set, else ``<project root>/reports``."""
    return Path(os.environ.get("CAPSBENCH_REPORTS") or PROJECT_ROOT / "reports")


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------


WHY_EMPTY = {
    "training_curves.png": "no final run has per-epoch errors yet (stage `train`)",
    "accuracy_vs_eps.png": "no attack results yet (stage `attack`)",
    "targeted_success_vs_eps.png": "no targeted attack results (`attack.targeted` is off, or no attacks yet)",
    "viewpoint_heatmaps.png": "no per-viewpoint cells (no view split, or stage `viewpoint` has not run)",
    "optuna_history.png": "no finished Optuna trials (stage `tune`)",
    "optuna_importances.png": "no importances",
}


def make_figures(records: StudyRecords, out_dir: Path) -> tuple[list[tuple[str, str]], list[str]]:
    """Save every figure that can be made; (file name, caption) pairs and notes on those that could not."""
    fams = records.families
    has_view = any("test_novel_error" in m.history for m in records.models)  # as training_curves decides
    imp: dict = {}
    imp_notes: list[str] = []
    if not records.trials.empty:
        try:
            imp, imp_notes = importances(records.trials)
        except Exception as e:  # noqa: BLE001 - e.g. a trials table without the expected columns
            imp_notes = [f"importances could not be computed ({type(e).__name__}: {e})"]
    plan = [
        (
            "training_curves.png",
            (
                "Training curves: familiar (solid) and novel (dashed) test error per epoch"
                if has_view
                else "Training curves: test (solid) and validation (dotted) error per epoch"
            )
            + (f", seed {records.models[0].seed} (the first seed)." if records.n_seeds > 1 else "."),
            lambda: figs.training_curves(
                {m.model: m.history for m in records.models}, fams, matched_epochs(records)
            ),
        ),
        (
            "accuracy_vs_eps.png",
            "Accuracy under attack vs ε, capsules vs CNN, from the clean accuracy at ε = 0 "
            "(solid = worst case over losses)" + (", mean over seeds." if records.n_seeds > 1 else "."),
            lambda: figs.attack_curves(records.attacks, fams, kind="acc"),
        ),
        (
            "targeted_success_vs_eps.png",
            "Targeted attack success rate vs ε.",
            lambda: figs.attack_curves(records.attacks, fams, kind="targeted_success"),
        ),
        (
            "viewpoint_heatmaps.png",
            "Test error per (azimuth, elevation) cell, per model"
            + (", first seed." if records.n_seeds > 1 else "."),
            lambda: figs.viewpoint_heatmaps(heatmap_grids(records)),
        ),
        (
            "optuna_history.png",
            "Optuna optimisation history per model's study.",
            lambda: figs.optimisation_history(records.trials, fams),
        ),
        (
            "optuna_importances.png",
            "Hyperparameter importances (fANOVA over the complete trials).",
            lambda: figs.param_importances(imp, fams),
        ),
    ]
    for filename, _, _ in plan:
        (out_dir / filename).unlink(missing_ok=True)  # no stale figure from an earlier report
    made, skipped = [], list(imp_notes)
    if imp_notes and not imp:
        plan = [p for p in plan if p[0] != "optuna_importances.png"]  # the notes already say why
    for filename, caption, draw in plan:
        try:
            fig = draw()
        except Exception as e:  # noqa: BLE001 - a figure must never sink the report
            skipped.append(f"{filename} could not be made ({type(e).__name__}: {e})")
            continue
        if fig is None:
            skipped.append(f"{filename}: {WHY_EMPTY[filename]}")
            continue
        figs.save(fig, out_dir / filename)
        made.append((filename, caption))
    return made, skipped


def matched_epochs(records: StudyRecords) -> dict[str, int]:
    """{model: epoch the matched protocol picked} (empty without a recorded protocol)."""
    models = (records.matched or {}).get("models", {})
    return {m: int(v["matched_epoch"]) for m, v in models.items() if v.get("matched_epoch") is not None}


def heatmap_grids(records: StudyRecords) -> dict[str, dict]:
    """Per model, the azimuth × elevation error grid at the matched epoch (else cells.csv's last epoch)."""
    cells = records.cells
    if cells is None or cells.empty:
        return {}
    matched = (records.matched or {}).get("models", {})
    view = (records.matched or {}).get("view") or records.view
    elevations = sorted(cells["elevation"].unique())
    azimuths = sorted(cells["azimuth"].unique())
    grids = {}
    order = {m.model: i for i, m in enumerate(records.models)}  # capsules first, as in the tables
    for model, group in sorted(cells.groupby("model"), key=lambda kv: (order.get(kv[0], len(order)), kv[0])):
        epoch = matched.get(model, {}).get("matched_epoch")
        if epoch is None or epoch not in set(group["epoch"]):
            epoch = group["epoch"].max()
        g = group[group["epoch"] == epoch].groupby(["elevation", "azimuth"])[["errors", "n"]].sum()
        table = (g["errors"] / g["n"]).unstack("azimuth")  # elevations × azimuths
        table = table.reindex(index=elevations, columns=azimuths)
        grids[f"{model} (epoch {int(epoch)})"] = {
            "error": table.to_numpy(dtype=float),
            "elevations": [elevation_degrees(e) for e in elevations],
            "azimuths": [azimuth_degrees(a) for a in azimuths],
            "familiar": _familiar_grid(view, elevations, azimuths),
        }
    return grids


def _familiar_grid(view: str, elevations: list[int], azimuths: list[int]) -> np.ndarray | None:
    if view not in ("azimuth", "elevation"):
        return None
    el, az = np.meshgrid(elevations, azimuths, indexing="ij")  # elevations × azimuths
    meta = pd.DataFrame({"elevation": el.ravel(), "azimuth": az.ravel()})
    return np.asarray(familiar_mask(meta, view)).reshape(el.shape)
