"""MLflow tracking for capsbench: the only module that imports mlflow.

The store is explicit: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project root>/mlflow.db`` with
artifacts in ``<project root>/mlartifacts`` (for any ``sqlite:///.../x.db`` store, artifacts go to an
``mlartifacts`` folder beside the database). Telemetry is off. Runs are driven through ``MlflowClient``
with explicit run ids, so several trainings (threads or processes) never share hidden "active run" state.

    python -m harness.tracking ui              # mlflow ui on this store (what `make ui` runs)
    python -m harness.tracking uri             # print the tracking URI and artifact root

Other modules use: ``start_run``/``resume_run`` -> ``TrackedRun`` (params, tags, metrics with step,
artifacts, atomic checkpoints, end status), ``load_model(run_id, which)``, ``load_config(run_id)``,
``resolve_run_id(prefix)``, and the run-owner checks (``claim_run``, ``mark_dead_study_runs``).
"""

from __future__ import annotations

import argparse
import getpass
import importlib.metadata
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import CapsbenchError
from harness.paths import PROJECT_ROOT

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, RunTag  # noqa: E402

from harness import checkpoint  # noqa: E402
from harness.config import RunConfig, dumps_toml, from_dict, to_dict  # noqa: E402

CHECKPOINT_DIR = "checkpoints"
RESUME_FILE = f"{CHECKPOINT_DIR}/resume.pt"
RESUME_PREVIOUS_FILE = f"{CHECKPOINT_DIR}/resume_previous.pt"  # the epoch before (local stores)
CONFIG_FILE = "config.toml"
_BATCH = {"metrics": 900, "params": 90, "tags": 90}  # MLflow takes at most 1000 metrics, 100 params/tags


class TrackingError(CapsbenchError, RuntimeError):
    """A run, artifact or store that cannot be used as asked."""


class CheckpointFileError(TrackingError):
    """A checkpoint artifact that is damaged or refused as unsafe; the message names the file."""


# ---------------------------------------------------------------------------------------------
# the store
# ---------------------------------------------------------------------------------------------


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the project's sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"


def artifact_root(uri: str | None = None) -> Path | None:
    """Artifact folder of new experiments: ``mlartifacts`` beside a sqlite database, else the server's."""
    uri = uri or tracking_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            db = Path.cwd() / db
        return db.parent / "mlartifacts"
    return None


