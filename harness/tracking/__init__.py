"""MLflow tracking for capsbench: the only package that imports mlflow.

Everything else reads and writes runs through these names and gets the project's own values back
(``RunRecord``, dicts, paths), never MLflow objects.

    python -m harness.tracking ui              # mlflow ui on this store (what `make ui` runs)
    python -m harness.tracking uri             # print the tracking URI and artifact root

store.py the store and experiments · runs.py writing runs · queries.py reading runs · artifacts.py a run's
files, config, model and resume state · owners.py run owners and run ids · ui.py UI links and the command ·
provenance.py git commit and library versions.
"""

from harness.tracking.store import (  # noqa: I001  (first: it turns MLflow's telemetry off before import)
    CheckpointFileError,
    TrackingError,
    artifact_root,
    client,
    experiment_id,
    local_artifact_path,
    tracking_uri,
)
from harness.tracking.artifacts import (
    CHECKPOINT_DIR,
    RESUME_FILE,
    RESUME_PREVIOUS_FILE,
    checkpoint_file,
    download_artifact,
    list_artifacts,
    load_config,
    load_model,
    load_resume_state,
    read_artifact_text,
)
from harness.tracking.owners import (
    OWNER_GONE,
    OWNER_HOST,
    OWNER_PID,
    OWNER_STARTED,
    claim_run,
    describe_owner,
    end_running_runs,
    mark_dead_study_runs,
    mark_owner_gone,
    owner_alive,
    owner_tags,
    resolve_run_id,
    running_run_tags,
)
from harness.tracking.provenance import git_info, versions
from harness.tracking.queries import (
    EPOCH_METRICS,
    RunRecord,
    find_runs,
    get_run,
    metric_histories,
    run_filter,
    run_status,
    study_runs,
)
from harness.tracking.runs import (
    CONFIG_FILE,
    TrackedRun,
    log_artifacts,
    log_attack_results,
    resume_run,
    start_run,
)
from harness.tracking.ui import RUNS_VIEW, RUNS_VIEW_TAG, UI_HOST, UI_PORT, share_runs_view, ui_links, ui_url

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "EPOCH_METRICS",
    "OWNER_GONE",
    "OWNER_HOST",
    "OWNER_PID",
    "OWNER_STARTED",
    "RESUME_FILE",
    "RESUME_PREVIOUS_FILE",
    "RUNS_VIEW",
    "RUNS_VIEW_TAG",
    "UI_HOST",
    "UI_PORT",
    "artifact_root",
    "checkpoint_file",
    "CheckpointFileError",
    "claim_run",
    "client",
    "describe_owner",
    "download_artifact",
    "end_running_runs",
    "experiment_id",
    "find_runs",
    "get_run",
    "git_info",
    "list_artifacts",
    "load_config",
    "load_model",
    "load_resume_state",
    "local_artifact_path",
    "log_artifacts",
    "log_attack_results",
    "mark_dead_study_runs",
    "mark_owner_gone",
    "metric_histories",
    "owner_alive",
    "owner_tags",
    "read_artifact_text",
    "resolve_run_id",
    "resume_run",
    "run_filter",
    "run_status",
    "running_run_tags",
    "RunRecord",
    "share_runs_view",
    "start_run",
    "study_runs",
    "TrackedRun",
    "tracking_uri",
    "TrackingError",
    "ui_links",
    "ui_url",
    "versions",
]
