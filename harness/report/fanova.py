"""Hyperparameter importances (fANOVA) per model, from the report's trials table.

The complete trials are rebuilt as an in-memory Optuna study, so a report needs only the recorded trials
table (``tune/<model>_trials.csv``), not the study's Optuna storage.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd


def importances(trials: pd.DataFrame) -> tuple[dict[str, dict[str, float]], list[str]]:
    """fANOVA hyperparameter importances per model, from the trials table (rebuilt as Optuna trials)."""
    import optuna

    out, notes = {}, []
    params = [c for c in trials.columns if c.startswith("params_")]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "study created" line per model
    try:
        for model, group in trials.groupby("model"):
            done = group[(group["state"] == "COMPLETE") & group["value"].notna()]
            cols = [c for c in params if done[c].notna().any() and done[c].nunique() > 1]
            if len(done) < 3:
                notes.append(f"`{model}`: {len(done)} complete trial(s), too few to estimate importances")
            elif not cols:
                notes.append(f"`{model}`: no hyperparameter varied across its complete trials")
            else:
                try:
                    out[model] = _fanova(done, cols)
                except Exception as e:  # noqa: BLE001 - a figure must never sink the report
                    notes.append(f"`{model}`: importances could not be computed ({type(e).__name__}: {e})")
    finally:
        optuna.logging.set_verbosity(verbosity)
    return out, notes


def _fanova(done: pd.DataFrame, cols: list[str]) -> dict[str, float]:
    """Rebuild the complete trials as an in-memory Optuna study and run its fANOVA evaluator."""
    import optuna

    names = {c: c[len("params_") :] for c in cols}
    dists = {names[c]: _distribution(done[c].dropna()) for c in cols}
    study = optuna.create_study(direction="minimize")
    for _, t in done.iterrows():
        values = {names[c]: _native(t[c]) for c in cols if pd.notna(t[c])}
        study.add_trial(
            optuna.trial.create_trial(
                params=values, distributions={k: dists[k] for k in values}, value=float(t["value"])
            )
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna marks the evaluators experimental
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        return optuna.importance.get_param_importances(study, evaluator=evaluator)


def _distribution(values: pd.Series):
    import optuna.distributions as d

    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return d.CategoricalDistribution(sorted({_native(v) for v in values}, key=str))
    if pd.api.types.is_integer_dtype(values):
        return d.IntDistribution(int(values.min()), int(values.max()))
    return d.FloatDistribution(float(values.min()), float(values.max()))


def _native(v):
    return v.item() if isinstance(v, np.generic) else v
