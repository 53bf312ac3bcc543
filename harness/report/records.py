"""The records of a study, as the comparison report reads them from MLflow (through harness.tracking).

``collect(name) -> StudyRecords``: the study's parent run, its final runs (per-epoch histories and the
attack metrics logged into them; with several training seeds, one run per model and seed), the Optuna
trials, the matched novel-viewpoint protocol (per seed too) and the per-(azimuth, elevation) cells; see
docs/contracts.md "Tracking" and "Study records". Whatever a stage has not recorded yet is noted in
``StudyRecords.missing`` instead of failing.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from harness import tracking
from harness.errors import CapsbenchError
from harness.study.config import STAGES

RECORDED_STAGES = STAGES[:-1]  # the stages whose results the report reads: all but `report` itself
_ATTACK_METRIC = re.compile(
    r"^attack/(?P<attack>\w+)/(?P<loss>\w+)/(?P<kind>acc|targeted_success)_eps_(?P<eps>[0-9.eE+-]+)$"
)


class ReportError(CapsbenchError, RuntimeError):
    """A report that cannot be made at all (e.g. no runs for the study); one line, with the fix."""


# ---------------------------------------------------------------------------------------------
# records: what the report reads from MLflow
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelRecord:
    """One final run of a model: its run's values, per-epoch history and attack results."""

    model: str  # registry name
    family: str  # capsule | cnn
    run_id: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]
    history: pd.DataFrame  # index epoch, one column per metric
    attacks: pd.DataFrame  # long: model, attack, loss, kind, eps, value (eps 0 = clean accuracy)
    seed: str = ""  # the capsbench.seed tag ("" for runs from before seeds were recorded)

    def worst_attack(self, attack: str, eps: float, kind: str = "acc") -> float | None:
        """The worst case over attack losses of ``kind`` (acc | targeted_success) at ``eps``, if recorded."""
        a = self.attacks
        sel = a[
            (a["attack"] == attack) & (a["loss"] == "worst") & (a["kind"] == kind) & np.isclose(a["eps"], eps)
        ]
        return float(sel["value"].iloc[0]) if len(sel) else None


@dataclass
class StudyRecords:
    """Everything the report shows about one study (``collect(name)``)."""

    name: str
    parent: tracking.RunRecord | None  # the study run (capsbench.kind=study), None when missing
    models: list[ModelRecord]
    trials: pd.DataFrame  # model, number, value, state, params_* (Optuna's trials_dataframe)
    matched: dict | None  # viewpoint/matched.json
    cells: pd.DataFrame | None  # viewpoint/cells.csv
    study_toml: str | None
    missing: list[str] = field(default_factory=list)  # plain-words notes of what is not there
    families: dict[str, str] = field(default_factory=dict)  # model -> capsule | cnn, from every run's tags
    replicates: dict[str, list[ModelRecord]] = field(default_factory=dict)  # model -> its run per seed
    seeds: dict | None = None  # viewpoint/seeds.json: the matched protocol per seed and over seeds

    @property
    def n_seeds(self) -> int:
        return max((len(r) for r in self.replicates.values()), default=1)

    @property
    def view(self) -> str:
        """The final runs' novel-viewpoint split (azimuth | elevation), "" without one."""
        view = self.data_param("data.view")
        return "" if view == "none" else view

    @property
    def parent_params(self) -> dict[str, str]:
        return self.parent.params if self.parent else {}

    @property
    def parent_metrics(self) -> dict[str, float]:
        return self.parent.metrics if self.parent else {}

    @property
    def attacks(self) -> pd.DataFrame:
        """Every model's attack results, averaged over its seeds."""
        frames = [r.attacks for runs in self.replicates.values() for r in runs if not r.attacks.empty]
        if not frames:
            return _empty_attacks()
        table = pd.concat(frames, ignore_index=True)
        return table.groupby(["model", "attack", "loss", "kind", "eps"], as_index=False, sort=False)[
            "value"
        ].mean()

    def matched_for(self, record: ModelRecord) -> dict:
        """The matched-protocol entry of one final run: its seed's match, else the study's matched.json."""
        per_seed = (self.seeds or {}).get("matches", {}).get(record.seed)
        if per_seed is not None:
            return per_seed.get("models", {}).get(record.model, {})
        if any(m is record for m in self.models):
            return (self.matched or {}).get("models", {}).get(record.model, {})
        return {}

    def data_param(self, key: str) -> str:
        """A run param shared by the final runs (e.g. data.name), else the parent's, else ""."""
        for m in self.models:
            if m.params.get(key):
                return m.params[key]
        params = self.parent_params
        return params.get(key) or params.get(f"run.{key}", "")


