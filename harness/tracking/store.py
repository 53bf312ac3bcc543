"""The MLflow store: where it is, a client on it, and experiments created with their artifact folder.

The store is explicit: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project root>/mlflow.db`` with
artifacts in ``<project root>/mlartifacts`` (for any ``sqlite:///.../x.db`` store, artifacts go to an
``mlartifacts`` folder beside the database). Telemetry is off.
"""

from __future__ import annotations

import os
import re
import urllib.parse
import urllib.request
from pathlib import Path

from harness.errors import CapsbenchError
from harness.paths import PROJECT_ROOT

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402


class TrackingError(CapsbenchError, RuntimeError):
    """A run, artifact or store that cannot be used as asked."""


class CheckpointFileError(TrackingError):
    """A checkpoint artifact that is damaged or refused as unsafe; the message names the file."""


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


def existing_run(c: MlflowClient, run_id: str):
    """MLflow's record of run ``run_id``; a TrackingError naming the store when there is none."""
    try:
        return c.get_run(run_id)
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"run {run_id!r} not found in {tracking_uri()}; check the id in mlflow ui") from e


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


def local_artifact_path(uri: str) -> Path | None:
    """The folder an artifact URI names on this machine's disk, or None for a remote store."""
    parsed = urllib.parse.urlparse(uri)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and os.name == "nt"):
        return Path(uri)
    return None


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "experiment"
