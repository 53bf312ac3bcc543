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
  checkpoint per epoch for the matched protocol; once per seed when the study lists ``seeds``.
- ``viewpoint``: the matched novel-viewpoint protocol (harness/viewpoint.py) on the final runs, plus the
  error per (azimuth, elevation) cell of the matched checkpoints.
- ``attack``: the adversarial suite (harness.attack.attack_run) on the final models (every seed's).
- ``report``: harness.report.write_report(NAME).

Each stage reports its progress with an estimate of the time left (harness/progress.py: bars on a
terminal, lines in logs); the study prints the MLflow UI link to its runs when it starts and ends.

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
import shlex
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
from harness.errors import CapsbenchError, cli_errors
from harness.paths import PROJECT_ROOT
from harness.progress import Progress
from harness.study_config import (
    StudyConfig,
    fingerprint,
    list_studies,
    load_study,
    model_family,
    run_config,
    study_from_dict,
    study_seeds,
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
        "lr": "optim.lr",
    },
    "cnn": {"lr": "optim.lr", "dropout": "model.args.dropout", "weight_decay": "optim.weight_decay"},
}
LOG_PARAMS = {"final_lambda", "lr", "weight_decay"}


class StudyError(CapsbenchError, RuntimeError):
    """A study that cannot go on; the message says what to do."""

    exit_code = 1


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
            state = json.loads(self.state_file.read_text())
            first = str(study_seeds(self.cfg)[0])  # a folder from before seeds: its runs are the first seed's
            state.setdefault("seed_runs", {m: {first: r} for m, r in state.get("final_runs", {}).items()})
            state.setdefault(
                "seed_history", {m: {first: h} for m, h in state.get("final_history", {}).items()}
            )
            state.setdefault("attacked_runs", [])
            return state
        return {
            "name": self.cfg.name,
            "experiment": self.cfg.experiment,
            "parent_run_id": None,
            "stages": {},
            "best_params": {},
            "final_runs": {},
            "final_history": {},
            "seed_runs": {},
            "seed_history": {},
            "attacked": [],
            "attacked_runs": [],
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
    tracking.share_runs_view(run.experiment_id)  # the report adds the comparison's columns
    run.log_params(flatten(to_toml_dict(cfg)))
    run.log_text(dumps_toml(to_toml_dict(cfg)), "study.toml")
    study.update_state(parent_run_id=run.run_id)
    return run


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


def n_finished(ostudy: optuna.Study) -> int:
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
        run_cfg.run_name = f"trial {trial.number} · {model}"  # how the MLflow runs table lists it
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
    while n_finished(ostudy) < n_trials:
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

    def finished() -> dict[str, int]:
        counts = {m: trial_counts(o) for m, o in ostudies.items()}
        return {m: c["complete"] + c["pruned"] for m, c in counts.items()}

    bar = Progress(n * len(models), "tune", "trial", done=sum(finished().values()), log=study.log)

    def refresh() -> None:
        done = finished()
        note = ", ".join(f"{m} {k}/{n}" for m, k in done.items())
        if bar.tty:  # which trials run right now: only on the bar (a log line per change would be noise)
            running = [
                f"{m}#{t.number}"
                for m, o in ostudies.items()
                for t in o.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            ]
            note += f"; running {', '.join(running) or '-'}"
        bar.set(sum(done.values()), note)

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
                f"smallNORB is not in {root}: run "
                f"`python -m harness.data download smallnorb --root {shlex.quote(str(root))}` "
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


def final_run_config(study: Study, model: str, seed: int | None = None):
    cfg = study.cfg
    run = run_config(cfg, model, study.state()["best_params"].get(model, {}))
    if cfg.run.data.view != "none" and "viewpoint" in cfg.stages:
        run.train.save_every = 1  # the matched protocol reloads the checkpoint of any epoch
    if cfg.seeds:  # else the seed of [run] / [per_model] as it is
        run.train.seed = cfg.seeds[0] if seed is None else seed
    run.run_name = f"final · {model}" + (f" · seed {run.train.seed}" if len(cfg.seeds) > 1 else "")
    return run


def final_runs(study: Study) -> list[tuple[str, int, str]]:
    """(model, seed, run id) of every finished final training, in the study's seed and model order."""
    seed_runs = study.state().get("seed_runs", {})
    return [
        (m, s, seed_runs[m][str(s)])
        for s in study_seeds(study.cfg)
        for m in study.cfg.models
        if str(s) in seed_runs.get(m, {})
    ]


def stage_train(study: Study, parent) -> None:
    """Each model with its best parameters, once per seed (``seeds``; default one), resumable per run."""
    from harness import tracking

    cfg = study.cfg
    fit_fn = resolve(study.fit)
    seeds = study_seeds(cfg)
    done = study.state()["seed_runs"]
    todo = [(s, m) for s in seeds for m in cfg.models if str(s) not in done.get(m, {})]
    epochs = {m: final_run_config(study, m).train.epochs for m in cfg.models}
    total = sum(epochs[m] for s in seeds for m in cfg.models)
    bar = Progress(total, "train", "epoch", done=total - sum(epochs[m] for _, m in todo), log=study.log)
    try:
        for seed, model in todo:
            state = study.state()
            run_cfg = final_run_config(study, model, seed)
            tags = {
                "capsbench.kind": "train",
                "capsbench.role": "final",
                "capsbench.study": cfg.name,
                "capsbench.model": model,
                "capsbench.family": model_family(model),
                "capsbench.seed": str(run_cfg.train.seed),
            }
            # a final run of this parent that did not get recorded (killed mid-run, or just after it ended)
            keys = ("capsbench.study", "capsbench.role", "capsbench.model", "capsbench.seed")
            earlier = tracking.find_runs({k: tags[k] for k in keys}, experiment=cfg.experiment)
            earlier = [r for r in earlier if r.parent_id == parent.run_id]
            resume = earlier[0].run_id if earlier else None
            base = bar.done  # epochs of the runs before this one
            if resume:
                try:
                    bar.skip(int(tracking.load_resume_state(resume).get("epoch", 0)))
                except tracking.CheckpointFileError as e:
                    study.log(f"train: not resuming run {resume}: {e}")
                    resume = None
                except tracking.TrackingError:
                    resume = None  # died before its first epoch: start over
            which = f"{model}" + (f" seed {seed}" if len(seeds) > 1 else "")
            study.log(f"train: {which}" + (f" (resuming run {resume})" if resume else ""))

            def on_epoch(epoch: int, metrics: dict, base=base, which=which, model=model) -> bool:
                bar.set(base + epoch, f"{which} epoch {epoch}/{epochs[model]}")
                return False  # progress only: a final training is never stopped early

            result = fit_fn(
                run_cfg,
                parent_run_id=parent.run_id,
                tags=tags,
                resume_run_id=resume,
                epoch_callback=on_epoch,
            )
            seed_runs, seed_history = state["seed_runs"], state["seed_history"]
            changes = {
                "seed_runs": {**seed_runs, model: {**seed_runs.get(model, {}), str(seed): result.run_id}},
                "seed_history": {
                    **seed_history,
                    model: {**seed_history.get(model, {}), str(seed): result.history},
                },
            }
            if seed == seeds[0]:  # the first seed's run is the model's final run (one run per model)
                parent.set_tags({f"capsbench.final.{model}": result.run_id})
                changes["final_runs"] = {**state["final_runs"], model: result.run_id}
                changes["final_history"] = {**state["final_history"], model: result.history}
            study.update_state(**changes)
    finally:
        bar.close()


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
    bar = Progress(len(result.models), "viewpoint cells", "model", log=study.log)
    for m in result.models.values():
        cells = vp.checkpoint_cells(m.run_id, m.matched_epoch, test, batch_size=cfg.run.data.eval_batch_size)
        bar.update(1, m.model)
        cells.insert(0, "family", m.family)
        cells.insert(0, "model", m.model)
        frames.append(cells)
        grid = cells.pivot(index="elevation", columns="azimuth", values="error")
        png = plot_viewpoint_heatmap(
            grid, out / f"heatmap_{m.model}.png", f"{m.model}, matched epoch {m.matched_epoch}"
        )
        parent.log_file(png, "viewpoint")
    bar.close()
    import pandas as pd

    cells = pd.concat(frames, ignore_index=True)
    (out / "cells.csv").write_text(cells.to_csv(index=False))
    (out / "matched.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "matched.md").write_text(table + "\n")
    parent.log_metrics(vp.parent_metrics(result))
    parent.log_text(cells.to_csv(index=False), "viewpoint/cells.csv")
    parent.log_json(result.to_dict(), "viewpoint/matched.json")
    if len(study_seeds(cfg)) > 1:
        compare_seed_runs(study, parent, families)


def compare_seed_runs(study: Study, parent, families: dict[str, str]) -> None:
    """The matched protocol once per seed (models paired by seed) and the comparison over seeds."""
    from harness import viewpoint as vp

    cfg, state = study.cfg, study.state()
    results = {}
    for seed in study_seeds(cfg):
        histories = {m: state["seed_history"].get(m, {}).get(str(seed)) for m in cfg.models}
        if any(h is None for h in histories.values()):
            continue  # a seed without every model's final run cannot be paired
        results[seed] = vp.match_checkpoints(
            histories,
            families=families,
            view=cfg.run.data.view,
            reference=cfg.viewpoint.reference,
            run_ids={m: state["seed_runs"][m][str(seed)] for m in cfg.models},
        )
    comparison = vp.compare_seeds(results)
    record = {**comparison.to_dict(), "matches": {str(s): r.to_dict() for s, r in results.items()}}
    out = study.folder / "viewpoint"
    out.mkdir(exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(record, indent=2))
    parent.log_json(record, "viewpoint/seeds.json")
    parent.log_metrics(vp.seed_parent_metrics(comparison))
    novel = ", ".join(f"{m} {e:pct}" for m, e in comparison.novel.items())
    study.log(f"viewpoint over seeds {comparison.seeds}: matched novel error {novel}; {comparison.verdict()}")


def stage_attack(study: Study, parent) -> None:
    """The attack suite on every final run (every seed), resumable per run."""
    from harness.attack import attack_run

    a = study.cfg.attack
    runs = final_runs(study)
    many = len(study_seeds(study.cfg)) > 1
    todo = [r for r in runs if r[2] not in study.state()["attacked_runs"]]
    bar = Progress(len(runs), "attack", "run", done=len(runs) - len(todo), log=study.log)
    try:
        for model, seed, run_id in todo:
            which = f"{model}" + (f" seed {seed}" if many else "")
            study.log(f"attack: {which} ({', '.join(a.attacks)} at eps {a.eps}, {a.n_examples} images)")
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
                progress=bar.tty,
            )
            if getattr(report, "flags", None):
                study.log(f"attack: {which} gradient-masking flags: {report.flags}")
            state = study.state()
            attacked_runs = [*state["attacked_runs"], run_id]
            done_models = [
                m for m in study.cfg.models if all(r in attacked_runs for mm, _, r in runs if mm == m)
            ]
            study.update_state(attacked_runs=attacked_runs, attacked=done_models)
            bar.update(1, which)
    finally:
        bar.close()


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
    from harness import tracking

    check_runs(cfg)  # before the folder records (and locks in) any setting
    study = open_study(cfg, root, storage=storage, workers=workers, fresh=fresh, fit=fit)
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


# ---------------------------------------------------------------------------------------------
# run settings check (what harness.train checks, for every model, before any work)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# status view
# ---------------------------------------------------------------------------------------------


def runner_active(root: Path, name: str) -> bool:
    """Whether a `python -m harness.study NAME` process holds the study's lock (see single_runner)."""
    lock = root / f".{name}.lock"
    if not lock.is_file():
        return False
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


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


def status_text(cfg: StudyConfig, root: Path = DEFAULT_ROOT, storage: str | None = None) -> str:
    """Which stages are done, how far each model's tuning is, the final runs, and what is left."""
    folder = Path(root) / cfg.name
    if not (folder / "state.json").is_file():
        return f"study {cfg.name}: not started (folder {folder})"
    study = Study(cfg, folder, storage, 1)
    state = study.state()
    lines = [f"study {cfg.name}: folder {folder}, parent run {state.get('parent_run_id')}"]
    running = "running" if runner_active(Path(root), cfg.name) else "interrupted (rerun to resume)"
    for stage in cfg.stages:
        s = state["stages"].get(stage)
        current = running if stage == state.get("current") else "to do"
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
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the study file and every model's run settings (as harness.train does, device "
        "included), then print it resolved",
    )
    p.add_argument("--list", action="store_true", help="list the study files and exit")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print("\n".join(list_studies()))
        return 0
    if not args.name:
        print("error: name a study, e.g. `python -m harness.study demo` (--list shows them)", file=sys.stderr)
        return 2
    from harness.tracking import tracking_uri

    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    cfg = load_study(args.name, args.overrides)
    if args.check:
        check_runs(cfg)
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
        study = run_study(cfg, root=args.root, storage=args.storage, workers=args.workers, fresh=args.fresh)
    print(status_text(cfg, args.root, args.storage))
    print(f"study {cfg.name} finished in {time.perf_counter() - t0:.0f}s (folder {study.folder})")
    print(links_text(study))
    return 0


if __name__ == "__main__":
    sys.exit(main())
