"""The report's words: the answer in one sentence, the plain-words notes, provenance, the parent run's note.

``headline(records)`` leads the page and the parent run's description: capsules vs CNN on novel views at
matched familiar-view error (else on the test set), accuracy under the first attack at its smallest ε, and
with several seeds the mean ± 95% interval and whether the difference beats the seed-to-seed spread.
``study_notes`` explains data, protocol, ε units, masking flags and tuning; ``provenance`` says where each
number came from; ``parent_note`` is the parent run's description with the link to the report.
"""

from __future__ import annotations

import json
from pathlib import Path

from harness import tracking
from harness.attack.settings import EPS_UNITS
from harness.intervals import Estimate, estimate
from harness.progress import duration
from harness.report.records import RECORDED_STAGES, StudyRecords
from harness.report.tables import as_number, percent

DATA_NAMES = {
    "smallnorb": "the real smallNORB (NYU), 5 categories, test instances unseen in training",
    "synthnorb": "synthnorb, our procedural stand-in for smallNORB (toy objects, same viewpoints and "
    "file format), so the numbers are not comparable to the paper's",
    "fashion_mnist": "Fashion-MNIST (photos of clothing, 28×28 grey, 10 classes); the paper did not "
    "use it, so there is no reference row",
    "mnist": "MNIST (handwritten digits, 28×28 grey, 10 classes)",
}


# ---------------------------------------------------------------------------------------------
# the answer in one sentence
# ---------------------------------------------------------------------------------------------


def over_seeds(records: StudyRecords, model: str, value) -> Estimate:
    """``value(run record)`` over a model's final runs (one per seed): mean ± 95% interval."""
    return estimate(as_number(value(r)) for r in records.replicates.get(model, []))


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
    view = records.view
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
        kept = [over_seeds(records, m, lambda r: r.worst_attack(attack, eps)) for m in (c, n)]
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
# notes
# ---------------------------------------------------------------------------------------------


def study_notes(records: StudyRecords) -> list[str]:
    """Plain-words notes: data, protocol, ε units, masking flags, tuning budget, stage wall times."""
    out = []
    data, view = records.data_param("data.name"), records.view
    if data:
        what = DATA_NAMES.get(data.lower(), data)
        split = f"; novel-viewpoint split by **{view}** (paper §5.1)" if view else ""
        out.append(f"Data: {what}{split}.")
    if records.matched:
        mt = records.matched
        target = mt.get("target_familiar_error")
        line = f"Matched protocol: {str(mt.get('rule', 'rule not recorded')).rstrip('.')}."
        if target is not None:
            ref = mt.get("reference_model", "?")
            line += f" Familiar-view target {percent(target)} (reference model `{ref}`)."
        out.append(line)
        for model, m in mt.get("models", {}).items():
            if not m.get("reached", True):
                epoch = m.get("matched_epoch")
                out.append(f"`{model}` never reached the familiar-view target; its row shows epoch {epoch}.")
    elif view:
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
    pmetrics = records.parent_metrics
    times = [(s, pmetrics[f"stage/{s}_seconds"]) for s in RECORDED_STAGES if f"stage/{s}_seconds" in pmetrics]
    if times:
        out.append("Stage wall times: " + ", ".join(f"{s} {duration(float(t))}" for s, t in times) + ".")
    return out


def tuning_notes(records: StudyRecords) -> list[str]:
    """Per model: trials by state, best value, what was searched; then the budget and the search space."""
    if records.trials.empty:
        return ["Tuning: no Optuna trials recorded."]
    out = []
    params = [c for c in records.trials.columns if c.startswith("params_")]
    for model, group in records.trials.groupby("model"):
        counts = group["state"].value_counts()
        tuned = [c[len("params_") :] for c in params if group[c].notna().any()]
        done = group[group["state"] == "COMPLETE"]["value"].dropna()
        best = f", best familiar-view val error {percent(done.min())}" if len(done) else ""
        states = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
        out.append(
            f"Tuning `{model}`: {len(group)} trials ({states}){best}; searched {', '.join(tuned) or '—'}."
        )
    p = records.parent_params
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
# provenance and the parent run's description
# ---------------------------------------------------------------------------------------------


def provenance(records: StudyRecords) -> list[str]:
    """Where each number came from: store, runs, code version, device; how to rerun and browse."""
    parent = records.parent
    out = [
        f"Study `{records.name}`, MLflow store `{tracking.tracking_uri()}`"
        + (f", parent run `{parent.run_id}`." if parent else "."),
        f"Rerun: `make study NAME={records.name}` (skips finished stages); "
        f"regenerate this page: `python -m harness.report {records.name}`.",
    ]
    if parent and parent.experiment_id:
        out.append(f"Browse the runs: `make ui`, then open {tracking.ui_url(parent.experiment_id)}")
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


def parent_note(records: StudyRecords, html_path: Path) -> str:
    """The parent run's description (``mlflow.note.content``, markdown): the answer, where the report is."""
    parent = records.parent  # the report is logged only to a study that has one
    run = f"#/experiments/{parent.experiment_id}/runs/{parent.run_id}"
    link = f"{run}/artifacts/report/report.html"  # relative: works on whichever host serves the UI
    lines = [
        headline(records),
        "",
        f"Report: [report/report.html]({link}) (artifact of this run; on disk `{html_path}`; "
        f"regenerate with `python -m harness.report {records.name}`).",
    ]
    description = records.parent_params.get("description")
    if description:
        lines += ["", f"Study: {description}"]
    return "\n".join(lines)
