"""Run a whole study: data -> tune -> train -> viewpoint -> attack -> report, resumable and parallel.

    python -m harness.study demo                          # what `make study NAME=demo` runs
    python -m harness.study synthnorb_azimuth --workers 2 --set tune.n_trials=12
    python -m harness.study smallnorb_azimuth --storage postgresql+psycopg://user:pw@host/optuna  # machines
    python -m harness.study demo --status                 # which stages and trials are done, what is left
    python -m harness.study demo --check                  # validate the study file and exit
    python -m harness.study --list                        # the study files in studies/

A study file ``studies/NAME.toml`` (see harness/study_config.py) names the models and the shared run
settings. The stages:

- ``data``: checks the dataset is there; renders synthnorb (harness.data.synthnorb) when it is missing.
- ``tune``: one Optuna study per model (``NAME.<model>``), the same trial budget for every model. Capsules
  search the λ schedule, final λ and the margin schedule; CNNs learning rate, dropout and weight decay.
  Objective: the lowest familiar-view validation error (validation images come from the training files).
  Seeded TPE sampler, median pruning on the per-epoch validation error. Every trial is an MLflow run nested
  under the study's parent run; pruned trials end KILLED, failed ones FAILED.
- ``train``: each model with its best parameters for the full budget (``run.train.epochs``), keeping a
  checkpoint per epoch for the matched protocol.
- ``viewpoint``: the matched novel-viewpoint protocol (harness/viewpoint.py) on the final runs, plus the
  error per (azimuth, elevation) cell of the matched checkpoints.
- ``attack``: the adversarial suite (harness.attack.attack_run) on the final models.
- ``report``: harness.report.write_report(NAME).

Everything is recorded (docs/contracts.md, "Study records"): MLflow holds the parent run, the trial runs
and the final runs; ``runs/studies/NAME/`` holds the resolved config, the stage markers (state.json) and
the Optuna journal. Run the same command again after an interruption: finished stages and trials are
reused; trials left RUNNING by a dead worker are failed and retried with the same parameters; an
interrupted final training resumes from its last completed epoch.

Scaling out: ``--workers N`` runs N local processes on each model's Optuna study. For many machines,
point every machine at one Optuna RDB (``--storage postgresql+psycopg://...``, harness/study_storage.py)
and one MLflow server (``MLFLOW_TRACKING_URI=http://host:5000``), and start the same command on each; the
study folder (state.json) is per machine, the trials are shared. A worker whose share of the budget is
taken waits for the trials other machines hold; a trial whose worker died (Optuna heartbeat older than
``tune.grace_period``, or a gone pid on this host) is failed, its MLflow run ended FAILED (the dead
machine's parent run KILLED), and its parameters queued again.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from tqdm.auto import tqdm

from harness import study_storage
from harness.config import ConfigError, dumps_toml, flatten, load_toml
from harness.study_config import (
    PROJECT_ROOT,
    StudyConfig,
    fingerprint,
    list_studies,
    load_study,
    model_family,
    run_config,
    study_from_dict,
    to_toml_dict,
)

DEFAULT_ROOT = PROJECT_ROOT / "runs" / "studies"
FIT = "harness.train:fit"  # what trials and final runs call; tests inject a fake with run_study(fit=...)
WAIT_POLL_S = 2  # a worker whose share of trials is done checks this often on the trials others hold

# Optuna parameter name -> RunConfig key it sets
PARAM_KEYS = {
    "capsule": {
        "lambda_schedule": "model.args.lambda_schedule",
        "final_lambda": "model.args.final_lambda",
        "margin_start": "loss.margin_start",
        "margin_end": "loss.margin_end",
        "margin_ramp_epochs": "loss.margin_ramp_epochs",
    },
    "cnn": {"lr": "optim.lr", "dropout": "model.args.dropout", "weight_decay": "optim.weight_decay"},
}
LOG_PARAMS = {"final_lambda", "lr", "weight_decay"}


class StudyError(RuntimeError):
    """A study that cannot go on; the message says what to do."""


class SurplusTrial(Exception):
    """A trial asked for after the budget was used up by other workers; it is failed and not counted."""


# ---------------------------------------------------------------------------------------------
# the study folder: resolved config + stage markers
# ---------------------------------------------------------------------------------------------


@dataclass
class Study:
    cfg: StudyConfig
    folder: Path
    storage_url: str | None  # None = the journal file in the folder
    workers: int
    fit: str = FIT

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    def state(self) -> dict[str, Any]:
        if self.state_file.is_file():
            return json.loads(self.state_file.read_text())
        return {
            "name": self.cfg.name,
            "experiment": self.cfg.experiment,
            "parent_run_id": None,
            "stages": {},
            "best_params": {},
            "final_runs": {},
            "final_history": {},
            "attacked": [],
        }

    def update_state(self, **changes: Any) -> dict[str, Any]:
        state = self.state()
        state.update(changes)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.state_file)  # atomic: a kill never leaves half a state file
        return state

    def done(self, stage: str) -> bool:
        return bool(self.state()["stages"].get(stage, {}).get("done"))

    def log(self, message: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        tqdm.write(f"[{self.cfg.name}] {message}")
        with open(self.folder / "study.log", "a") as f:
            f.write(f"{stamp} {message}\n")


def open_study(
    cfg: StudyConfig, root: Path, *, storage: str | None, workers: int, fresh: bool, fit: str = FIT
) -> Study:
    """Create or reopen the study folder; a rerun must not change settings that finished work used."""
    folder = Path(root) / cfg.name
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved = folder / "study.toml"
    if saved.is_file():
        old = fingerprint(study_from_dict(load_toml(saved)))
        new = fingerprint(cfg)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            k = changed[0]
            raise StudyError(
                f"study {cfg.name!r} in {folder} was started with {k}={old.get(k)!r}, now {new.get(k)!r} "
                f"({len(changed)} setting(s) differ); rerun with the original settings, "
                "or pass --fresh to start over"
            )
    saved.write_text(dumps_toml(to_toml_dict(cfg)))
    return Study(cfg, folder, storage, workers, fit)


# ---------------------------------------------------------------------------------------------
# MLflow: the parent run and lookups (through harness.tracking, the only module that imports mlflow)
# ---------------------------------------------------------------------------------------------


def open_parent_run(study: Study):
    from harness import tracking

    state = study.state()
    run_id = state.get("parent_run_id")
    if run_id:
        try:
            run = tracking.resume_run(run_id, system_metrics=False)
            run.log_text(dumps_toml(to_toml_dict(study.cfg)), "study.toml")  # settings allowed to change
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
    run.log_params(flatten(to_toml_dict(cfg)))
    run.log_text(dumps_toml(to_toml_dict(cfg)), "study.toml")
    study.update_state(parent_run_id=run.run_id)
    return run


def find_runs(experiment: str, tags: dict[str, str], statuses: tuple[str, ...] = ()) -> list:
    """MLflow runs of ``experiment`` carrying all ``tags`` (newest first), optionally by status."""
    from harness import tracking

    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = tracking.client().search_runs(
        [tracking.experiment_id(experiment)], query, order_by=["start_time DESC"]
    )
    return [r for r in runs if not statuses or r.info.status in statuses]


# ---------------------------------------------------------------------------------------------
# tune: one Optuna study per model, N local workers, equal budgets
# ---------------------------------------------------------------------------------------------


def optuna_storage(study: Study):
    """The study's journal file, or the shared RDB (``--storage``) with Optuna's heartbeat on."""
    if study.storage_url:
        t = study.cfg.tune
        return study_storage.rdb_storage(
            study.storage_url,
            heartbeat_interval=t.heartbeat_interval,
            grace_period=t.grace_period,
            on_stale=lambda ostudy, trial: close_dead_trial(study, ostudy, trial),
        )
    return study_storage.journal_storage(str(study.folder / "optuna.journal"))


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
        study_name=f"{study.cfg.name}.{model}",
        storage=optuna_storage(study),
        sampler=sampler,
        pruner=pruner,
        direction="minimize",
        load_if_exists=True,
    )


def suggest(trial: optuna.Trial, family: str, cfg: StudyConfig) -> dict[str, Any]:
    """Sample the family's search space -> {RunConfig key: value}."""
    space = cfg.tune.capsule if family == "capsule" else cfg.tune.cnn
    out = {}
    for name, key in PARAM_KEYS[family].items():
        bounds = getattr(space, name)
        if name == "lambda_schedule":
            out[key] = trial.suggest_categorical(name, list(bounds))
        else:
            out[key] = trial.suggest_float(name, bounds[0], bounds[1], log=name in LOG_PARAMS)
    return out