def client() -> MlflowClient:
    """A client on the explicit store (also sets the fluent API's URI, for anything that uses it)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def experiment_id(name: str) -> str:
    """The id of experiment ``name``, created (with its artifact folder) when missing."""
    c = client()
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"experiment {name!r} is deleted; restore it in mlflow ui or pick another name"
            )
        return exp.experiment_id
    root = artifact_root()
    location = (root / _safe_name(name)).as_uri() if root else None
    try:
        return c.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:  # created by a concurrent process in the meantime
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


# ---------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------


class TrackedRun:
    """One MLflow run: params, tags, metrics with ``step``, artifacts and its end status."""

    def __init__(self, run_id: str, *, system_metrics: bool = True, resumed: bool = False):
        self.client = client()
        self.run_id = run_id
        info = self.client.get_run(run_id).info
        self.experiment_id = info.experiment_id
        self.artifact_uri = info.artifact_uri
        self._monitor = None
        if system_metrics:
            self._monitor = _system_monitor(run_id, resumed)

    # -- logging ------------------------------------------------------------------------------

    def set_tags(self, tags: dict[str, Any]) -> None:
        _log_batches(self.client, self.run_id, tags=[RunTag(k, _text(v)) for k, v in tags.items()])

    def log_params(self, params: dict[str, Any]) -> None:
        _log_batches(self.client, self.run_id, params=[Param(k, _text(v)) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        _log_batches(self.client, self.run_id, metrics=_metrics(metrics, step or 0))

    def log_config(self, cfg: RunConfig) -> None:
        self.log_text(dumps_toml(to_dict(cfg)), CONFIG_FILE)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_json(self, obj: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(obj, indent=2, default=_json_default), artifact_file)

    def log_file(self, local_path: str | Path, artifact_dir: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_dir)

    def save_torch(self, obj: Any, artifact_file: str, *, previous: str | None = None) -> None:
        """``torch.save`` an object as an artifact; atomic (temp + os.replace) in a local artifact store.

        ``previous``: keep the file it replaces under this artifact path (local stores only).
        """
        local = self.local_artifact_dir()
        if local is not None:
            checkpoint.atomic_save(obj, local / artifact_file, previous=previous and local / previous)
            return
        with tempfile.TemporaryDirectory() as tmp:
            path = checkpoint.atomic_save(obj, Path(tmp) / Path(artifact_file).name)
            self.log_file(path, str(Path(artifact_file).parent) if "/" in artifact_file else None)

    def local_artifact_dir(self) -> Path | None:
        """The run's artifact folder when the store keeps artifacts on this machine's disk."""
        return _local_path(self.artifact_uri)

    def download(self, artifact_file: str) -> Path:
        return download_artifact(self.run_id, artifact_file)

    # -- lifecycle ----------------------------------------------------------------------------

    def end(self, status: str = "FINISHED") -> None:
        """FINISHED | FAILED | KILLED; stops the system-metrics sampler first."""
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception:  # the sampler must never hide the run's real outcome
                pass
            self._monitor = None
        self.client.set_terminated(self.run_id, status=status)


def start_run(
    experiment: str,
    run_name: str,
    *,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    system_metrics: bool = True,
) -> TrackedRun:
    """A new RUNNING run; with ``parent_run_id`` it is nested under that run, in the parent's experiment."""
    c = client()
    if parent_run_id:
        try:
            exp_id = c.get_run(parent_run_id).info.experiment_id
        except mlflow.exceptions.MlflowException as e:
            raise TrackingError(f"parent run {parent_run_id!r} not found in {tracking_uri()}") from e
    else:
        exp_id = experiment_id(experiment)
    all_tags = {
        "mlflow.runName": run_name,
        "mlflow.user": _user(),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "harness.train",
        **owner_tags(),
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
        **{k: _text(v) for k, v in (tags or {}).items()},
    }
    run = c.create_run(exp_id, tags=all_tags, run_name=run_name)
    return TrackedRun(run.info.run_id, system_metrics=system_metrics)


def resume_run(run_id: str, *, system_metrics: bool = True) -> TrackedRun:
    """Reopen an existing run (status back to RUNNING, this process its owner) to continue logging into it."""
    c = client()
    try:
        c.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"run {run_id!r} not found in {tracking_uri()}; check the id in mlflow ui") from e
    c.update_run(run_id, status="RUNNING")
    c.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner_tags().items()])
    return TrackedRun(run_id, system_metrics=system_metrics, resumed=True)


# ---------------------------------------------------------------------------------------------
# reading runs back
# ---------------------------------------------------------------------------------------------


def download_artifact(run_id: str, artifact_file: str) -> Path:
    """Local path of a run's artifact (read in place for a local store, else downloaded to a temp dir)."""
    c = client()
    try:
        info = c.get_run(run_id).info
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"run {run_id!r} not found in {tracking_uri()}; check the id in mlflow ui") from e
    local = _local_path(info.artifact_uri)
    if local is not None:
        path = local / artifact_file
        if not path.is_file():
            raise TrackingError(f"run {run_id} has no artifact {artifact_file!r}")
        return path
    try:
        return Path(c.download_artifacts(run_id, artifact_file, tempfile.mkdtemp(prefix="capsbench-")))
    except Exception as e:
        raise TrackingError(f"run {run_id} has no artifact {artifact_file!r} ({e})") from e


def load_config(run_id: str) -> RunConfig:
    """The resolved RunConfig a run was trained with (its ``config.toml`` artifact)."""
    import tomllib

    text = download_artifact(run_id, CONFIG_FILE).read_text()
    return from_dict(RunConfig, tomllib.loads(text))


