"""One model under attack: the ε sweep plus the gradient-masking checks -> an ``AttackReport``.

No MLflow here (``tracked.py`` composes this with a tracked run)::

    report = evaluate_attacks(model, x, y, AttackSettings(attacks=["fgsm", "bim"], eps=[0, 0.1, 0.2]))
    report.table      # one row per attack / loss / mode / eps
    report.flags      # gradient-masking checks that fired ([] = none)

ε is the L∞ budget in [0, 1] pixel units of the model input: after the dataset's fixed preprocessing
(NORB: centre crop), before the model's own normalisation (which lives inside every model).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn as nn

from harness.attack.attacks import predicted_classes
from harness.attack.checks import masking_checks
from harness.attack.settings import EPS_UNITS, AttackSettings
from harness.attack.sweep import eps_sweep


@dataclass
class AttackReport:
    """Results of one model under attack: ``table`` (one row per attack/loss/mode/eps), ``flags``."""

    table: pd.DataFrame
    flags: list[str]
    clean_accuracy: float
    n_examples: int = 0
    settings: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)  # the numbers behind each masking check
    model_name: str = ""
    run_id: str | None = None
    eps_units: str = EPS_UNITS

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["table"] = json_records(self.table)
        return out


def json_records(table: pd.DataFrame) -> list[dict[str, Any]]:
    """Table rows as JSON-ready dicts (NaN -> None)."""
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in table.astype(object).to_dict("records")
    ]


def evaluate_attacks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AttackSettings | None = None,
    *,
    progress: bool = True,
) -> AttackReport:
    """The ε sweep plus (``settings.checks``) the gradient-masking checks on (x, y): an ``AttackReport``."""
    settings = (settings or AttackSettings()).validated()
    table = eps_sweep(model, x, y, settings, progress=progress)
    device = next(model.parameters()).device
    clean_pred, _ = predicted_classes(model, x.detach().cpu(), settings.batch_size, device)
    clean_accuracy = float((clean_pred == y.cpu()).float().mean())
    flags, details = (
        masking_checks(model, x, y, table, settings, progress=progress) if settings.checks else ([], {})
    )
    return AttackReport(
        table=table,
        flags=flags,
        clean_accuracy=clean_accuracy,
        n_examples=len(y),
        settings=dict(
            attacks=settings.attacks,
            eps=settings.eps,
            losses=settings.losses,
            targeted=settings.targeted,
            steps=settings.steps,
            step_size="2.5*eps/steps",
            seed=settings.seed,
            n_examples=len(y),
            untargeted_accuracy="correct on clean and adversarial input (only clean-correct attacked)",
            targeted_success="mean over examples and all target classes != true class",
            checks=settings.checks,
        ),
        checks=details,
        model_name=getattr(model, "model_name", ""),
    )
