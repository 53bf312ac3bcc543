"""One trial: the search space it samples, the run it trains, and the budget it counts against.

Capsules search the loss, the λ schedule, final λ, the learning rate and, in trials that chose the spread
loss, its margin schedule; CNNs learning rate,
dropout and weight decay. The objective is the lowest familiar-view validation error of a nested MLflow
run of ``fit``, reported per epoch for median pruning.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from harness.study import storage
from harness.study.config import CHOICES, LOG_SCALE, StudyConfig, model_family, run_config
from harness.study.state import Study, StudyError

# Optuna parameter name -> RunConfig key it sets
PARAM_KEYS = {
    "capsule": {
        "loss": "loss.name",  # sampled first: the margin parameters below depend on it
        "lambda_schedule": "model.args.lambda_schedule",
        "final_lambda": "model.args.final_lambda",
        "margin_start": "loss.margin_start",
        "margin_end": "loss.margin_end",
        "margin_ramp_epochs": "loss.margin_ramp_epochs",
        "lr": "optim.lr",
    },
    "cnn": {"lr": "optim.lr", "dropout": "model.args.dropout", "weight_decay": "optim.weight_decay"},
}


MARGIN_PARAMS = ("margin_start", "margin_end", "margin_ramp_epochs")  # only the spread loss has a margin


class SurplusTrial(Exception):
    """A trial asked for after the budget was used up by other workers; it is failed and not counted."""


def suggest(trial: optuna.Trial, family: str, cfg: StudyConfig) -> dict[str, Any]:
    """Sample the family's search space -> {RunConfig key: value}."""
    space = getattr(cfg.tune, family)
    out = {}
    for name, key in PARAM_KEYS[family].items():
        bounds = getattr(space, name)
        if name in MARGIN_PARAMS and out.get("loss.name") != "spread":
            continue
        if name in CHOICES:
            out[key] = trial.suggest_categorical(name, list(bounds))
        else:
            out[key] = trial.suggest_float(name, bounds[0], bounds[1], log=name in LOG_SCALE)
    return with_loss_temperature(out)


def params_to_keys(family: str, params: dict[str, Any]) -> dict[str, Any]:
    keys = {PARAM_KEYS[family][k]: v for k, v in params.items() if k in PARAM_KEYS[family]}
    return with_loss_temperature(keys)


def with_loss_temperature(keys: dict[str, Any]) -> dict[str, Any]:
    """A trial on the spread loss runs the class layer at the paper's λ (``class_lambda_scale`` 1): the
    capsbench recipe's larger class λ suits cross-entropy only (docs/capsule_recipe.md, third round)."""
    if keys.get("loss.name") == "spread":
        keys["model.args.class_lambda_scale"] = 1.0
    return keys


def trial_run_config(study: Study, model: str, params: dict[str, Any]):
    """A trial's RunConfig: the study's run settings, tuning epochs/limits, the sampled params."""
    cfg = study.cfg
    extra = dict(params)
    if cfg.tune.epochs:
        final_epochs = run_config(cfg, model, params).train.epochs
        if final_epochs > cfg.tune.epochs:  # the first tune.epochs of the final run, on its schedule
            extra["optim.schedule_epochs"] = final_epochs
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


def n_trials_in(ostudy: optuna.Study, *states: TrialState) -> int:
    return len(ostudy.get_trials(deepcopy=False, states=states))


def n_finished(ostudy: optuna.Study) -> int:
    """Trials that count towards the budget (a surplus trial always ends FAIL)."""
    return n_trials_in(ostudy, TrialState.COMPLETE, TrialState.PRUNED)


def claimed(ostudy: optuna.Study, below: int | None = None) -> int:
    """Trials that hold a share of the budget: finished (complete, pruned), running or queued (waiting).

    With ``below``, only those numbered below it: of two trials asked at once, the lower number wins.
    """
    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    trials = ostudy.get_trials(deepcopy=False, states=states)
    return sum(1 for t in trials if below is None or t.number < below)


class TrialObjective:
    """Optuna's objective for one model: a nested MLflow run of ``fit`` on the sampled parameters.

    After each trial, ``number``, ``surplus`` and ``error`` say what it did (``reset`` clears them).
    """

    def __init__(self, study: Study, model: str, ostudy: optuna.Study, fit_fn: Callable, parent_run_id: str):
        self.study, self.model, self.ostudy = study, model, ostudy
        self.fit_fn, self.parent_run_id = fit_fn, parent_run_id
        self.family = model_family(model)
        self.reset()

    def reset(self) -> None:
        self.number: int | None = None  # the last trial this objective was called for
        self.surplus = False  # it was over the budget (not counted as a failure)
        self.error: str | None = None  # why it failed, when known

    def __call__(self, trial: optuna.Trial) -> float:
        study, model, n_trials = self.study, self.model, self.study.cfg.tune.n_trials
        self.number = trial.number
        if claimed(self.ostudy, below=trial.number) >= n_trials:
            self.surplus = True
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"trial {trial.number} is over the budget of {n_trials}")
        trial.set_user_attr("worker", storage.worker_id())
        run_cfg = trial_run_config(study, model, suggest(trial, self.family, study.cfg))
        run_cfg.run_name = f"trial {trial.number} · {model}"  # how the MLflow runs table lists it
        tags = {
            **study.run_tags(model, kind="trial", role="tune"),
            "optuna.study": self.ostudy.study_name,
            "optuna.trial": str(trial.number),
        }

        def on_epoch(epoch: int, metrics: dict) -> bool:
            value = metrics.get("val_error")
            if value is None or not math.isfinite(value):
                return False
            trial.report(float(value), epoch)
            return trial.should_prune()

        try:
            result = self.fit_fn(
                run_cfg, parent_run_id=self.parent_run_id, tags=tags, epoch_callback=on_epoch
            )
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            raise
        trial.set_user_attr("mlflow_run_id", result.run_id)
        if result.pruned:
            raise optuna.TrialPruned(f"pruned after epoch {len(result.history)}")
        values = [h["val_error"] for h in result.history if math.isfinite(h.get("val_error", math.nan))]
        if not values:
            self.error = "no finite val_error in the history"
            raise StudyError(f"trial {trial.number} of {model} logged no finite val_error")
        return min(values)
