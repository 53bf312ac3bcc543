"""The report's numbers: one comparison row per model, the paper's reference rows, their display strings,
and the summary metrics the study's parent run carries.

``comparison_table(records)`` holds fractions (errors, accuracies) with ``attrs["ci95"]`` half-widths over
seeds; ``split_comparison`` turns it into the two display tables (errors; accuracy under attack);
``summary_metrics`` names its cells for the parent run (``caps/test_error``, ``cnn/fgsm_acc_eps_0.1``, ...).
"""

from __future__ import annotations

import math
import re

import pandas as pd

from harness.intervals import estimate
from harness.progress import duration
from harness.report.records import ModelRecord, StudyRecords

SUMMARY_ATTACKS = ["fgsm", "bim"]  # the paper's attacks; PGD is in the figures
ATTACK_COLUMN = re.compile(r"^([A-Z]+) (accuracy|targeted success) ε=(.+)$")  # e.g. "FGSM accuracy ε=0.1"

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

# the parent-run metric name of each comparison column (attack columns are named by ATTACK_COLUMN)
SUMMARY_METRICS = {
    "test error": "test_error",
    "familiar error (matched)": "familiar_error_matched",
    "novel error (matched)": "novel_error_matched",
    "clean accuracy": "clean_accuracy",
}
_MATCHED_COLUMNS = {
    "matched epoch": "matched_epoch",
    "familiar error (matched)": "matched_familiar_error",
    "novel error (matched)": "matched_novel_error",
}


def as_number(v) -> float | None:
    """``float(v)``, or None for what is not a number (None, text)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def percent(v, half: float = math.nan) -> str:
    """A fraction as "14.1%", or "14.1 ± 1.2%" with a finite 95% half-width."""
    if half is not None and math.isfinite(half):
        return f"{100 * float(v):.1f} ± {100 * half:.1f}%"
    return f"{100 * float(v):.1f}%"


# ---------------------------------------------------------------------------------------------
# the comparison table (fractions)
# ---------------------------------------------------------------------------------------------


def attack_eps(records: StudyRecords, attack: str, kind: str = "acc") -> list[float]:
    """The non-zero ε at which any final run has ``attack`` results of ``kind`` (acc | targeted_success)."""
    a = records.attacks
    return sorted({e for e in a.loc[(a["attack"] == attack) & (a["kind"] == kind), "eps"] if e > 0})


def run_row(records: StudyRecords, m: ModelRecord) -> dict:
    """The comparison columns of one final run (fractions, not percent)."""
    h = m.history
    rate = h["samples_per_s"].dropna() if "samples_per_s" in h else pd.Series(dtype=float)
    row = {
        "model": m.model,
        "family": m.family,
        "params": as_number(m.metrics.get("n_params", m.params.get("n_params"))),
        "test error": m.metrics.get("final_test_error", _last(h, "test_error")),
    }
    if records.view:
        matched = records.matched_for(m)
        primary = any(r is m for r in records.models)  # the parent metrics are of the first seed
        pmetrics = records.parent_metrics if primary else {}
        for col, key in _MATCHED_COLUMNS.items():
            row[col] = matched.get(key, pmetrics.get(f"viewpoint/{m.model}/{key}"))
    if not records.attacks.empty:
        zero = m.attacks[(m.attacks["kind"] == "acc") & (m.attacks["eps"] == 0)]["value"]
        row["clean accuracy"] = m.metrics.get(
            "attack/clean_accuracy", float(zero.iloc[0]) if len(zero) else None
        )
    for attack in SUMMARY_ATTACKS:
        for kind, title in (("acc", "accuracy"), ("targeted_success", "targeted success")):
            for eps in attack_eps(records, attack, kind):
                row[f"{attack.upper()} {title} ε={eps:g}"] = m.worst_attack(attack, eps, kind)
    row["train time"] = m.metrics.get("train_seconds")
    row["train samples/s"] = float(rate.median()) if len(rate) else None
    return row


def comparison_table(records: StudyRecords) -> pd.DataFrame:
    """One row per model (fractions, not percent); reference rows from the paper where it applies.

    With several training seeds each cell is the mean over the model's seeds; ``table.attrs["ci95"]``
    holds the 95% t-interval half-widths (same rows and columns, NaN where there is one seed) and a
    ``seeds`` column the number of seeds.
    """
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
        paper = paper_rows(list(rows[0]), records.view)
        rows += paper
        halves += [{} for _ in paper]
    table = pd.DataFrame(rows)
    table.attrs["ci95"] = pd.DataFrame(halves, columns=table.columns, index=table.index, dtype=float)
    return table


def paper_rows(columns: list[str], view: str) -> list[dict]:
    """The paper's numbers for the columns this table has (see ``PAPER``); view "" or "none": full data."""
    rows = []
    full_data = not view or view == "none"
    for key in ("capsule", "capsule_small", "cnn") if full_data else ("capsule", "cnn"):
        ref, family = PAPER[key], key.split("_")[0]
        row: dict = {c: None for c in columns}
        row.update(model=ref["label"], family=family, params=ref["n_params"])
        if full_data:
            row["test error"] = ref["test_error"]
        elif view in ("azimuth", "elevation") and "novel error (matched)" in columns:
            row["familiar error (matched)"], row["novel error (matched)"] = ref[view]
        for eps, acc in ref.get("fgsm_acc", {}).items():
            if f"FGSM accuracy ε={eps:g}" in columns:
                row[f"FGSM accuracy ε={eps:g}"] = acc
        rows.append(row)
    return rows


