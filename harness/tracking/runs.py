"""Writing runs: ``start_run``/``resume_run`` -> ``TrackedRun`` (params, tags, metrics with step, artifacts,
atomic checkpoints, end status), and results logged into a run that already ended.

Runs are driven through ``MlflowClient`` with explicit run ids, so several trainings (threads or processes)
never share hidden "active run" state.
"""

from __future__ import annotations

import getpass
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from harness import checkpoint
from harness.config import RunConfig, dumps_toml, to_dict
from harness.tracking.owners import owner_tags
from harness.tracking.store import (
    TrackingError,
    client,
    existing_run,
    experiment_id,
    local_artifact_path,
    tracking_uri,
)

_BATCH = {"metrics": 900, "params": 90, "tags": 90}  # MLflow takes at most 1000 metrics, 100 params/tags


CONFIG_FILE = "config.toml"


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
        return local_artifact_path(self.artifact_uri)

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
    existing_run(c, run_id)
    c.update_run(run_id, status="RUNNING")
    c.log_batch(run_id, tags=[RunTag(k, v) for k, v in owner_tags().items()])
    return TrackedRun(run_id, system_metrics=system_metrics, resumed=True)


def log_artifacts(run_id: str, local_dir: str | Path, artifact_path: str) -> None:
    """Copy the files of ``local_dir`` into a run's artifacts at ``artifact_path`` (even a finished run)."""
    client().log_artifacts(run_id, str(local_dir), artifact_path)


def log_attack_results(
    run_id: str, metrics: dict[str, float], tags: dict[str, str], local_dir: str | Path, artifact_path: str
) -> None:
    """Metrics (step 0), tags and the files of ``local_dir`` into an existing (possibly finished) run."""
    c = client()
    existing_run(c, run_id)
    _log_batches(c, run_id, metrics=_metrics(metrics, 0))
    _log_batches(c, run_id, tags=[RunTag(k, _text(v)[:8000]) for k, v in tags.items()])
    c.log_artifacts(run_id, str(local_dir), artifact_path)


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


def _log_batches(c: MlflowClient, run_id: str, **items: list) -> None:
    """``log_batch`` in chunks MLflow accepts (``items``: metrics=, params= or tags= lists)."""
    for kind, values in items.items():
        for i in range(0, len(values), _BATCH[kind]):
            c.log_batch(run_id, **{kind: values[i : i + _BATCH[kind]]})


def _metrics(metrics: dict[str, float | None], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]


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
