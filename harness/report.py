"""The comparison report of a study: capsules vs CNNs side by side, rendered from MLflow records.

    python -m harness.report demo                  # writes reports/demo/report.{md,html} + PNGs
    python -m harness.report smallnorb_azimuth --out /tmp/r --no-log

Reads the study's runs (parent run, Optuna trial runs, final runs with their attack metrics; see
docs/contracts.md "Tracking" and "Study records") through harness/tracking.py, and writes
``reports/NAME/report.md``, a self-contained ``reports/NAME/report.html`` (figures embedded as data
URIs) and the PNGs, then logs them to the study's parent run under ``report/``, with the summary as
parent-run metrics (``caps/test_error``, ``cnn/novel_error_matched``, ``caps/fgsm_acc_eps_0.1``, ...) and
the answer in one sentence as the run's description. The page leads with that sentence, then the error
table and the accuracy-under-attack table (mean ± 95% interval when the study has several seeds). A
study with a missing stage still gets a report that shows what exists and names what is missing. The
study calls ``write_report(name)`` as its last stage. Set ``MLFLOW_TRACKING_URI`` to read another store.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from harness import report_figures as figs
from harness import tracking
from harness.adversarial import EPS_UNITS
from harness.errors import cli_errors
from harness.intervals import estimate
from harness.paths import PROJECT_ROOT
from harness.report_records import RECORDED_STAGES, ReportError, StudyRecords, collect, parse_attack_metrics  # noqa: F401
from harness.report_summary import as_number, headline, parent_note, side_by_side, summary_metrics
from harness.viewpoint import azimuth_degrees, elevation_degrees

ATTACKS = ["fgsm", "bim", "pgd"]
SUMMARY_ATTACKS = ["fgsm", "bim"]  # the paper's attacks; PGD is in the figures

# The paper's headline numbers (Hinton, Sabour & Frosst 2018: smallNORB test error and parameter counts from
# its Table 1, matched novel-viewpoint errors from §5.1, FGSM accuracy read off its Fig. 3); fractions.
PAPER = {
    "cnn": {
        "label": "paper: CNN baseline",
        "n_params": 4.2e6,
        "test_error": 0.052,
        "azimuth": (0.037, 0.200),
        "elevation": (0.043, 0.178),
        "fgsm_acc": {0.1: 0.58, 0.2: 0.16, 0.5: 0.03},
    },
    "capsule": {
        "label": "paper: EM capsules (A=B=C=D=32)",
        "n_params": 310e3,
        "test_error": 0.018,
        "azimuth": (0.037, 0.135),
        "elevation": (0.043, 0.123),
        "fgsm_acc": {0.1: 0.86, 0.2: 0.83, 0.5: 0.69},
    },
    "capsule_small": {
        "label": "paper: EM capsules small (A=64,B=8,C=D=16)",
        "n_params": 68e3,
        "test_error": 0.022,
    },
}

TABLE_NOTE = (
    "Errors in %, one row per final model. Test error: the final epoch, on every test image (familiar and "
    "novel views together when the study has a view split); familiar and novel errors: at the matched "
    "epochs; train samples/s: the median over epochs."
)
SEEDS_NOTE = (
    "Each cell is the mean ± the half-width of the 95% Student-t interval over the `seeds` training seeds "
    "(one final run per model and seed; the matched protocol pairs the models trained with the same seed)."
)
PAPER_NOTE = (
    "Rows starting `paper:` are the paper's numbers (its Table 1, §5.1 and, for FGSM, read off its Fig. 3), "
    "for reference: the paper trained on all of smallNORB's training images with its own budget."
)
ATTACK_NOTE = (
    "Accuracy in % (higher is better; the table above shows errors). `clean`: no perturbation, on the "
    "attacked images. Attack cells: untargeted accuracy under attack, worst case over the attack losses"
)


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------


def attack_eps(records: StudyRecords, attack: str, kind: str = "acc") -> list[float]:
    """The non-zero ε at which any final run has ``attack`` results of ``kind`` (acc | targeted_success)."""
    a = records.attacks
    return sorted({e for e in a.loc[(a["attack"] == attack) & (a["kind"] == kind), "eps"] if e > 0})


def run_row(records: StudyRecords, m) -> dict:
    """The summary columns of one final run (fractions, not percent)."""
    view = records.data_param("data.view")
    h = m.history
    rate = h["samples_per_s"].dropna() if "samples_per_s" in h else pd.Series(dtype=float)
    row = {
        "model": m.model,
        "family": m.family,
        "params": as_number(m.metrics.get("n_params", m.params.get("n_params"))),
        "test error": m.metrics.get("final_test_error", _last(h, "test_error")),
    }
    if view and view != "none":
        mm = records.matched_for(m)
        primary = any(r is m for r in records.models)  # the parent metrics are of the first seed
        pmetrics = (records.parent or {}).get("metrics", {}) if primary else {}
        row["matched epoch"] = mm.get("matched_epoch", pmetrics.get(f"viewpoint/{m.model}/matched_epoch"))
        row["familiar error (matched)"] = mm.get(
            "matched_familiar_error", pmetrics.get(f"viewpoint/{m.model}/matched_familiar_error")
        )
        row["novel error (matched)"] = mm.get(
            "matched_novel_error", pmetrics.get(f"viewpoint/{m.model}/matched_novel_error")
        )
    if not records.attacks.empty:
        zero = m.attacks[(m.attacks["kind"] == "acc") & (m.attacks["eps"] == 0)]["value"]
        row["clean accuracy"] = m.metrics.get(
            "attack/clean_accuracy", float(zero.iloc[0]) if len(zero) else None
        )
    for attack in SUMMARY_ATTACKS:
        for kind, title in (("acc", "accuracy"), ("targeted_success", "targeted success")):
            for eps in attack_eps(records, attack, kind):
                sel = m.attacks[
                    (m.attacks["attack"] == attack)
                    & (m.attacks["loss"] == "worst")
                    & (m.attacks["kind"] == kind)
                    & np.isclose(m.attacks["eps"], eps)
                ]
                row[f"{attack.upper()} {title} ε={eps:g}"] = float(sel["value"].iloc[0]) if len(sel) else None
    row["train time"] = m.metrics.get("train_seconds")
    row["train samples/s"] = float(rate.median()) if len(rate) else None
    return row


def summary_table(records: StudyRecords) -> pd.DataFrame:
    """One row per model (fractions, not percent); reference rows from the paper where it applies.

    With several training seeds each cell is the mean over the model's seeds; ``table.attrs["ci95"]``
    holds the 95% t-interval half-widths (same rows and columns, NaN where there is one seed) and a
    ``seeds`` column the number of seeds.
    """
    view = records.data_param("data.view")
    rows, halves = [], []
    several = records.n_seeds > 1
    for m in records.models:
        per_seed = pd.DataFrame([run_row(records, r) for r in records.replicates.get(m.model, [m])])
        row, half = {"model": m.model, "family": m.family}, {}
        for col in per_seed.columns[2:]:
            values = pd.to_numeric(per_seed[col], errors="coerce")
            est = estimate(values)
            row[col], half[col] = (est.mean if est.n else None), est.half
        if several:
            row = {"model": row["model"], "family": row["family"], "seeds": len(per_seed), **row}
        rows.append(row)
        halves.append(half)
    if rows and records.data_param("data.name").lower() == "smallnorb":
        paper = paper_rows(list(rows[0]), view)
        rows += paper
        halves += [{} for _ in paper]
    table = pd.DataFrame(rows)
    table.attrs["ci95"] = pd.DataFrame(halves, columns=table.columns, index=table.index, dtype=float)
    return table


def paper_rows(columns: list[str], view: str) -> list[dict]:
    """The paper's numbers for the columns this table has (see ``PAPER``)."""
    rows = []
    full_data = not view or view == "none"
    for key in ("capsule", "capsule_small", "cnn") if full_data else ("capsule", "cnn"):
        ref, family = PAPER[key], key.split("_")[0]
        row: dict = {c: None for c in columns}
        row.update(model=ref["label"], family=family, params=ref["n_params"])
        if not view or view == "none":
            row["test error"] = ref["test_error"]
        elif view in ("azimuth", "elevation") and "novel error (matched)" in columns:
            row["familiar error (matched)"], row["novel error (matched)"] = ref[view]
        for eps, acc in ref.get("fgsm_acc", {}).items():
            if f"FGSM accuracy ε={eps:g}" in columns:
                row[f"FGSM accuracy ε={eps:g}"] = acc
        rows.append(row)
    return rows


