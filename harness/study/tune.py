"""Tuning: one Optuna study per model (``NAME.<model>``), the same trial budget for every model.

A seeded TPE sampler and a median pruner per worker. Any number of workers (processes, machines) share a
model's budget: each asks for trials (harness/study/trials.py) until complete + pruned trials reach it,
then waits for the trials others hold, failing and retrying those whose worker died
(harness/study/storage.py).
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.progress import Progress
from harness.study import storage
from harness.study.config import StudyConfig, model_family
from harness.study.state import Study, StudyError, saved_config
from harness.study.trials import (
    TrialObjective,
    claimed,
    n_finished,
    n_trials_in,
    params_to_keys,
    trial_counts,
)

WAIT_POLL_S = 2  # a worker whose share of trials is done checks this often on the trials others hold


# ---------------------------------------------------------------------------------------------
# the Optuna study of a model
# ---------------------------------------------------------------------------------------------


def optuna_storage(study: Study):
    """The study's journal file, or the shared RDB (``--storage``) with Optuna's heartbeat on."""
    if study.storage_url:
        t = study.cfg.tune
        return storage.rdb_storage(
            study.storage_url,
            heartbeat_interval=t.heartbeat_interval,
            grace_period=t.grace_period,
            on_stale=lambda ostudy, trial: close_dead_trial(study, ostudy, trial),
        )
    return storage.journal_storage(str(study.folder / "optuna.journal"))


def sampler_and_pruner(cfg: StudyConfig, worker: int):
    """Samplers and pruners are not stored by Optuna: every worker builds its own (seed + worker index)."""
    t = cfg.tune
    sampler = optuna.samplers.TPESampler(seed=t.seed + worker, n_startup_trials=t.n_startup_trials)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=t.n_startup_trials, n_warmup_steps=t.n_warmup_epochs
    )
    return sampler, pruner


def load_optuna(study: Study, model: str, worker: int = 0) -> optuna.Study:
    sampler, pruner = sampler_and_pruner(study.cfg, worker)
    return optuna.create_study(
        study_name=study.optuna_name(model),
        storage=optuna_storage(study),
        sampler=sampler,
        pruner=pruner,
        direction="minimize",
        load_if_exists=True,
    )


# ---------------------------------------------------------------------------------------------
# one worker's trials of a model, and the trials of dead workers
# ---------------------------------------------------------------------------------------------


def run_trials(
    study: Study,
    model: str,
    *,
    worker: int,
    fit_fn: Callable,
    parent_run_id: str,
    on_trial: Callable[[], None] | None = None,
) -> None:
    """Ask, run and tell trials of ``model`` until complete + pruned trials reach the budget.

    When every share of the budget is taken but trials of other workers (any machine) are still running,
    this worker waits for them, checking every few seconds for dead ones: those are failed and their
    parameters queued again (``fail_stale_trials``), and this worker runs the retry.
    """
    cfg = study.cfg
    ostudy = load_optuna(study, model, worker)
    objective = TrialObjective(study, model, ostudy, fit_fn, parent_run_id)
    n_trials, failures = cfg.tune.n_trials, 0
    waiting_for: list[int] = []
    while n_finished(ostudy) < n_trials:
        if claimed(ostudy) >= n_trials and not n_trials_in(ostudy, TrialState.WAITING):
            if fail_stale_trials(study, ostudy):
                continue  # their retries are queued now
            held = [t.number for t in storage.running_trials(ostudy)]
            if held != waiting_for:
                waiting_for = held
                study.log(f"tune: {model}: waiting for trial(s) {held} of other workers")
            if on_trial is not None:
                on_trial()
            time.sleep(WAIT_POLL_S)
            continue
        objective.reset()
        ostudy.optimize(
            objective, n_trials=1, catch=(Exception,), gc_after_trial=False, show_progress_bar=False
        )
        if objective.number is not None and not objective.surplus:
            failures += ostudy.get_trials(deepcopy=False)[objective.number].state == TrialState.FAIL
        if on_trial is not None:
            on_trial()
        if failures > cfg.tune.max_failed:
            raise StudyError(
                f"{failures} trials of {model} failed in this worker "
                f"(tune.max_failed={cfg.tune.max_failed}); "
                f"the last: {objective.error or 'see the trial run in mlflow ui'}"
            )


def fail_stale_trials(study: Study, ostudy: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker died (storage.dead_trials) and retry each; -> numbers."""
    return storage.fail_dead_trials(ostudy, lambda o, t: close_dead_trial(study, o, t))