def _last(h: pd.DataFrame, col: str) -> float | None:
    if col not in h or h[col].dropna().empty:
        return None
    return float(h[col].dropna().iloc[-1])


# ---------------------------------------------------------------------------------------------
# display: strings for the page
# ---------------------------------------------------------------------------------------------


def split_comparison(table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """Display tables: (error columns, accuracy columns with "accuracy / targeted success" per ε) as text."""
    shown = format_table(table)
    attack_cols = [c for c in table.columns if c == "clean accuracy" or ATTACK_COLUMN.match(c)]
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
    for col in table.columns:
        for i, v in table[col].items():
            out.at[i, col] = format_cell(col, v, _half(table, i, col))
    return out


def _half(table: pd.DataFrame, i, col: str) -> float:
    """The 95% half-width of one cell (``table.attrs["ci95"]``), NaN when there is none."""
    halves = table.attrs.get("ci95")
    return halves.at[i, col] if halves is not None and col in halves else math.nan


def format_cell(col: str, v, half: float = math.nan) -> str:
    """One comparison cell as the page shows it ("–" for a missing value)."""
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
        return duration(float(v))
    if col == "train samples/s":
        return f"{float(v):.1f}"
    return percent(v, half)


# ---------------------------------------------------------------------------------------------
# the parent run's summary (what the MLflow runs table shows next to the final runs)
# ---------------------------------------------------------------------------------------------


def summary_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Per model ``<prefix>/<metric>`` (prefix ``caps``/``cnn`` when a family has one model, else the model
    name): errors, accuracies under attack (worst case), and ``_ci95`` half-widths with several seeds."""
    rows = table[~table["model"].astype(str).str.startswith("paper:")]
    per_family = rows["family"].value_counts()
    out: dict[str, float] = {}
    for i, row in rows.iterrows():
        family = row["family"]
        prefix = (
            {"capsule": "caps", "cnn": "cnn"}.get(family, family) if per_family[family] == 1 else row["model"]
        )
        for col, value in row.items():
            m = ATTACK_COLUMN.match(col)
            name = SUMMARY_METRICS.get(col) or (
                f"{m[1].lower()}_{'acc' if m[2] == 'accuracy' else 'targeted_success'}_eps_{m[3]}"
                if m
                else None
            )
            if name is None or as_number(value) is None or math.isnan(float(value)):
                continue
            out[f"{prefix}/{name}"] = float(value)
            half = _half(table, i, col)
            if math.isfinite(half):
                out[f"{prefix}/{name}_ci95"] = float(half)
    return out


def side_by_side(summary: dict[str, float]) -> list[str]:
    """Summary metric names ordered for the runs table: each metric for every model in turn, novel-view
    error first (``caps/novel_error_matched``, ``cnn/novel_error_matched``, ``caps/test_error``, ...)."""
    keys = [k for k in summary if not k.endswith("_ci95")]
    names = list(dict.fromkeys(k.split("/", 1)[1] for k in keys))
    first = ["novel_error_matched", "familiar_error_matched", "test_error"]
    names.sort(key=lambda n: first.index(n) if n in first else len(first))
    return sorted(keys, key=lambda k: names.index(k.split("/", 1)[1]))