ATTACK_COLUMN = re.compile(r"^(clean accuracy|[A-Z]+ (accuracy|targeted success) ε=.*)$")


def split_summary(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Display tables: (error columns, accuracy columns with "accuracy / targeted success" per ε) as text."""
    shown = format_table(table)
    attack_cols = [c for c in table.columns if ATTACK_COLUMN.match(c)]
    clean = shown[[c for c in table.columns if c not in attack_cols]]
    if not [c for c in attack_cols if c != "clean accuracy"]:
        return clean, None
    attacked = shown[["model"]].copy()
    if "clean accuracy" in shown:
        attacked["clean"] = shown["clean accuracy"]
    for col in [c for c in attack_cols if " accuracy ε=" in c]:
        attack, eps = col.split(" accuracy ε=")
        target = f"{attack} targeted success ε={eps}"
        cell = shown[col] + (" / " + shown[target] if target in shown else "")
        attacked[f"{attack} ε={eps}"] = cell.replace("– / –", "–")
    cells = attacked.drop(columns="model")
    empty_paper_row = table["model"].astype(str).str.startswith("paper:") & (cells == "–").all(axis=1)
    return clean, attacked[~empty_paper_row].reset_index(drop=True)


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """Strings for display: errors and rates as percentages (± the 95% half-width with several seeds),
    counts with K/M, times in seconds."""
    out = table.copy().astype(object)
    halves = table.attrs.get("ci95")
    for col in table.columns:
        for i, v in table[col].items():
            half = halves.at[i, col] if halves is not None and col in halves else math.nan
            out.at[i, col] = _fmt_cell(col, v, half)
    return out


def _fmt_cell(col: str, v, half: float = math.nan) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if col in ("model", "family"):
        return str(v)
    if col == "seeds":
        return f"{int(v)}"
    if col == "params":
        v = float(v)
        return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}K" if v >= 1e3 else f"{v:.0f}"
    if col == "matched epoch":  # a mean over seeds may fall between epochs
        return f"{float(v):.0f}" if float(v).is_integer() else f"{float(v):.1f}"
    if col == "train time":
        return _duration(v)
    if col == "train samples/s":
        return f"{float(v):.1f}"
    if half is not None and math.isfinite(half):
        return f"{100 * float(v):.1f} ± {100 * half:.1f}%"
    return f"{100 * float(v):.1f}%"


def _last(h: pd.DataFrame, col: str) -> float | None:
    if col not in h or h[col].dropna().empty:
        return None
    return float(h[col].dropna().iloc[-1])


# ---------------------------------------------------------------------------------------------
# figure inputs
# ---------------------------------------------------------------------------------------------


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
    view = (records.matched or {}).get("view") or records.data_param("data.view")
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
    try:
        from harness.data import familiar_mask
    except ImportError:  # the outline is a nicety; the heatmap stands without it
        return None

    el, az = np.meshgrid(elevations, azimuths, indexing="ij")  # elevations × azimuths
    meta = pd.DataFrame({"elevation": el.ravel(), "azimuth": az.ravel()})
    return np.asarray(familiar_mask(meta, view)).reshape(el.shape)


def importances(trials: pd.DataFrame) -> tuple[dict[str, dict[str, float]], list[str]]:
    """fANOVA hyperparameter importances per model, from the trials table (rebuilt as Optuna trials)."""
    import optuna

    out, notes = {}, []
    params = [c for c in trials.columns if c.startswith("params_")]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line per model
    try:
        for model, group in trials.groupby("model"):
            done = group[(group["state"] == "COMPLETE") & group["value"].notna()]
            cols = [c for c in params if done[c].notna().any() and done[c].nunique() > 1]
            if len(done) < 3:
                notes.append(f"`{model}`: {len(done)} complete trial(s), too few to estimate importances")
            elif not cols:
                notes.append(f"`{model}`: no hyperparameter varied across its complete trials")
            else:
                try:
                    out[model] = _fanova(done, cols)
                except Exception as e:  # noqa: BLE001 - a figure must never sink the report
                    notes.append(f"`{model}`: importances could not be computed ({type(e).__name__}: {e})")
    finally:
        optuna.logging.set_verbosity(verbosity)
    return out, notes


def _fanova(done: pd.DataFrame, cols: list[str]) -> dict[str, float]:
    """Rebuild the complete trials as an in-memory Optuna study and run its fANOVA evaluator."""
    import optuna

    names = {c: c[len("params_") :] for c in cols}
    dists = {names[c]: _distribution(done[c].dropna()) for c in cols}
    study = optuna.create_study(direction="minimize")
    for _, t in done.iterrows():
        values = {names[c]: _native(t[c]) for c in cols if pd.notna(t[c])}
        study.add_trial(
            optuna.trial.create_trial(
                params=values, distributions={k: dists[k] for k in values}, value=float(t["value"])
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks the evaluators experimental
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return optuna.importance.get_param_importances(study, evaluator=evaluator)


def _distribution(values: pd.Series):
    import optuna.distributions as d

    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return d.CategoricalDistribution(sorted({_native(v) for v in values}, key=str))
    if pd.api.types.is_integer_dtype(values):
        return d.IntDistribution(int(values.min()), int(values.max()))
    return d.FloatDistribution(float(values.min()), float(values.max()))


def _native(v):
    return v.item() if isinstance(v, np.generic) else v


# ---------------------------------------------------------------------------------------------
# notes
# ---------------------------------------------------------------------------------------------


def notes(records: StudyRecords) -> list[str]:
    """Plain-words notes: data, protocol, ε units, masking flags, tuning budget, what is missing."""
    out = []
    data, view = records.data_param("data.name"), records.data_param("data.view")
    if data:
        what = {
            "smallnorb": "the real smallNORB (NYU), 5 categories, test instances unseen in training",
            "synthnorb": "synthnorb, our procedural stand-in for smallNORB (toy objects, same viewpoints and "
            "file format), so the numbers are not comparable to the paper's",
            "fashion_mnist": "Fashion-MNIST (photos of clothing, 28×28 grey, 10 classes); the paper did not "
            "use it, so there is no reference row",
            "mnist": "MNIST (handwritten digits, 28×28 grey, 10 classes)",
        }.get(data.lower(), data)
        out.append(
            f"Data: {what}"
            + (f"; novel-viewpoint split by **{view}** (paper §5.1)." if view and view != "none" else ".")
        )
    if records.matched:
        mt = records.matched
        target = mt.get("target_familiar_error")
        line = f"Matched protocol: {str(mt.get('rule', 'rule not recorded')).rstrip('.')}."
        if target is not None:
            ref = mt.get("reference_model", "?")
            line += f" Familiar-view target {100 * float(target):.1f}% (reference model `{ref}`)."
        out.append(line)
        for model, m in mt.get("models", {}).items():
            if not m.get("reached", True):
                epoch = m.get("matched_epoch")
                out.append(f"`{model}` never reached the familiar-view target; its row shows epoch {epoch}.")
    elif view and view != "none":
        out.append(
            "Matched protocol: not recorded (stage `viewpoint` missing); familiar/novel columns are empty."
        )
    out.append(
        f"Attacks: ε is the {EPS_UNITS}. Accuracy under attack = correct on the clean and the attacked "
        "image, "
        "worst case over the attack losses (cross-entropy on logits and a CW-style margin loss); ε = 0 is "
        "the clean accuracy on the same images; targeted success is averaged over all target classes ≠ the "
        "true class."
    )
    flags = {m.model: m.tags.get("attack.masking_flags", None) for m in records.models}
    flagged = {k: v for k, v in flags.items() if v}
    if flagged:
        out += [
            f"**Gradient-masking flags on `{k}`** (treat its robustness numbers as upper bounds): {v}"
            for k, v in flagged.items()
        ]
    elif any(v is not None for v in flags.values()):
        out.append("Gradient-masking checks: no model flagged.")
    out += tuning_notes(records)
    pmetrics = (records.parent or {}).get("metrics", {})
    times = [(s, pmetrics[f"stage/{s}_seconds"]) for s in RECORDED_STAGES if f"stage/{s}_seconds" in pmetrics]
    if times:
        out.append("Stage wall times: " + ", ".join(f"{s} {_duration(t)}" for s, t in times) + ".")
    return out


def _duration(seconds: float) -> str:
    seconds = float(seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def tuning_notes(records: StudyRecords) -> list[str]:
    if records.trials.empty:
        return ["Tuning: no Optuna trials recorded."]
    out = []
    params = [c for c in records.trials.columns if c.startswith("params_")]
    for model, group in records.trials.groupby("model"):
        counts = group["state"].value_counts()
        tuned = [c[len("params_") :] for c in params if group[c].notna().any()]
        done = group[group["state"] == "COMPLETE"]["value"].dropna()
        best = f", best familiar-view val error {100 * done.min():.1f}%" if len(done) else ""
        states = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
        out.append(
            f"Tuning `{model}`: {len(group)} trials ({states}){best}; searched {', '.join(tuned) or '—'}."
        )
    p = (records.parent or {}).get("params", {})
    if "tune.n_trials" in p:
        epochs = (
            p.get("tune.epochs", "0") if p.get("tune.epochs", "0") != "0" else p.get("run.train.epochs", "?")
        )
        limit = (
            p.get("tune.limit_train", "0")
            if p.get("tune.limit_train", "0") != "0"
            else p.get("run.data.limit_train", "0")
        )
        images = "all" if limit == "0" else limit
        epochs = f"{epochs} epoch" + ("" if epochs == "1" else "s")
        out.append(
            f"Budget: {p['tune.n_trials']} trials per model (equal for both families), {epochs} "
            f"each on {images} training images; seeded TPE (seed {p.get('tune.seed', '?')}), median pruning "
            f"on per-epoch validation error; final models trained {p.get('run.train.epochs', '?')} epochs "
            "with the best parameters."
        )
    for family in ("capsule", "cnn"):
        space = {k.split(".", 2)[2]: v for k, v in p.items() if k.startswith(f"tune.{family}.")}
        if space:
            out.append(
                f"Search space ({family}): "
                + "; ".join(f"{k} ∈ {v}" for k, v in sorted(space.items()))
                + " (ranges are [low, high])."
            )
    return out


# ---------------------------------------------------------------------------------------------
# rendering: one list of blocks -> markdown and self-contained HTML
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
        fig.savefig(out_dir / filename, dpi=90)
        plt.close(fig)
        made.append((filename, caption))
    return made, skipped


def build_blocks(records: StudyRecords, figures: list[tuple[str, str]], skipped: list[str]) -> list[tuple]:
    """The page: the answer in one sentence, the tables, what is missing, notes, figures, provenance."""
    blocks: list[tuple] = [("h1", f"capsbench report: {records.name}"), ("p", f"**{headline(records)}**")]
    table = summary_table(records)
    blocks.append(("h2", "Summary: errors"))
    if table.empty:
        blocks.append(("p", "No final runs yet, so no summary rows."))
    else:
        clean, attacked = split_summary(table)
        blocks.append(("table", clean))
        has_paper = table["model"].str.startswith("paper:").any()
        several = "seeds" in table.columns
        blocks.append(
            (
                "p",
                " ".join(
                    [TABLE_NOTE, *([SEEDS_NOTE] if several else []), *([PAPER_NOTE] if has_paper else [])]
                ),
            )
        )
        if attacked is not None:
            blocks += [("h2", "Under attack: accuracy"), ("table", attacked)]
            targeted = any(" targeted success " in c for c in table.columns)
            what = (
                ", then / the targeted success rate (lower is better)"
                if targeted
                else " (no targeted attacks recorded)"
            )
            blocks.append(("p", f"{ATTACK_NOTE}{what}."))
    if records.missing:
        blocks += [("h2", "Missing"), ("ul", records.missing)]
    blocks += [("h2", "Notes"), ("ul", notes(records))]
    blocks.append(("h2", "Figures"))
    for filename, caption in figures:
        blocks.append(("figure", filename, caption))
    if skipped:
        blocks.append(("ul", [f"Not drawn: {s}" for s in skipped]))
    blocks += [("h2", "Provenance"), ("ul", provenance(records))]
    if records.study_toml:
        blocks.append(("code", "toml", "The resolved study file (study.toml)", records.study_toml))
    return blocks


# ---------------------------------------------------------------------------------------------
# provenance
# ---------------------------------------------------------------------------------------------


def provenance(records: StudyRecords) -> list[str]:
    """Where each number came from: store, runs, code version, device; how to rerun and browse."""
    parent = records.parent
    out = [
        f"Study `{records.name}`, MLflow store `{tracking.tracking_uri()}`"
        + (f", parent run `{parent['run_id']}`." if parent else "."),
        f"Rerun: `make study NAME={records.name}` (skips finished stages); "
        f"regenerate this page: `python -m harness.report {records.name}`.",
    ]
    if parent and parent.get("experiment_id"):
        out.append(f"Browse the runs: `make ui`, then open {tracking.ui_url(parent['experiment_id'])}")
    for m in (r for runs in records.replicates.values() for r in runs):
        commit = m.tags.get("git.commit", "unknown")[:10]
        dirty = " (uncommitted changes)" if m.tags.get("git.dirty") == "true" else ""
        versions = _json_field(m.tags.get("versions"), "torch")
        seed = f" seed {m.seed}" if m.seed and records.n_seeds > 1 else ""
        out.append(
            f"`{m.model}`{seed}: run `{m.run_id}` ({m.status.lower()}), commit `{commit}`{dirty}, "
            f"device {m.tags.get('device', 'unknown')}" + (f", torch {versions}" if versions else "")
        )
    return out


def _json_field(text: str | None, key: str) -> str:
    try:
        return str(json.loads(text).get(key, "")) if text else ""
    except (ValueError, AttributeError):
        return ""


def render_markdown(blocks: list[tuple]) -> str:
    out = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            out.append(f"# {block[1]}\n")
        elif kind == "h2":
            out.append(f"## {block[1]}\n")
        elif kind == "p":
            out.append(f"{block[1]}\n")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in block[1]) + "\n")
        elif kind == "table":
            t = block[1]
            cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"  # noqa: E731
            out.append(
                "\n".join(
                    [
                        cells(t.columns),
                        "|" + "---|" * len(t.columns),
                        *(cells(r) for r in t.itertuples(index=False)),
                    ]
                )
                + "\n"
            )
        elif kind == "figure":
            out.append(f"![{block[2]}]({block[1]})\n\n*{block[2]}*\n")
        elif kind == "code":
            out.append(f"{block[2]}:\n\n```{block[1]}\n{block[3].rstrip()}\n```\n")
    return "\n".join(out)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px;display:block;overflow-x:auto}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f4f4f4}
td:first-child,td:nth-child(2){text-align:left}figure{margin:1.5em 0}img{max-width:100%}
figcaption{font-size:13px;color:#555}code{background:#f4f4f4;padding:0 3px}"""


def render_html(blocks: list[tuple], image_dir: Path) -> str:
    """Self-contained HTML: every figure embedded as a base64 data URI."""
    title = next((b[1] for b in blocks if b[0] == "h1"), "capsbench report")
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{_inline(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{_inline(block[1])}</p>")
        elif kind == "ul":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            body.append(block[1].to_html(index=False, border=0, escape=True))
        elif kind == "figure":
            data = base64.b64encode((image_dir / block[1]).read_bytes()).decode("ascii")
            img = f'<img alt="{html.escape(block[2])}" src="data:image/png;base64,{data}">'
            body.append(f"<figure>{img}<figcaption>{_inline(block[2])}</figcaption></figure>")
        elif kind == "code":
            summary = f"<summary>{_inline(block[2])}</summary>"
            body.append(f"<details>{summary}<pre><code>{html.escape(block[3])}</code></pre></details>")
    head = f'<meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style>'
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head>{head}</head>\n<body>\n'
        + "\n".join(body)
        + "\n</body></html>\n"
    )


def _inline(text: str) -> str:
    """Escape, then render markdown's **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------


def write_report(name: str, *, out_dir: str | Path | None = None, log: bool = True) -> Path:
    """Write ``reports/NAME/report.{md,html}`` + PNGs; with ``log``, also log them to the parent run with the
    summary metrics, the description and the experiment's runs view. Returns the HTML path."""
    records = collect(name)
    out = Path(out_dir) if out_dir else reports_root() / name
    out.mkdir(parents=True, exist_ok=True)
    log = log and records.parent is not None
    if log:  # first, so that the page's link to the runs names the view
        table = summary_table(records)
        summary = summary_metrics(table) if not table.empty else {}
        tracking.share_runs_view(records.parent["experiment_id"], side_by_side(summary))
    figures, skipped = make_figures(records, out)
    blocks = build_blocks(records, figures, skipped)
    (out / "report.md").write_text(render_markdown(blocks))
    path = out / "report.html"
    path.write_text(render_html(blocks, out))
    if log:
        with tempfile.TemporaryDirectory(prefix="capsbench-report-") as tmp:
            for file in ["report.md", "report.html", *(f for f, _ in figures)]:
                shutil.copy2(out / file, tmp)  # only what this report wrote, not the rest of out_dir
            tracking.log_artifacts(records.parent["run_id"], tmp, "report")
        parent = tracking.TrackedRun(records.parent["run_id"], system_metrics=False)
        parent.log_metrics(summary)
        parent.set_tags({"mlflow.note.content": parent_note(records, path)})
    return path


def reports_root() -> Path:
    """``$CAPSBENCH_REPORTS`` if set, else ``<project root>/reports``."""
    return Path(os.environ.get("CAPSBENCH_REPORTS") or PROJECT_ROOT / "reports")


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.report",
        description="Render a study's comparison report (capsules vs CNNs) from its MLflow records. "
        "Reads $MLFLOW_TRACKING_URI (default: the project's mlflow.db).",
        epilog="examples:\n"
        "  python -m harness.report demo                   # -> reports/demo/report.html\n"
        "  MLFLOW_TRACKING_URI=http://host:5000 python -m harness.report smallnorb_azimuth --out /tmp/r",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name", help="study name (the capsbench.study tag of its runs), e.g. demo or smallnorb_azimuth"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: $CAPSBENCH_REPORTS/NAME, else reports/NAME)"
    )
    parser.add_argument(
        "--no-log", action="store_true", help="do not log the report to the study's parent run"
    )
    args = parser.parse_args(argv)
    path = write_report(args.name, out_dir=args.out, log=not args.no_log)
    print(f"report: {path}")
    print(f"        {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