def checkpoint_file(which: str | int) -> str:
    """Artifact path of a model record: "final", "best" or an epoch number."""
    if isinstance(which, int) and not isinstance(which, bool):
        return f"{CHECKPOINT_DIR}/model_epoch_{which:03d}.pt"
    if which in ("final", "best"):
        return f"{CHECKPOINT_DIR}/model_{which}.pt"
    raise TrackingError(f"which={which!r}: use 'final', 'best' or an epoch number")


def load_model(run_id: str, which: str | int = "final", device: str = "cpu"):
    """Rebuild a trained model from its run alone -> (model in eval mode, RunConfig).

    A damaged ``model_final.pt`` / ``model_best.pt`` falls back to the epoch checkpoint of the same epoch
    (same weights) when the run kept one, with a note on stderr.
    """
    from models import create_model

    path = download_artifact(run_id, checkpoint_file(which))
    try:
        record = checkpoint.load_record(path)
    except checkpoint.UnsafeCheckpointError as e:
        raise CheckpointFileError(str(e)) from None
    except checkpoint.CheckpointError as e:
        record = _same_epoch_record(run_id, which, e)
    model = create_model(record["model_name"], **record["model_kwargs"])
    model.load_state_dict(record["state_dict"])
    return model.to(device).eval(), load_config(run_id)


def _same_epoch_record(run_id: str, which: str | int, error: Exception) -> dict[str, Any]:
    """The epoch checkpoint holding the same weights as a damaged final/best record, or a one-line error."""
    c = client()
    epoch = None
    if which == "final":  # logged at the step of the last epoch
        history = c.get_metric_history(run_id, "final_test_error")
        epoch = max((m.step for m in history), default=None)
    elif which == "best":
        epoch = int(c.get_run(run_id).data.metrics.get("best_epoch", 0)) or None
    try:
        if epoch is None:
            raise TrackingError("no epoch to fall back to")
        path = download_artifact(run_id, checkpoint_file(epoch))
        record = checkpoint.load_record(path)
    except (TrackingError, checkpoint.CheckpointError):
        fix = f"; rewrite it with `python -m harness.train --resume {run_id}`" if which == "final" else ""
        raise CheckpointFileError(f"{error}{fix}") from None
    print(f"note: {error}; using {path.name} (epoch {epoch}, the same weights) instead", file=sys.stderr)
    return record


def load_resume_state(run_id: str) -> dict[str, Any]:
    """The full training state of a run's last completed epoch (``checkpoints/resume.pt``).

    When that file is damaged (or missing beside a kept previous one) it falls back to the epoch before
    (``checkpoints/resume_previous.pt``), with a note on stderr; an unsafe file is refused outright.
    """
    try:
        return checkpoint.load_resume_state(download_artifact(run_id, RESUME_FILE))
    except checkpoint.UnsafeCheckpointError as e:
        raise CheckpointFileError(str(e)) from None
    except (checkpoint.CheckpointError, TrackingError) as e:
        error = e
    try:
        path = download_artifact(run_id, RESUME_PREVIOUS_FILE)
    except TrackingError:
        if isinstance(error, checkpoint.CheckpointError):
            raise CheckpointFileError(str(error)) from None
        raise error from None
    try:
        state = checkpoint.load_resume_state(path)
    except checkpoint.CheckpointError as e:
        raise CheckpointFileError(f"{error}; and {e}") from None
    print(
        f"note: {error}; resuming from the epoch before ({path.name}, epoch {state['epoch']})",
        file=sys.stderr,
    )
    return state


def run_status(run_id: str) -> str:
    return client().get_run(run_id).info.status


# ---------------------------------------------------------------------------------------------
# report queries (the read side used by harness/report.py)
# ---------------------------------------------------------------------------------------------

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


