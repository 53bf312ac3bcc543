"""The answer of a study in one sentence, and the summary its parent run carries (harness/report.py uses it).

``headline(records)`` leads the report and the parent run's description: capsules vs CNN on novel views at
matched familiar-view error (else on the test set), accuracy under the first attack at its smallest ε, and
with several seeds the mean ± 95% interval and whether the difference beats the seed-to-seed spread.
``summary_metrics(summary_table)`` are the parent run's comparison metrics (``caps/test_error``,
``cnn/novel_error_matched``, ``caps/fgsm_acc_eps_0.1``, ...), ``side_by_side`` orders them for the MLflow
runs table, and ``parent_note`` is the run's description with the link to the report.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from harness.intervals import Estimate, estimate
from harness.report_records import StudyRecords


def as_number(v) -> float | None:
    """``float(v)``, or None for what is not a number (None, text)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# the answer in one sentence
# ---------------------------------------------------------------------------------------------


def over_seeds(records: StudyRecords, model: str, value) -> Estimate:
    """``value(run record)`` over a model's final runs (one per seed): mean ± 95% interval."""
    return estimate(as_number(value(r)) for r in records.replicates.get(model, []))


def worst_attack_value(record, attack: str, eps: float, kind: str = "acc") -> float | None:
    a = record.attacks
    sel = a[
        (a["attack"] == attack) & (a["loss"] == "worst") & (a["kind"] == kind) & np.isclose(a["eps"], eps)
    ]
    return float(sel["value"].iloc[0]) if len(sel) else None


def headline(records: StudyRecords) -> str:
    """One sentence that answers the study's question with its numbers (and their spread over seeds)."""
    caps = next((m for m in records.models if m.family == "capsule"), None)
    cnn = next((m for m in records.models if m.family == "cnn"), None)
    if caps is None or cnn is None:
        have = ", ".join(f"`{m.model}`" for m in records.models)
        return (
            f"No capsule-vs-CNN comparison yet: final runs exist for {have}."
            if have
            else "No final runs yet, so no comparison: see Missing below."
        )
    c, n = caps.model, cnn.model
    view = records.data_param("data.view")
    novel = [
        over_seeds(records, m, lambda r: records.matched_for(r).get("matched_novel_error")) for m in (c, n)
    ]
    if view in ("azimuth", "elevation") and all(e.n for e in novel):
        matches = list((records.seeds or {}).get("matches", {}).values()) or [records.matched or {}]
        target = estimate(as_number(mt.get("target_familiar_error")) for mt in matches)
        text = (
            f"On novel {view}s capsules (`{c}`) make {novel[0]:pct} errors vs the CNN's (`{n}`) "
            f"{novel[1]:pct} at matched familiar-view error {target:pct}"
        )
    else:
        test = [over_seeds(records, m, lambda r: r.metrics.get("final_test_error")) for m in (c, n)]
        text = (
            f"On the test set capsules (`{c}`) make {test[0]:pct} errors vs the CNN's (`{n}`) {test[1]:pct}"
        )
    acc = records.attacks
    acc = acc[(acc["kind"] == "acc") & (acc["eps"] > 0)]
    if not acc.empty:
        attack = "fgsm" if (acc["attack"] == "fgsm").any() else str(acc["attack"].iloc[0])
        eps = float(acc.loc[acc["attack"] == attack, "eps"].min())
        kept = [over_seeds(records, m, lambda r: worst_attack_value(r, attack, eps)) for m in (c, n)]
        if all(e.n for e in kept):
            text += (
                f"; under {attack.upper()} at ε = {eps:g} they keep {kept[0]:pct} accuracy vs {kept[1]:pct}"
            )
    k = records.n_seeds
    if k > 1:
        verdict = (records.seeds or {}).get("verdict")
        text += f" (mean ± 95% interval over {k} training seeds)" + (f"; {verdict}" if verdict else "")
    else:
        text += " (one training seed, so no interval: list `seeds = [0, 1, 2]` in the study file for one)"
    return text + "."


# ---------------------------------------------------------------------------------------------
# the parent run's summary (what the MLflow runs table shows next to the final runs)
# ---------------------------------------------------------------------------------------------

SUMMARY_METRICS = {
    "test error": "test_error",
    "familiar error (matched)": "familiar_error_matched",
    "novel error (matched)": "novel_error_matched",
    "clean accuracy": "clean_accuracy",
}


def summary_metrics(table: pd.DataFrame) -> dict[str, float]:
    """Per model ``<prefix>/<metric>`` (prefix ``caps``/``cnn`` when a family has one model, else the model
    name): errors, accuracies under attack (worst case), and ``_ci95`` half-widths with several seeds."""
    rows = table[~table["model"].astype(str).str.startswith("paper:")]
    per_family = rows["family"].value_counts()
    halves = table.attrs.get("ci95")
    out: dict[str, float] = {}
    for i, row in rows.iterrows():
        family = row["family"]
        prefix = (
            {"capsule": "caps", "cnn": "cnn"}.get(family, family) if per_family[family] == 1 else row["model"]
        )
        for col, value in row.items():
            m = re.match(r"^([A-Z]+) (accuracy|targeted success) ε=(.+)$", col)
            name = SUMMARY_METRICS.get(col) or (
                f"{m[1].lower()}_{'acc' if m[2] == 'accuracy' else 'targeted_success'}_eps_{m[3]}"
                if m
                else None
            )
            if name is None or as_number(value) is None or math.isnan(float(value)):
                continue
            out[f"{prefix}/{name}"] = float(value)
            half = halves.at[i, col] if halves is not None and col in halves else math.nan
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


def parent_note(records: StudyRecords, html_path: Path) -> str:
    """The parent run's description (``mlflow.note.content``, markdown): the answer, where the report is."""
    parent = records.parent or {}
    run = f"#/experiments/{parent.get('experiment_id', '')}/runs/{parent.get('run_id', '')}"
    link = f"{run}/artifacts/report/report.html"  # relative: works on whichever host serves the UI
    lines = [
        headline(records),
        "",
        f"Report: [report/report.html]({link}) (artifact of this run; on disk `{html_path}`; "
        f"regenerate with `python -m harness.report {records.name}`).",
    ]
    description = parent.get("params", {}).get("description")
    if description:
        lines += ["", f"Study: {description}"]
    return "\n".join(lines)
