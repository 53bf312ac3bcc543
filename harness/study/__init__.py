"""Run a whole study: data -> tune -> train -> viewpoint -> attack -> report, resumable and parallel.

    python -m harness.study demo                          # what `make study NAME=demo` runs
    python -m harness.study synthnorb_azimuth --workers 2 --set tune.n_trials=12
    python -m harness.study smallnorb_azimuth --storage postgresql+psycopg://user:pw@host/optuna  # machines
    python -m harness.study demo --status                 # which stages and trials are done, what is left
    python -m harness.study demo --check                  # validate the study file and exit
    python -m harness.study --list                        # the study files in studies/

A study file ``studies/NAME.toml`` names the models and the shared run settings. The package follows the
pipeline:

- ``config``: the study file (dataclasses, load + validate, each model's RunConfig).
- ``state``: the study folder ``runs/studies/NAME/``: resolved config, stage markers (state.json), log, lock.
- ``storage``: where the Optuna trials live (a journal file, or a shared RDB) and which workers are dead.
- ``trials``: one trial: its search space, its run (``TrialObjective``), the budget it counts against.
- ``tune``: one Optuna study per model: workers sharing its budget, dead workers' trials, the best trial.
- ``stages``: the six stages; ``pipeline``: ``run_study`` runs those not done yet under the MLflow parent run.
- ``status``: ``--status`` and the closing links; ``cli``: the command line.

Everything is recorded (docs/contracts.md, "Study records"): MLflow holds the parent run, the trial runs
and the final runs; the study folder holds the resolved config, the stage markers and the Optuna journal.
Run the same command again after an interruption: finished stages and trials are reused; trials left
RUNNING by a dead worker are failed and retried with the same parameters; an interrupted final training
resumes from its last completed epoch.

Scaling out: ``--workers N`` runs N local processes on each model's Optuna study. For many machines,
point every machine at one Optuna RDB (``--storage postgresql+psycopg://...``, harness/study/storage.py)
and one MLflow server (``MLFLOW_TRACKING_URI=http://host:5000``), and start the same command on each; the
study folder (state.json) is per machine, the trials are shared. A worker whose share of the budget is
taken waits for the trials other machines hold; a trial whose worker died (Optuna heartbeat older than
``tune.grace_period``, or a gone pid on this host) is failed, its MLflow run ended FAILED (the dead
machine's parent run KILLED), and its parameters queued again.
"""

from harness.study.cli import main
from harness.study.config import (
    STAGES,
    StudyConfig,
    fingerprint,
    list_studies,
    load_study,
    model_family,
    run_config,
    study_seeds,
)
from harness.study.pipeline import run_study
from harness.study.state import Study, StudyError, open_study
from harness.study.status import links_text, status_text

__all__ = [
    "STAGES",
    "Study",
    "StudyConfig",
    "StudyError",
    "fingerprint",
    "links_text",
    "list_studies",
    "load_study",
    "main",
    "model_family",
    "open_study",
    "run_config",
    "run_study",
    "status_text",
    "study_seeds",
]