def run_filter(tags: dict[str, str], status: str | None = None) -> str:
    """The MLflow filter string for runs carrying every tag in ``tags`` (and ``status``), values escaped."""
    terms = [f"tags.`{k}` = '{_quoted(v)}'" for k, v in tags.items()]
    if status:
        terms.append(f"attributes.status = '{_quoted(status)}'")
    return " and ".join(terms)


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
    try:
        return _record(client().get_run(run_id))
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"run {run_id!r} not found in {tracking_uri()}; check the id in mlflow ui") from e


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


def list_artifacts(run_id: str, folder: str = "") -> list[str]:
    """Paths of the files directly inside a run's artifact folder ("" = the top level)."""
    return [f.path for f in client().list_artifacts(run_id, folder or None) if not f.is_dir]


def read_artifact_text(run_id: str, artifact_file: str) -> str | None:
    """A text artifact's contents, or None when the run does not have it."""
    try:
        return download_artifact(run_id, artifact_file).read_text()
    except TrackingError:
        return None


def log_artifacts(run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    """Copy the files of ``local_dir`` into a run's artifacts at ``artifact_path`` (even a finished run)."""
    client().log_artifacts(run_id, str(local_dir), artifact_path)


# ---------------------------------------------------------------------------------------------
# attack results (written by harness/attack.py into the attacked model's run)
# ---------------------------------------------------------------------------------------------


def log_attack_results(
    run_id: str, metrics: dict[str, float], tags: dict[str, str], local_dir: str | Path, artifact_path: str
) -> None:
    """Metrics (step 0), tags and the files of ``local_dir`` into an existing (possibly finished) run."""
    c = client()
    try:
        c.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"run {run_id!r} not found in {tracking_uri()}; check the id in mlflow ui") from e
    _log_batches(c, run_id, metrics=_metrics(metrics, 0))
    _log_batches(c, run_id, tags=[RunTag(k, _text(v)[:8000]) for k, v in tags.items()])
    c.log_artifacts(run_id, str(local_dir), artifact_path)


# ---------------------------------------------------------------------------------------------
# run ids and run owners: a dead run is seen as dead, a run id may be a unique prefix
# ---------------------------------------------------------------------------------------------

OWNER_HOST = "capsbench.owner.host"
OWNER_PID = "capsbench.owner.pid"
OWNER_STARTED = "capsbench.owner.started"  # the owner process's start time (epoch seconds): pids get reused
OWNER_GONE = "capsbench.owner_gone"  # set when a RUNNING run is found without its process


def resolve_run_id(run_id: str) -> str:
    """The full id of the run whose id is ``run_id`` or starts with it (e.g. the 8 characters logs print)."""
    text = run_id.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,32}", text):
        raise TrackingError(f"run id {run_id!r} is not a (prefix of a) 32-character hex MLflow run id")
    c = client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    found = [r.info.run_id for r in c.search_runs(experiments, f"attributes.run_id LIKE '{_quoted(text)}%'")]
    if len(found) == 1:
        return found[0]
    if not found:
        raise TrackingError(f"run {run_id!r} not found in {tracking_uri()}; check the id in mlflow ui")
    raise TrackingError(
        f"run id {run_id!r} is ambiguous: {len(found)} runs start with it ({', '.join(sorted(found)[:3])}"
        f"{', ...' if len(found) > 3 else ''}); give more characters"
    )


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the one writing a run: host, pid, process start time."""
    import psutil

    started = psutil.Process().create_time()
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid()), OWNER_STARTED: f"{started:.2f}"}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process recorded as a run's owner still runs: True, False, or None when this machine
    cannot tell (no owner recorded, or the owner is on another host)."""
    import psutil

    host, pid, started = tags.get(OWNER_HOST), tags.get(OWNER_PID, ""), tags.get(OWNER_STARTED, "")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        process = psutil.Process(int(pid))
        same = abs(process.create_time() - float(started)) < 1.0  # not a new process with a reused pid
        return same and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


def describe_owner(tags: dict[str, str]) -> str:
    return f"pid {tags.get(OWNER_PID, '?')} on {tags.get(OWNER_HOST, '?')}"