def close_dead_trial(study: Study, ostudy: optuna.Study, trial: FrozenTrial) -> None:
    """After a dead worker's trial was failed: its MLflow run FAILED, its parent run KILLED when that run's
    owner is gone too, and its parameters queued for a retry while the budget has room."""
    from harness import tracking

    cfg = study.cfg
    tags = {"capsbench.study": cfg.name, "optuna.study": ostudy.study_name, "optuna.trial": str(trial.number)}
    for run_tags in tracking.end_running_runs(cfg.experiment, tags, "FAILED"):
        parent_id = run_tags.get("mlflow.parentRunId")
        parent_tags = tracking.running_run_tags(parent_id) if parent_id else None
        # its owner is gone: on this host when its process is; on another host nothing can be checked, but
        # a trial it held stopped its heartbeat (a live owner that lost a worker ends its parent run itself)
        if parent_tags is not None and tracking.owner_alive(parent_tags) is not True:
            tracking.mark_owner_gone(parent_id, parent_tags)
    retried = claimed(ostudy) < cfg.tune.n_trials and storage.enqueue_retry(ostudy, trial)
    worker = trial.user_attrs.get("worker", "an unknown worker")
    study.log(
        f"tune: trial {trial.number} of {ostudy.study_name} ({worker}) is dead: failed"
        + (", queued again with the same parameters" if retried else "")
    )


# ---------------------------------------------------------------------------------------------
# workers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneJob:
    """What one tune worker does; plain values, so that a spawned process can take it."""

    folder: str  # the study folder: the worker reads the resolved study file from it
    models: tuple[str, ...]
    storage_url: str | None
    workers: int
    fit_target: str
    parent_run_id: str
    worker: int = 0  # this worker's index (its sampler's seed offset)


def tune_worker(job: TuneJob, on_trial: Callable[[], None] | None = None) -> None:
    """One worker (any process, any machine): trials of each model in turn until its budget is used."""
    folder = Path(job.folder)
    study = Study(
        saved_config(folder),
        folder,
        storage_url=job.storage_url,
        workers=job.workers,
        fit_target=job.fit_target,
    )
    fit_fn = study.fit_function()
    for model in job.models:
        run_trials(
            study, model, worker=job.worker, fit_fn=fit_fn, parent_run_id=job.parent_run_id, on_trial=on_trial
        )


def run_workers(study: Study, models: list[str], parent) -> None:
    """Tune ``models`` with ``study.workers`` processes (inline for one), showing one progress bar."""
    n = study.cfg.tune.n_trials
    ostudies = {m: load_optuna(study, m) for m in models}

    def finished() -> dict[str, int]:
        return {m: n_finished(o) for m, o in ostudies.items()}

    bar = Progress(n * len(models), "tune", "trial", done=sum(finished().values()), log=study.log)

    def refresh() -> None:
        done = finished()
        note = ", ".join(f"{m} {k}/{n}" for m, k in done.items())
        if bar.tty:  # which trials run right now: only on the bar (a log line per change would be noise)
            running = [f"{m}#{t.number}" for m, o in ostudies.items() for t in storage.running_trials(o)]
            note += f"; running {', '.join(running) or '-'}"
        bar.set(sum(done.values()), note)

    refresh()
    job = TuneJob(
        folder=str(study.folder),
        models=tuple(models),
        storage_url=study.storage_url,
        workers=study.workers,
        fit_target=study.fit_target,
        parent_run_id=parent.run_id,
    )
    try:
        if study.workers <= 1:
            tune_worker(job, on_trial=refresh)
            return
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/MLflow state
        procs = [
            ctx.Process(target=tune_worker, args=(dataclasses.replace(job, worker=k),))
            for k in range(study.workers)
        ]
        for p in procs:
            p.start()
        try:
            while any(p.is_alive() for p in procs):
                refresh()
                time.sleep(1)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
        bad = [p.exitcode for p in procs if p.exitcode]
        if bad:
            raise StudyError(
                f"{len(bad)} tune worker(s) exited with {bad}; see the log above, "
                "then rerun the same command to resume"
            )
    finally:
        refresh()
        bar.close()


def record_best(study: Study, model: str, parent) -> dict[str, Any]:
    """Check ``model``'s finished budget and log its best trial and trials table into the parent run."""
    n = study.cfg.tune.n_trials
    ostudy = load_optuna(study, model)
    c = trial_counts(ostudy)
    if c["complete"] + c["pruned"] < n:
        raise StudyError(
            f"{model}: only {c['complete'] + c['pruned']} of {n} trials finished; rerun to resume"
        )
    if not c["complete"]:
        raise StudyError(f"{model}: no trial completed (all pruned); raise tune.n_startup_trials")
    best = ostudy.best_trial
    parent.log_metrics(
        {
            f"tune/{model}/best_val_error": best.value,
            f"tune/{model}/n_complete": c["complete"],
            f"tune/{model}/n_pruned": c["pruned"],
            f"tune/{model}/n_failed": c["fail"],
        }
    )
    parent.log_text(ostudy.trials_dataframe().to_csv(index=False), f"tune/{model}_trials.csv")
    study.log(f"tune: {model} best trial {best.number}, val error {best.value:.4f}, params {best.params}")
    return params_to_keys(model_family(model), best.params)
