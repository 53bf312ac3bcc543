"""What ``--status`` and the end of a study print: stages, trials (dead ones named), runs, where to look."""

from __future__ import annotations

from pathlib import Path

import optuna

from harness.study import storage
from harness.study.config import StudyConfig
from harness.study.state import DEFAULT_ROOT, Study, runner_active
from harness.study.trials import trial_counts
from harness.study.tune import optuna_storage


def dead_run_lines(study: str) -> list[str]:
    """Marks the study's MLflow runs left RUNNING by a process that is gone (KILLED) and says which."""
    from harness import tracking

    try:
        marked = tracking.mark_dead_study_runs(study)
    except tracking.TrackingError as e:
        return [f"  (runs not checked for dead processes: {e})"]
    if not marked:
        return []
    ids = ", ".join(r[:8] for r in marked)
    return [f"  {len(marked)} run(s) left RUNNING by a process that is gone, now marked KILLED: {ids}"]


def status_text(cfg: StudyConfig, root: Path = DEFAULT_ROOT, storage_url: str | None = None) -> str:
    """Which stages are done, how far each model's tuning is, the final runs, and what is left."""
    folder = Path(root) / cfg.name
    if not (folder / "state.json").is_file():
        return f"study {cfg.name}: not started (folder {folder})"
    study = Study(cfg, folder, storage_url=storage_url)
    state = study.state()
    lines = [f"study {cfg.name}: folder {folder}, parent run {state.get('parent_run_id')}"]
    running = "running" if runner_active(Path(root), cfg.name) else "interrupted (rerun to resume)"
    for stage in cfg.stages:
        s = state["stages"].get(stage)
        current = running if stage == state.get("current") else "to do"
        lines.append(f"  {stage:<10} " + (f"done ({s['seconds']}s)" if s else current))
    for model in cfg.models:
        try:
            ostudy = optuna.load_study(study_name=study.optuna_name(model), storage=optuna_storage(study))
        except KeyError:  # not created yet
            ostudy = None
        c = trial_counts(ostudy) if ostudy else {}
        dead = storage.dead_trials(ostudy) if ostudy else []
        tuned = "tuned" if model in state["best_params"] else "tuning"
        run = state["final_runs"].get(model, "-")
        dead_note = (
            f"{len(dead)} dead (a waiting worker or the next run fails and retries them), " if dead else ""
        )
        lines.append(
            f"  {model}: {tuned} {c.get('complete', 0)} complete, {c.get('pruned', 0)} pruned, "
            f"{c.get('running', 0) - len(dead)} running, {dead_note}{c.get('fail', 0)} failed "
            f"of {cfg.tune.n_trials}; final run {run}"
        )
        for t in dead:
            worker = t.user_attrs.get("worker", "an unknown worker")
            lines.append(
                f"    dead: trial {t.number} of {worker} (process gone or no heartbeat within "
                "tune.grace_period)"
            )
    lines += dead_run_lines(cfg.name)
    matched = folder / "viewpoint" / "matched.md"
    if matched.is_file():
        lines += ["", matched.read_text().rstrip()]
    return "\n".join(lines)


def links_text(study: Study) -> str:
    """Where to look next: the report (when written) and the MLflow UI link to the study's runs."""
    from harness import tracking
    from harness.report import reports_root

    lines = []
    report = reports_root() / study.cfg.name / "report.html"
    if study.done("report") and report.is_file():
        lines.append(f"report:  {report}  (and report.md beside it)")
    exp_id = tracking.experiment_id(study.cfg.experiment)
    lines.append(f"runs:    make ui, then open {tracking.ui_url(exp_id)}")
    return "\n".join(lines)
