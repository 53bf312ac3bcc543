"""``run_study``: every stage of ``cfg.stages`` not done yet, in order, under the study's MLflow parent run.

MLflow holds the parent run, the trial runs and the final runs (through harness.tracking); the study
folder holds the stage markers. Run the same command again after an interruption: finished stages and
trials are reused.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path

from harness.config import ConfigError, flatten, to_dict
from harness.study.config import StudyConfig, run_config, study_toml
from harness.study.stages import STAGE_FUNCS
from harness.study.state import DEFAULT_ROOT, FIT_TARGET, Study, open_study


def check_runs(cfg: StudyConfig) -> None:
    """Every model's resolved RunConfig passes harness.train's checks (settings, device), or ConfigError."""
    from harness.device import DeviceError, resolve_device
    from harness.train import check_config

    for model in cfg.models:
        run = run_config(cfg, model)
        try:
            check_config(run)
            resolve_device(run.train.device)
        except (ConfigError, DeviceError) as e:
            raise ConfigError(f"run settings of {model}: {e}") from None


def open_parent_run(study: Study):
    """Resume the study's parent run (state.json keeps its id), or start one when there is none."""
    from harness import tracking

    state = study.state()
    run_id = state.get("parent_run_id")
    if run_id:
        try:
            run = tracking.resume_run(run_id, system_metrics=False)
            run.log_text(study_toml(study.cfg), "study.toml")  # settings allowed to change
            return run
        except tracking.TrackingError:
            study.log(f"parent run {run_id} is gone from {tracking.tracking_uri()}; starting a new one")
    cfg = study.cfg
    tags = {
        "capsbench.kind": "study",
        "capsbench.study": cfg.name,
        **tracking.git_info(),
        "versions": json.dumps(tracking.versions(), sort_keys=True),
    }
    if cfg.description:
        tags["mlflow.note.content"] = cfg.description
    run = tracking.start_run(cfg.experiment, cfg.name, tags=tags, system_metrics=False)
    tracking.share_runs_view(run.experiment_id)  # the report adds the comparison's columns
    run.log_params(flatten(to_dict(cfg)))
    run.log_text(study_toml(cfg), "study.toml")
    study.update_state(parent_run_id=run.run_id)
    return run


def run_study(
    cfg: StudyConfig,
    *,
    root: Path = DEFAULT_ROOT,
    storage: str | None = None,
    workers: int = 1,
    fresh: bool = False,
    fit_target: str = FIT_TARGET,
) -> Study:
    """Run every stage in ``cfg.stages`` that is not done yet; the parent run ends FINISHED when all are.

    ``fit_target`` is the "module:function" trials and final runs call (tests pass a fake).
    """
    from harness import tracking

    check_runs(cfg)  # before the folder records (and locks in) any setting
    study = open_study(cfg, root, storage=storage, workers=workers, fresh=fresh, fit_target=fit_target)
    parent = open_parent_run(study)
    study.log(f"runs: `make ui`, then open {tracking.ui_url(parent.experiment_id)}")
    status = "FAILED"
    try:
        todo = [s for s in cfg.stages if not study.done(s)]
        study.log(
            f"parent run {parent.run_id}; stages done: "
            f"{', '.join(s for s in cfg.stages if s not in todo) or 'none'}; "
            f"to do: {', '.join(todo) or 'none'}"
        )
        for i, stage in enumerate(cfg.stages, 1):
            if study.done(stage):
                continue
            left = [s for s in cfg.stages[i:] if not study.done(s)]
            study.log(
                f"stage {i}/{len(cfg.stages)}: {stage}" + (f" (then {', '.join(left)})" if left else "")
            )
            study.update_state(current=stage)
            t0 = time.perf_counter()
            STAGE_FUNCS[stage](study, parent)
            seconds = time.perf_counter() - t0
            stages = study.state()["stages"]
            stages[stage] = {
                "done": True,
                "seconds": round(seconds, 1),
                "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            study.update_state(stages=stages, current=None)
            parent.set_tags({f"capsbench.stage.{stage}": "done"})
            parent.log_metrics({f"stage/{stage}_seconds": seconds})
            study.log(f"stage {stage} done in {seconds:.1f}s")
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        study.log("interrupted; run the same command again to resume")
        raise
    finally:
        parent.end(status)
    return study
