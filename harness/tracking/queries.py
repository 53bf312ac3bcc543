"""Reading runs: the project's own ``RunRecord`` (plain values, no MLflow objects) and the searches."""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.tracking.store import client, existing_run

EPOCH_METRICS = ("train_loss", "train_error", "val_error", "test_error", "test_familiar_error",
                 "test_novel_error", "margin", "lr", "samples_per_s", "epoch_seconds")  # fmt: skip


@dataclass(frozen=True)
class RunRecord:
    """What the harness reads about one run, in plain values (no MLflow objects leave this module)."""

    run_id: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED
    experiment_id: str
    start_time: int  # milliseconds since the epoch
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the latest value of each
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def parent_id(self) -> str:
        """The parent run's id ("" for a top-level run)."""
        return self.tags.get("mlflow.parentRunId", "")


def run_filter(tags: dict[str, str]) -> str:
    """The MLflow filter string for runs carrying every tag in ``tags``, values escaped."""
    return " and ".join(f"tags.`{k}` = '{_quoted(v)}'" for k, v in tags.items())


def find_runs(
    tags: dict[str, str], *, experiment: str | None = None, statuses: tuple[str, ...] = ()
) -> list[RunRecord]:
    """Live runs carrying every tag in ``tags`` (in ``experiment``, else in any), newest first, optionally
    only those whose status is in ``statuses``."""
    c = client()
    if experiment is None:
        ids = [e.experiment_id for e in c.search_experiments()]
    else:
        exp = c.get_experiment_by_name(experiment)
        ids = [exp.experiment_id] if exp is not None else []
    if not ids:
        return []
    runs = c.search_runs(ids, run_filter(tags), max_results=50_000, order_by=["start_time DESC"])
    records = [_record(r) for r in runs]
    return [r for r in records if not statuses or r.status in statuses]


def study_runs(study: str) -> list[RunRecord]:
    """Every live run tagged ``capsbench.study=<study>``, in any experiment, newest first."""
    return find_runs({"capsbench.study": study})


def get_run(run_id: str) -> RunRecord:
    """One run's record; a TrackingError naming the store when it does not exist."""
    return _record(existing_run(client(), run_id))


def run_status(run_id: str) -> str:
    return get_run(run_id).status


def metric_histories(run_id: str, keys=EPOCH_METRICS):
    """Per-epoch metrics of a run: a DataFrame indexed by ``epoch`` (the step), a column per key logged."""
    import pandas as pd

    c, columns = client(), {}
    for key in keys:
        history = sorted(c.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        if history:  # a resumed run may log a step twice: keep the latest value
            columns[key] = pd.Series({m.step: m.value for m in history}, dtype=float)
    frame = pd.DataFrame(columns).sort_index()
    frame.index.name = "epoch"
    return frame


def _record(run) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=info.run_id,
        status=info.status,
        experiment_id=info.experiment_id,
        start_time=int(info.start_time or 0),
        params=dict(data.params),
        metrics=dict(data.metrics),
        tags=dict(data.tags),
    )


def _quoted(value: str) -> str:
    """A value inside '...' of an MLflow filter string."""
    return str(value).replace("\\", "\\\\").replace("'", "\\'")