def mark_owner_gone(run_id: str, tags: dict[str, str]) -> None:
    """A RUNNING run whose process is gone: status KILLED, tag ``capsbench.owner_gone`` says when and who."""
    c = client()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    c.set_tag(run_id, OWNER_GONE, f"{describe_owner(tags)} found gone at {stamp}")
    c.set_terminated(run_id, status="KILLED")


def claim_run(run_id: str, *, force: bool = False) -> str | None:
    """Check before resuming ``run_id``: a RUNNING run whose owner is alive (or cannot be checked from here)
    is refused unless ``force``; one whose owner is gone is marked so. Returns a note when it marked it."""
    try:
        run = client().get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"run {run_id!r} not found in {tracking_uri()}; check the id in mlflow ui") from e
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    alive = owner_alive(tags)
    if alive is False:
        mark_owner_gone(run_id, tags)
        return f"run {run_id[:8]} was RUNNING but its process ({describe_owner(tags)}) is gone; marked KILLED"
    if force:
        return None
    if OWNER_PID not in tags:
        owner = "with no recorded owner (it predates owner records): nothing tells whether it is alive"
    else:
        why = "still alive" if alive else "cannot be checked from this machine"
        owner = f"owned by {describe_owner(tags)} ({why})"
    raise TrackingError(
        f"run {run_id[:8]} is RUNNING, {owner}; wait for it to end, "
        "or pass --force if no process is training it"
    )


def mark_dead_study_runs(study: str) -> list[str]:
    """Mark the RUNNING runs of a study whose owner process is gone (see ``mark_owner_gone``); their ids."""
    try:
        runs = find_runs({"capsbench.study": study}, statuses=("RUNNING",))
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"cannot read the runs of study {study!r} from {tracking_uri()} ({e})") from None
    marked = []
    for run in runs:
        if owner_alive(run.tags) is False:
            mark_owner_gone(run.run_id, run.tags)
            marked.append(run.run_id)
    return marked


# ---------------------------------------------------------------------------------------------
# the MLflow UI: links that open an experiment's runs table
# ---------------------------------------------------------------------------------------------

UI_HOST, UI_PORT = "127.0.0.1", 5000
# MLflow 3 opens every experiment in its GenAI view unless the link asks for the model-training one
EXPERIMENT_KIND = "custom_model_development"
# a shared runs-table view (an experiment tag the UI reads when the link names it): runs listed flat, the
# study's parent run first, then its final runs, then the trials (sorted by capsbench.kind: study < train
# < trial; the default start-time order folds them under the parent), with the comparison's metric columns
RUNS_VIEW = "capsbench"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"
RUN_COLUMNS = ["final_test_error", "test_familiar_error", "test_novel_error", "best_val_error"]


def ui_url(experiment_id: str, *, host: str = UI_HOST, port: int = UI_PORT) -> str:
    """The `mlflow ui` link to an experiment's runs table, in the model-training view (and the capsbench
    runs view when the experiment has one)."""
    url = f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    tags = client().get_experiment(experiment_id).tags
    return url + (f"&viewStateShareKey={RUNS_VIEW}" if RUNS_VIEW_TAG in tags else "")


def share_runs_view(experiment_id: str, summary_metrics: list[str] = ()) -> None:
    """Tag the experiment as model training and (re)write its runs view: ``summary_metrics`` (the parent
    run's comparison) first, then the final runs' and trials' own metrics."""
    columns = [f"metrics.`{m}`" for m in dict.fromkeys([*summary_metrics, *RUN_COLUMNS])]
    view = {
        "orderByKey": "tags.`capsbench.kind`",
        "orderByAsc": True,
        "searchFilter": "",
        "selectedColumns": columns,
    }
    c = client()
    for key, value in (("mlflow.experimentKind", EXPERIMENT_KIND), (RUNS_VIEW_TAG, json.dumps(view))):
        try:
            c.set_experiment_tag(experiment_id, key, value)
        except mlflow.exceptions.MlflowException:  # another machine inserted the tag at the same moment
            c.set_experiment_tag(experiment_id, key, value)


