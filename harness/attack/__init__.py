"""The adversarial suite: L∞ ε sweeps (FGSM / BIM / PGD; cross-entropy and margin losses) with
gradient-masking checks, on any model that returns logits or on the model of a tracked run.

    settings = AttackSettings(attacks=["fgsm", "bim"], eps=[0, 0.1, 0.2], targeted=True)
    report = evaluate_attacks(model, x, y, settings)   # a model and examples -> AttackReport
    report = attack_run(run_id, settings)              # a run's model; results logged into the run
    python -m harness.attack --fgsm --bim --run-id RUN_ID

Modules: ``settings`` (AttackSettings, names, ε units), ``attacks`` (torchattacks and the margin attack),
``sweep`` (the ε sweep), ``checks`` (gradient masking), ``suite`` (sweep + checks -> AttackReport),
``tracked`` (MLflow runs and studies), ``outputs`` (table, JSON/CSV, plot), ``cli``. Only ``settings`` is
imported with the package, the rest on first use: reading ``EPS_UNITS`` or the settings loads no torch.
"""

from __future__ import annotations

import importlib

from harness.attack.settings import (
    EPS_UNITS,
    WORST,
    AttackError,
    AttackLoss,
    AttackName,
    AttackSettings,
    parse_eps,
    parse_names,
)

_LAZY = {  # public name -> the module defining it
    "LinfSignAttack": "attacks",
    "make_attack": "attacks",
    "margin_loss": "attacks",
    "eps_sweep": "sweep",
    "curves": "sweep",
    "AttackReport": "suite",
    "evaluate_attacks": "suite",
    "attack_run": "tracked",
    "attack_study": "tracked",
    "study_final_runs": "tracked",
    "load_examples": "tracked",
    "format_report": "outputs",
    "write_outputs": "outputs",
    "main": "cli",
}

__all__ = [
    "EPS_UNITS",
    "WORST",
    "AttackError",
    "AttackLoss",
    "AttackName",
    "AttackSettings",
    "parse_eps",
    "parse_names",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