def _empty_attacks() -> pd.DataFrame:
    return pd.DataFrame(columns=["model", "attack", "loss", "kind", "eps", "value"])


def _parent_rank(run: tracking.RunRecord) -> tuple:
    """Several parent runs share a study name when helper machines join its tuning (each keeps its own
    study folder) or a study was started afresh: report the one that got furthest, then the newest."""
    finals = sum(k.startswith("capsbench.final.") for k in run.tags)
    stages = sum(run.tags.get(f"capsbench.stage.{s}") == "done" for s in RECORDED_STAGES)  # not `report`
    return finals, stages, run.start_time


def parse_attack_metrics(model: str, metrics: dict[str, float]) -> pd.DataFrame:
    """``attack/{attack}/{loss}/{acc|targeted_success}_eps_{eps}`` metrics -> a long table.

    When the runs hold no ``worst`` entry for an (attack, kind), it is derived: the lowest
    accuracy / highest targeted success over the losses present. Accuracy curves start at the clean
    point: an (attack, loss) without an ε = 0 entry gets ``attack/clean_accuracy`` there.
    """
    rows = []
    for key, value in metrics.items():
        m = _ATTACK_METRIC.match(key)
        if m:
            rows.append(
                dict(
                    model=model,
                    attack=m["attack"],
                    loss=m["loss"],
                    kind=m["kind"],
                    eps=float(m["eps"]),
                    value=float(value),
                )
            )
    if not rows:
        return _empty_attacks()
    table = pd.DataFrame(rows)
    derived = []
    for (attack, kind), group in table.groupby(["attack", "kind"]):
        if (group["loss"] == "worst").any():
            continue
        pick = group.groupby("eps")["value"].min() if kind == "acc" else group.groupby("eps")["value"].max()
        derived += [
            dict(model=model, attack=attack, loss="worst", kind=kind, eps=e, value=v) for e, v in pick.items()
        ]
    if derived:
        table = pd.concat([table, pd.DataFrame(derived)], ignore_index=True)
    clean = metrics.get("attack/clean_accuracy")
    if clean is not None:
        acc = table[table["kind"] == "acc"]
        has_zero = set(map(tuple, acc.loc[acc["eps"] == 0, ["attack", "loss"]].to_numpy()))
        pairs = set(map(tuple, acc[["attack", "loss"]].to_numpy())) - has_zero
        rows = [
            dict(model=model, attack=a, loss=lo, kind="acc", eps=0.0, value=float(clean)) for a, lo in pairs
        ]
        if rows:
            table = pd.concat([table, pd.DataFrame(rows)], ignore_index=True)
    return table.sort_values(["attack", "loss", "kind", "eps"], ignore_index=True)