def params_to_keys(family: str, params: dict[str, Any]) -> dict[str, Any]:
    return {PARAM_KEYS[family][k]: v for k, v in params.items() if k in PARAM_KEYS[family]}


def trial_run_config(study: Study, model: str, params: dict[str, Any]):
    """A trial's RunConfig: the study's run settings, tuning epochs/limits, the sampled params."""
    cfg = study.cfg
    extra = dict(params)
    if cfg.tune.epochs:
        extra["train.epochs"] = cfg.tune.epochs
    if cfg.tune.limit_train:
        extra["data.limit_train"] = cfg.tune.limit_train
    extra["train.save_every"] = 0  # trials keep only best/final/resume checkpoints
    extra["train.system_metrics"] = False
    run = run_config(cfg, model, extra)
    if study.workers > 1 and not run.train.threads:
        run.train.threads = max(1, (os.cpu_count() or 1) // study.workers)
    run.run_name = f"{model}-trial"
    return run


def trial_counts(ostudy: optuna.Study) -> dict[str, int]:
    """Trials by state (surplus asks left out); the budget counts complete + pruned."""
    counts = {"complete": 0, "pruned": 0, "running": 0, "fail": 0, "waiting": 0}
    for t in ostudy.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def claimed(ostudy: optuna.Study, below: int | None = None) -> int:
    """Trials that hold a share of the budget: finished (complete, pruned), running or queued (waiting).

    With ``below``, only those numbered below it: of two trials asked at once, the lower number wins.
    """
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    trials = ostudy.get_trials(deepcopy=False, states=states)
    return sum(1 for t in trials if below is None or t.number < below)


def finished(ostudy: optuna.Study) -> int:
    return len(ostudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def tune_worker(
    folder: str,
    models: list[str],
    worker: int,
    storage_url: str | None,
    workers: int,
    fit: str,
    parent_run_id: str,
    on_trial: Callable[[], None] | None = None,
) -> None:
    """One worker (any process, any machine): trials of each model in turn until its budget is used."""
    cfg = study_from_dict(load_toml(Path(folder) / "study.toml"))
    study = Study(cfg, Path(folder), storage_url, workers, fit)
    fit_fn = resolve(fit)
    for model in models:
        run_trials(study, model, worker, fit_fn, parent_run_id, on_trial)


def run_trials(
    study: Study,
    model: str,
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
    family = model_family(model)
    ostudy = load_optuna(study, model, worker)
    n_trials, failures = cfg.tune.n_trials, 0
    mine: dict[str, Any] = {}  # what this worker's last trial did

    def objective(trial: optuna.Trial) -> float:
        mine["number"] = trial.number
        if claimed(ostudy, below=trial.number) >= n_trials:
            mine["surplus"] = True
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} is over the budget of {n_trials}")
        trial.set_user_attr("worker", study_storage.worker_id())
        params = suggest(trial, family, cfg)
        run_cfg = trial_run_config(study, model, params)
        tags = {
            "capsbench.kind": "trial",
            "capsbench.role": "tune",
            "capsbench.study": cfg.name,
            "capsbench.model": model,
            "capsbench.family": family,
            "optuna.study": ostudy.study_name,
            "optuna.trial": str(trial.number),
        }

        def on_epoch(epoch: int, metrics: dict) -> bool:
            value = metrics.get("val_error")
            if value is None or not math.isfinite(value):
                return False
            trial.report(float(value), epoch)
            return trial.should_prune()

        try:
            result = fit_fn(run_cfg, parent_run_id=parent_run_id, tags=tags, epoch_callback=on_epoch)
        except Exception as e:
            mine["error"] = f"{type(e).__name__}: {e}"
            raise
        trial.set_user_attr("mlflow_run_id", result.run_id)
        if result.pruned:
            raise optuna.TrialPruned(f"pruned after epoch {len(result.history)}")
        values = [h["val_error"] for h in result.history if math.isfinite(h.get("val_error", math.nan))]
        if not values:
            mine["error"] = "no finite val_error in the history"
            raise StudyError(f"trial {trial.number} of {model} logged no finite val_error")
        return min(values)

    waiting_for: list[int] = []
    while finished(ostudy) < n_trials:
        if claimed(ostudy) >= n_trials and not _queued(ostudy):
            if fail_stale_trials(study, ostudy):
                continue  # their retries are queued now
            held = [t.number for t in ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
            if held != waiting_for:
                waiting_for = held
                study.log(f"tune: {model}: waiting for trial(s) {held} of other workers")
            if on_trial is not None:
                on_trial()
            time.sleep(WAIT_POLL_S)
            continue
        mine.clear()
        ostudy.optimize(
            objective, n_trials=1, catch=(Exception,), gc_after_trial=False, show_progress_bar=False
        )
        if "number" in mine and not mine.get("surplus"):
            failures += ostudy.get_trials(deepcopy=False)[mine["number"]].state == TrialState.FAIL
        if on_trial is not None:
            on_trial()
        if failures > cfg.tune.max_failed:
            raise StudyError(
                f"{failures} trials of {model} failed in this worker "
                f"(tune.max_failed={cfg.tune.max_failed}); "
                f"the last: {mine.get('error', 'see the trial run in mlflow ui')}"
            )


def _queued(ostudy: optuna.Study) -> int:
    return len(ostudy.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def fail_stale_trials(study: Study, ostudy: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker died (study_storage.dead_trials) and retry each; -> numbers."""
    return study_storage.fail_dead_trials(ostudy, lambda o, t: close_dead_trial(study, o, t))


def close_dead_trial(study: Study, ostudy: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """After a dead worker's trial was failed: its MLflow run FAILED, the parent run of a dead study
    process KILLED, and its parameters queued for a retry while the budget has room."""
    from harness import tracking

    cfg = study.cfg
    tags = {"capsbench.study": cfg.name, "optuna.study": ostudy.study_name, "optuna.trial": str(trial.number)}
    for run_tags in tracking.end_running_runs(cfg.experiment, tags, "FAILED"):
        parent_id = run_tags.get("mlflow.parentRunId")
        parent_tags = tracking.running_run_tags(parent_id) if parent_id else None
        runner = (parent_tags or {}).get("capsbench.runner", "")
        # the runner's process is gone: on this host when its pid is; on another one, its trial's
        # heartbeat stopped (a live runner that lost a worker process ends its parent run itself)
        if parent_tags is not None and runner != study_storage.worker_id():
            if study_storage.process_gone(runner) is not False:
                tracking.end_run(parent_id, "KILLED")
    retried = claimed(ostudy) < cfg.tune.n_trials and study_storage.enqueue_retry(ostudy, trial)
    worker = trial.user_attrs.get("worker", "an unknown worker")
    study.log(
        f"tune: trial {trial.number} of {ostudy.study_name} ({worker}) is dead: failed"
        + (", queued again with the same parameters" if retried else "")
    )


def run_workers(study: Study, models: list[str], parent) -> None:
    """Tune ``models`` with ``study.workers`` processes (inline for one), showing one progress bar."""
    n = study.cfg.tune.n_trials
    ostudies = {m: load_optuna(study, m) for m in models}
    bar = tqdm(total=n * len(models), desc="tune", unit="trial", dynamic_ncols=True)

    def refresh() -> None:
        counts = {m: trial_counts(o) for m, o in ostudies.items()}
        bar.n = sum(c["complete"] + c["pruned"] for c in counts.values())
        running = [
            f"{m}#{t.number}"
            for m, o in ostudies.items()
            for t in o.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        ]
        done = ", ".join(f"{m} {c['complete'] + c['pruned']}/{n}" for m, c in counts.items())
        bar.set_postfix_str(f"{done}; running {', '.join(running) or '-'}")
        bar.refresh()

    refresh()
    args = (str(study.folder), models, 0, study.storage_url, study.workers, study.fit, parent.run_id)
    try:
        if study.workers <= 1:
            tune_worker(*args, on_trial=refresh)
            return
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: no forked torch/MLflow state
        procs = [
            ctx.Process(target=tune_worker, args=(*args[:2], k, *args[3:])) for k in range(study.workers)
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


# ---------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------


def data_root(cfg: StudyConfig) -> str:
    """The dataset's folder: run.data.root (made absolute by load_study), else <data root>/<name>."""
    from harness import data

    return cfg.run.data.root or str(data.dataset_folder(cfg.run.data.name))


def stage_data(study: Study, parent) -> None:
    from harness import data

    cfg = study.cfg
    root = data_root(cfg)
    try:
        data.get_dataset(cfg.run.data.name, "test", root=root, channels=cfg.run.data.channels)
        study.log(f"data: {cfg.run.data.name} found in {root}")
        if cfg.run.data.name == "synthnorb":
            from harness.data import synthnorb

            made = (synthnorb.read_manifest(root) or {}).get("options", {})
            want = {k: v for k, v in vars(cfg.synthnorb).items() if k in made and made[k] != v}
            if want:
                study.log(
                    f"data: note: {root} was rendered with {made}, the study asks for {want}; "
                    "delete the folder to re-render"
                )
        return
    except data.DataError as e:
        missing = e
    if cfg.run.data.name != "synthnorb":
        if cfg.run.data.name == "smallnorb":
            raise StudyError(
                f"smallNORB is not in {root}: run `python -m harness.data download smallnorb` "
                f"(or set CAPSBENCH_DATA), then rerun ({missing})"
            )
        raise StudyError(f"dataset {cfg.run.data.name} is not usable: {missing}")
    from harness.data import synthnorb

    s = cfg.synthnorb
    study.log(
        f"data: rendering synthnorb into {root} ({s.image_size}px, {s.lightings} lightings, "
        f"{s.elevations} elevations, {s.instances} instances)"
    )
    synthnorb.synthesize(
        root, image_size=s.image_size, lightings=s.lightings, elevations=s.elevations, instances=s.instances
    )
    data.get_dataset(cfg.run.data.name, "test", root=root, channels=cfg.run.data.channels)


def stage_tune(study: Study, parent) -> None:
    cfg = study.cfg
    best = dict(study.state()["best_params"])
    pending = [m for m in cfg.models if m not in best]
    if cfg.tune.n_trials == 0:
        study.log("tune: tune.n_trials = 0, training every model with the [run] settings as they are")
        best.update({m: {} for m in pending})
        pending = []
    for model in pending:
        fail_stale_trials(study, load_optuna(study, model))  # logs each trial it fails
    if pending:
        study.log(f"tune: {', '.join(pending)}: {cfg.tune.n_trials} trials each, {study.workers} worker(s)")
        run_workers(study, pending, parent)
    for model in pending:
        best[model] = record_best(study, model, parent)
        study.update_state(best_params=best)
    study.update_state(best_params=best)
    parent.log_json(best, "tune/best_params.json")


def final_run_config(study: Study, model: str):
    cfg = study.cfg
    run = run_config(cfg, model, study.state()["best_params"].get(model, {}))
    if cfg.run.data.view != "none" and "viewpoint" in cfg.stages:
        run.train.save_every = 1  # the matched protocol reloads the checkpoint of any epoch
    run.run_name = f"{model}-final"
    return run


def stage_train(study: Study, parent) -> None:
    from harness import tracking

    cfg = study.cfg
    fit_fn = resolve(study.fit)
    for model in cfg.models:
        state = study.state()
        if model in state["final_runs"]:
            continue
        tags = {
            "capsbench.kind": "train",
            "capsbench.role": "final",
            "capsbench.study": cfg.name,
            "capsbench.model": model,
            "capsbench.family": model_family(model),
        }
        # a final run of this parent that did not get recorded (killed mid-run, or just after it ended)
        earlier = find_runs(
            cfg.experiment, {k: tags[k] for k in ("capsbench.study", "capsbench.role", "capsbench.model")}
        )
        earlier = [r for r in earlier if r.data.tags.get("mlflow.parentRunId") == parent.run_id]
        resume = earlier[0].info.run_id if earlier else None
        if resume:
            try:
                tracking.load_resume_state(resume)
            except tracking.TrackingError:
                resume = None  # died before its first epoch: start over
        study.log(f"train: {model}" + (f" (resuming run {resume})" if resume else ""))
        result = fit_fn(
            final_run_config(study, model), parent_run_id=parent.run_id, tags=tags, resume_run_id=resume
        )
        parent.set_tags({f"capsbench.final.{model}": result.run_id})
        study.update_state(
            final_runs={**state["final_runs"], model: result.run_id},
            final_history={**state["final_history"], model: result.history},
        )


def stage_viewpoint(study: Study, parent) -> None:
    from harness import data
    from harness import viewpoint as vp
    from harness.evaluate import plot_viewpoint_heatmap

    cfg = study.cfg
    if cfg.run.data.view == "none" or len(cfg.models) < 2:
        study.log("viewpoint: no view split (run.data.view = none) or a single model; nothing to match")
        return
    state = study.state()
    families = {m: model_family(m) for m in cfg.models}
    result = vp.match_checkpoints(
        {m: state["final_history"][m] for m in cfg.models},
        families=families,
        view=cfg.run.data.view,
        reference=cfg.viewpoint.reference,
        run_ids=state["final_runs"],
    )
    table = vp.format_matched(result)
    study.log("viewpoint:\n" + table)
    test = data.get_dataset(
        cfg.run.data.name,
        "test",
        view=cfg.run.data.view,
        subset="all",
        channels=cfg.run.data.channels,
        root=data_root(cfg),
    )
    index = vp.sample_indices(len(test), cfg.viewpoint.limit_test, cfg.viewpoint.seed)
    if len(index) < len(test):
        import torch

        test = test.select(torch.as_tensor(index))
    frames = []
    out = study.folder / "viewpoint"
    out.mkdir(exist_ok=True)
    for m in tqdm(result.models.values(), desc="viewpoint cells", unit="model", dynamic_ncols=True):
        cells = vp.checkpoint_cells(m.run_id, m.matched_epoch, test, batch_size=cfg.run.data.eval_batch_size)
        cells.insert(0, "family", m.family)
        cells.insert(0, "model", m.model)
        frames.append(cells)
        grid = cells.pivot(index="elevation", columns="azimuth", values="error")
        png = plot_viewpoint_heatmap(
            grid, out / f"heatmap_{m.model}.png", f"{m.model}, matched epoch {m.matched_epoch}"
        )
        parent.log_file(png, "viewpoint")
    import pandas as pd

    cells = pd.concat(frames, ignore_index=True)
    (out / "cells.csv").write_text(cells.to_csv(index=False))
    (out / "matched.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "matched.md").write_text(table + "\n")
    parent.log_metrics(vp.parent_metrics(result))
    parent.log_text(cells.to_csv(index=False), "viewpoint/cells.csv")
    parent.log_json(result.to_dict(), "viewpoint/matched.json")


def stage_attack(study: Study, parent) -> None:
    from harness.attack import attack_run

    a = study.cfg.attack
    for model, run_id in study.state()["final_runs"].items():
        if model in study.state()["attacked"]:
            continue
        study.log(f"attack: {model} ({', '.join(a.attacks)} at eps {a.eps}, {a.n_examples} images)")
        report = attack_run(
            run_id,
            attacks=a.attacks,
            eps=a.eps,
            losses=a.losses,
            targeted=a.targeted,
            steps=a.steps,
            n_examples=a.n_examples,
            device=a.device,
            seed=a.seed,
            checks=a.checks,
            check_examples=a.check_examples,
            check_steps=a.check_steps,
        )
        if getattr(report, "flags", None):
            study.log(f"attack: {model} gradient-masking flags: {report.flags}")
        study.update_state(attacked=[*study.state()["attacked"], model])


def stage_report(study: Study, parent) -> None:
    from harness.report import write_report

    path = write_report(study.cfg.name)
    study.log(f"report: {path}")


STAGE_FUNCS = {
    "data": stage_data,
    "tune": stage_tune,
    "train": stage_train,
    "viewpoint": stage_viewpoint,
    "attack": stage_attack,
    "report": stage_report,
}


def run_study(
    cfg: StudyConfig,
    *,
    root: Path = DEFAULT_ROOT,
    storage: str | None = None,
    workers: int = 1,
    fresh: bool = False,
    fit: str = FIT,
) -> Study:
    """Run every stage in ``cfg.stages`` that is not done yet; the parent run ends FINISHED when all are."""
    study = open_study(cfg, root, storage=storage, workers=workers, fresh=fresh, fit=fit)
    parent = open_parent_run(study)
    parent.set_tags({"capsbench.runner": study_storage.worker_id()})  # who holds it (dead-parent check)
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


# ---------------------------------------------------------------------------------------------
# status view
# ---------------------------------------------------------------------------------------------


def status_text(cfg: StudyConfig, root: Path = DEFAULT_ROOT, storage: str | None = None) -> str:
    """Which stages are done, how far each model's tuning is, the final runs, and what is left."""
    folder = Path(root) / cfg.name
    if not (folder / "state.json").is_file():
        return f"study {cfg.name}: not started (folder {folder})"
    study = Study(cfg, folder, storage, 1)
    state = study.state()
    lines = [f"study {cfg.name}: folder {folder}, parent run {state.get('parent_run_id')}"]
    for stage in cfg.stages:
        s = state["stages"].get(stage)
        current = "running (or interrupted)" if stage == state.get("current") else "to do"
        lines.append(f"  {stage:<10} " + (f"done ({s['seconds']}s)" if s else current))
    for model in cfg.models:
        try:
            ostudy = optuna.load_study(study_name=f"{cfg.name}.{model}", storage=optuna_storage(study))
        except KeyError:  # not created yet
            ostudy = None
        c = trial_counts(ostudy) if ostudy else {}
        dead = study_storage.dead_trials(ostudy) if ostudy else []
        tuned = "tuned" if model in state["best_params"] else "tuning"
        run = state["final_runs"].get(model, "-")
        lines.append(
            f"  {model}: {tuned} {c.get('complete', 0)} complete, {c.get('pruned', 0)} pruned, "
            f"{c.get('running', 0) - len(dead)} running, {len(dead)} dead, {c.get('fail', 0)} failed "
            f"of {cfg.tune.n_trials}; final run {run}"
        )
        for t in dead:
            worker = t.user_attrs.get("worker", "an unknown worker")
            lines.append(
                f"    dead: trial {t.number} of {worker} (process gone or no heartbeat within "
                "tune.grace_period); a running study fails it and retries its parameters"
            )
    matched = folder / "viewpoint" / "matched.md"
    if matched.is_file():
        lines += ["", matched.read_text().rstrip()]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def resolve(path: str) -> Callable:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


@contextmanager
def single_runner(root: Path, name: str):
    """One `python -m harness.study NAME` per study folder at a time (its workers are its children).

    The lock file sits beside the folder (``<root>/.NAME.lock``) so that --fresh can delete the folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(
                f"study {name} is already running on this machine ({root / f'.{name}.lock'}); wait for it, "
                "or add workers from another machine with --storage"
            ) from None
        yield


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.study",
        description="Run a study (studies/NAME.toml): tune, train, matched viewpoint protocol, attacks, "
        "report. Rerun the same command to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("name", nargs="?", help="study name (studies/NAME.toml) or path to a study file")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a study setting, e.g. --set tune.n_trials=4 --set train.epochs=3 (run.train.epochs); "
        "type-checked, unknown keys are errors; repeatable",
    )
    p.add_argument("--workers", type=int, default=1, help="local worker processes sharing the Optuna studies")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna RDB URL shared by machines, e.g. postgresql+psycopg://user:pw@host/optuna (driver: "
        "pip install -e '.[scale]'); default: a journal file in the study folder",
    )
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where study folders live")
    p.add_argument("--fresh", action="store_true", help="delete the study folder and start over")
    p.add_argument("--status", action="store_true", help="print what is done and what is left, then exit")
    p.add_argument("--check", action="store_true", help="validate the study file and print it resolved")
    p.add_argument("--list", action="store_true", help="list the study files and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print("\n".join(list_studies()))
        return 0
    if not args.name:
        print("error: name a study, e.g. `python -m harness.study demo` (--list shows them)", file=sys.stderr)
        return 2
    from harness.data import DataError
    from harness.study_storage import StorageError
    from harness.tracking import TrackingError, tracking_uri
    from harness.train import TrainingError

    try:
        if args.workers < 1:
            raise ConfigError(f"--workers must be >= 1, got {args.workers}")
        cfg = load_study(args.name, args.overrides)
        if args.check:
            print(dumps_toml(to_toml_dict(cfg)), end="")
            return 0
        # a missing driver or an unreachable database fails here, before anything is created
        study_storage.check_tracking_uri(tracking_uri())
        if args.storage:
            study_storage.check_storage(args.storage)
        if args.status:
            print(status_text(cfg, args.root, args.storage))
            return 0
        t0 = time.perf_counter()
        with single_runner(args.root, cfg.name):
            study = run_study(
                cfg, root=args.root, storage=args.storage, workers=args.workers, fresh=args.fresh
            )
        print(status_text(cfg, args.root, args.storage))
        print(f"study {cfg.name} finished in {time.perf_counter() - t0:.0f}s (folder {study.folder})")
    except (ConfigError, StudyError, StorageError, DataError, TrackingError, TrainingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