def ui_links(host: str = UI_HOST, port: int = UI_PORT) -> list[tuple[str, str]]:
    """(experiment name, runs-table link) of every live experiment that holds runs, newest first."""
    c = client()
    exps = c.search_experiments(order_by=["last_update_time DESC"])
    live = [e for e in exps if c.search_runs([e.experiment_id], max_results=1)]
    return [(e.name, ui_url(e.experiment_id, host=host, port=port)) for e in live]


# ---------------------------------------------------------------------------------------------
# runs a dead process left RUNNING (harness/study.py closes them when it fails that process's trials)
# ---------------------------------------------------------------------------------------------


def end_running_runs(experiment: str, tags: dict[str, str], status: str) -> list[dict[str, str]]:
    """End every RUNNING run of ``experiment`` carrying all ``tags`` with ``status``; -> the tags of each."""
    c = client()
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], run_filter(tags, status="RUNNING"))
    for run in runs:
        c.set_terminated(run.info.run_id, status=status)
    return [run.data.tags for run in runs]


def running_run_tags(run_id: str) -> dict[str, str] | None:
    """The tags of run ``run_id`` while it is RUNNING; None when it ended or does not exist."""
    try:
        run = client().get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return None
    return dict(run.data.tags) if run.info.status == "RUNNING" else None


# ---------------------------------------------------------------------------------------------
# run facts: git, versions
# ---------------------------------------------------------------------------------------------


def git_info() -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` (tracked files changed) of the project checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def versions() -> dict[str, str]:
    """Python and the versions of the libraries results depend on."""
    out = {"python": platform.python_version()}
    for dist in ("capsbench", "torch", "torchvision", "numpy", "mlflow", "optuna", "torchattacks", "pandas"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


# ---------------------------------------------------------------------------------------------


def _system_monitor(run_id: str, resumed: bool):
    """MLflow's psutil sampler (CPU, memory, disk, network; GPU when pynvml is present) for this run."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, resume_logging=resumed, tracking_uri=tracking_uri())
        monitor.start()
        return monitor
    except Exception as e:  # never fail a training for the sampler
        print(f"note: system metrics are off for this run ({e})", file=sys.stderr)
        return None


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


def _log_batches(c: MlflowClient, run_id: str, **items: list) -> None:
    """``log_batch`` in chunks MLflow accepts (``items``: metrics=, params= or tags= lists)."""
    for kind, values in items.items():
        for i in range(0, len(values), _BATCH[kind]):
            c.log_batch(run_id, **{kind: values[i : i + _BATCH[kind]]})


def _metrics(metrics: dict[str, float | None], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]


def _quoted(value: str) -> str:
    """A value inside '...' of an MLflow filter string."""
    return str(value).replace("\\", "\\\\").replace("'", "\\'")


def _local_path(uri: str) -> Path | None:
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=_json_default, sort_keys=True)
    return str(value)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.tracking",
        description="The capsbench MLflow store: browse it or print where it is.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ui = sub.add_parser("ui", help="print each experiment's runs link, then run `mlflow ui` on the store")
    ui.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    sub.add_parser("uri", help="print the tracking URI and the artifact root")
    args = parser.parse_args(argv)

    uri, root = tracking_uri(), artifact_root()
    if args.command == "uri":
        print(f"tracking URI:  {uri}\nartifact root: {root or '(chosen by the tracking server)'}")
        return 0
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host]
    cmd += ["--port", str(args.port)]
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        cmd += ["--default-artifact-root", root.as_uri()]
    print(" ".join(cmd), flush=True)
    links = ui_links(args.host, args.port)
    for name, url in links:
        print(f"experiment {name!r}: {url}", flush=True)
    if not links:
        print(f"no runs yet in {uri}; run `make study NAME=demo` first", flush=True)
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