def collect(name: str) -> StudyRecords:
    """Everything the report needs about study ``name``, read from MLflow; missing parts noted."""
    runs = tracking.study_runs(name)  # newest first
    if not runs:
        raise ReportError(
            f"no MLflow runs tagged capsbench.study={name!r} in {tracking.tracking_uri()}; "
            f"run `make study NAME={name}` first, or point MLFLOW_TRACKING_URI at the store that holds it"
        )
    missing: list[str] = []
    parents = [r for r in runs if _kind(r) == "study"]
    parent = max(parents, key=_parent_rank) if parents else None
    if parent is None:
        missing.append("no parent run (capsbench.kind=study): tuning budget and matched protocol are unknown")
    else:  # keep only the runs of the newest parent, in case an older study of the same name exists
        runs = [r for r in runs if r is parent or r.parent_id in ("", parent.run_id)]
        done = {s for s in RECORDED_STAGES if parent.tags.get(f"capsbench.stage.{s}") == "done"}
        for stage in RECORDED_STAGES:
            if stage not in done:
                missing.append(f"stage `{stage}` has not finished")

    finals = [r for r in runs if _kind(r) == "train" and r.tags.get("capsbench.role") == "final"]
    parent_tags = parent.tags if parent else {}
    chosen = {k.split(".", 2)[2]: v for k, v in parent_tags.items() if k.startswith("capsbench.final.")}
    picked: dict[tuple[str, str], tracking.RunRecord] = {}  # (model, seed) -> newest run, or the chosen one
    for run in finals:
        model = run.tags.get("capsbench.model") or run.params.get("model.name", "?")
        key = (model, run.tags.get("capsbench.seed", ""))
        if key not in picked or chosen.get(model) == run.run_id:
            picked[key] = run
    replicates: dict[str, list[ModelRecord]] = {}
    for (model, seed), run in sorted(picked.items(), key=lambda kv: (kv[0][0], _seed_order(kv[0][1]))):
        replicates.setdefault(model, []).append(
            ModelRecord(
                model=model,
                family=run.tags.get("capsbench.family", ""),
                run_id=run.run_id,
                status=run.status,
                params=run.params,
                metrics=run.metrics,
                tags=run.tags,
                history=tracking.metric_histories(run.run_id, tracking.EPOCH_METRICS),
                attacks=parse_attack_metrics(model, run.metrics),
                seed=seed,
            )
        )
        if run.status != "FINISHED":
            which = f"`{model}`" + (f" (seed {seed})" if seed else "")
            missing.append(f"the final run of {which} ended {run.status}")
    # one run per model for the figures and provenance: the parent's chosen one, else the first seed's
    models = [
        next((r for r in runs_ if r.run_id == chosen.get(m)), runs_[0]) for m, runs_ in replicates.items()
    ]
    models.sort(key=lambda m: (m.family != "capsule", m.model))  # capsules first, then CNNs
    replicates = {m.model: replicates[m.model] for m in models}
    if not models:
        missing.append("no final training runs (stage `train`): no summary rows")
    elif all(m.attacks.empty for m in models):
        missing.append("no attack metrics on the final runs (stage `attack`)")

    trials = _collect_trials(runs, parent)
    matched = cells = study_toml = seeds = None
    if parent is not None:
        text = tracking.read_artifact_text(parent.run_id, "viewpoint/matched.json")
        matched = json.loads(text) if text else None
        text = tracking.read_artifact_text(parent.run_id, "viewpoint/cells.csv")
        cells = pd.read_csv(io.StringIO(text)) if text else None
        study_toml = tracking.read_artifact_text(parent.run_id, "study.toml")
        text = tracking.read_artifact_text(parent.run_id, "viewpoint/seeds.json")
        seeds = json.loads(text) if text else None
    families = {
        r.tags["capsbench.model"]: r.tags["capsbench.family"]
        for r in reversed(runs)  # the newest run's family wins
        if "capsbench.model" in r.tags and "capsbench.family" in r.tags
    }
    return StudyRecords(
        name, parent, models, trials, matched, cells, study_toml, missing, families, replicates, seeds
    )


def _seed_order(seed: str) -> tuple:
    return (0, int(seed)) if seed.isdigit() else (1, seed)


def _kind(run: tracking.RunRecord) -> str:
    return run.tags.get("capsbench.kind", "")


def _collect_trials(runs: list[tracking.RunRecord], parent: tracking.RunRecord | None) -> pd.DataFrame:
    """Optuna trials per model: the parent's ``tune/<model>_trials.csv`` artifacts, else the trial runs."""
    frames = []
    if parent is not None:
        for path in tracking.list_artifacts(parent.run_id, "tune"):
            m = re.match(r"tune/(.+)_trials\.csv$", path)
            text = tracking.read_artifact_text(parent.run_id, path) if m else None
            if text:
                frame = pd.read_csv(io.StringIO(text))
                frame.insert(0, "model", m[1])
                frames.append(frame)
    if not frames:  # fall back to the nested trial runs themselves
        rows = []
        for run in (r for r in runs if _kind(r) == "trial"):
            state = {"FINISHED": "COMPLETE", "KILLED": "PRUNED", "FAILED": "FAIL"}.get(run.status, run.status)
            value = run.metrics.get("best_val_error", run.metrics.get("val_error"))
            rows.append(
                {
                    "model": run.tags.get("capsbench.model", "?"),
                    "number": int(run.tags.get("optuna.trial", len(rows))),
                    "value": value,
                    "state": state,
                }
            )
        frames = [pd.DataFrame(rows)] if rows else []
    if not frames:
        return pd.DataFrame(columns=["model", "number", "value", "state"])
    trials = pd.concat(frames, ignore_index=True)
    trials["state"] = trials["state"].astype(str).str.replace("TrialState.", "", regex=False)
    return trials
