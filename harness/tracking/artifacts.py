"""Reading a run's files back: artifacts, its config, its model records and its resume state (with the
fall-backs that keep a damaged file from losing a run)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from harness import checkpoint
from harness.config import RunConfig, from_dict, recorded_config
from harness.tracking.runs import CONFIG_FILE
from harness.tracking.store import (
    CheckpointFileError,
    TrackingError,
    client,
    existing_run,
    local_artifact_path,
)

CHECKPOINT_DIR = "checkpoints"


RESUME_FILE = f"{CHECKPOINT_DIR}/resume.pt"


RESUME_PREVIOUS_FILE = f"{CHECKPOINT_DIR}/resume_previous.pt"  # the epoch before (local stores)


def download_artifact(run_id: str, artifact_file: str) -> Path:
    """Local path of a run's artifact (read in place for a local store, else downloaded to a temp dir)."""
    c = client()
    info = existing_run(c, run_id).info
    local = local_artifact_path(info.artifact_uri)
    if local is not None:
        path = local / artifact_file
        if not path.is_file():
            raise TrackingError(f"run {run_id} has no artifact {artifact_file!r}")
        return path
    try:
        return Path(c.download_artifacts(run_id, artifact_file, tempfile.mkdtemp(prefix="capsbench-")))
    except Exception as e:
        raise TrackingError(f"run {run_id} has no artifact {artifact_file!r} ({e})") from e


def list_artifacts(run_id: str, folder: str = "") -> list[str]:
    """Paths of the files directly inside a run's artifact folder ("" = the top level)."""
    return [f.path for f in client().list_artifacts(run_id, folder or None) if not f.is_dir]


def read_artifact_text(run_id: str, artifact_file: str) -> str | None:
    """A text artifact's contents, or None when the run does not have it."""
    try:
        return download_artifact(run_id, artifact_file).read_text()
    except TrackingError:
        return None


def load_config(run_id: str) -> RunConfig:
    """The resolved RunConfig a run was trained with (its ``config.toml`` artifact)."""
    import tomllib

    text = download_artifact(run_id, CONFIG_FILE).read_text()
    return from_dict(RunConfig, recorded_config(tomllib.loads(text)))


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
