"""The ε sweep: untargeted accuracy and targeted success of one model per attack, loss and L∞ budget.

- Untargeted accuracy counts an example as robust when it is correct on the clean input and on the
  adversarial one (AutoAttack's convention); only clean-correct examples are attacked. At ε = 0 it is the
  clean accuracy exactly.
- Targeted success is the fraction of (example, target) pairs classified as the target, averaged over all
  targets ≠ the true class and over all examples (the paper's Fig. 3, right). At ε = 0 it is the clean
  rate of predicting each wrong class.
- ``worst`` is the per-example worst case over the losses run.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from harness.attack.attacks import adversarial_predictions, make_attack, predicted_classes, set_target_offset
from harness.attack.settings import WORST, AttackError, AttackSettings

TABLE_COLUMNS = ["attack", "loss", "mode", "eps", "accuracy", "targeted_success", "n_examples"]


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    if not torch.is_floating_point(x) or x.dim() != 4:
        raise AttackError(f"inputs must be float N×C×H×W pixels in [0,1], got {tuple(x.shape)} {x.dtype}")
    if len(x) != len(y) or len(x) == 0:
        raise AttackError(
            f"need as many labels as images (and at least one), got {len(x)} images, {len(y)} labels"
        )
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise AttackError(
            f"inputs span [{lo:.3g}, {hi:.3g}], not [0,1]: "
            "pass the dataset's preprocessed pixels, not normalised ones"
        )


class Sweep:
    """One model and its examples, with what every attack/loss/ε of a sweep shares: the clean predictions
    and the targets (target k of each example is y + k + 1 mod classes)."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: AttackSettings):
        check_inputs(x, y)
        self.model, self.settings = model, settings
        self.device = next(model.parameters()).device
        model.eval()
        self.x, self.y = x.detach().cpu(), y.detach().cpu().long()
        self.clean_pred, self.num_classes = predicted_classes(model, self.x, settings.batch_size, self.device)
        if int(self.y.max()) >= self.num_classes or int(self.y.min()) < 0:
            raise AttackError(
                f"labels must lie in 0..{self.num_classes - 1} (the model's classes), got {int(self.y.max())}"
            )
        self.correct = self.clean_pred == self.y  # N
        self.targets = (
            torch.stack([(self.y + k) % self.num_classes for k in range(1, self.num_classes)])
            if settings.targeted
            else None
        )  # (classes-1)×N

    def total_batches(self) -> int:
        """Attack batches of the whole sweep (the progress bar's total)."""
        s = self.settings
        batches = lambda m: math.ceil(m / s.batch_size)  # noqa: E731
        n_targets = 0 if self.targets is None else len(self.targets)
        per_attack = batches(int(self.correct.sum())) + n_targets * batches(len(self.y))
        return len(s.attacks) * len([e for e in s.eps if e > 0]) * len(s.losses) * per_attack

    def clean(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ε = 0, no perturbation: (robust N bool, hits (classes-1)×N bool or None) of the clean input."""
        hits = self.clean_pred[None] == self.targets if self.targets is not None else None
        return self.correct.clone(), hits

    def attacked(
        self, attack: str, loss: str, eps: float, bar: tqdm | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One attack/loss/ε: (robust N bool, hits (classes-1)×N bool or None)."""
        s = self.settings
        torch.manual_seed(s.seed)  # PGD's random start draws from the global generator
        atk = make_attack(self.model, attack, loss, eps, s.steps)
        robust = torch.zeros_like(self.correct)
        idx = self.correct.nonzero().squeeze(1)  # attack only what the model gets right
        if len(idx):
            robust[idx] = self._predictions(atk, self.x[idx], self.y[idx], bar) == self.y[idx]
        if self.targets is None:
            return robust, None
        hits = torch.zeros_like(self.targets, dtype=torch.bool)
        for k in range(len(self.targets)):
            set_target_offset(atk, k + 1, self.num_classes)
            hits[k] = self._predictions(atk, self.x, self.y, bar) == self.targets[k]
        return robust, hits

    def _predictions(self, atk, x: torch.Tensor, y: torch.Tensor, bar: tqdm | None) -> torch.Tensor:
        return adversarial_predictions(self.model, atk, x, y, self.settings.batch_size, self.device, bar)


def eps_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: AttackSettings | None = None,
    *,
    progress: bool = True,
) -> pd.DataFrame:
    """Untargeted accuracy (and targeted success) per attack, loss (+ worst over losses) and ε.

    Returns a DataFrame with ``TABLE_COLUMNS``; see the module docstring for the definitions.
    """
    settings = (settings or AttackSettings()).validated()
    sweep = Sweep(model, x, y, settings)
    bar = tqdm(total=sweep.total_batches(), desc="attacks", unit="batch", disable=not progress, leave=False)
    rows = []
    with torch.random.fork_rng(devices=[sweep.device] if sweep.device.type == "cuda" else []):
        for attack in settings.attacks:
            for eps in settings.eps:
                robust = {}  # loss -> N bool (correct on clean and adversarial)
                hits = {}  # loss -> (classes-1)×N bool (classified as the target)
                for loss in settings.losses:
                    outcome = sweep.attacked(attack, loss, eps, bar) if eps > 0 else sweep.clean()
                    robust[loss], hits[loss] = outcome
                robust[WORST] = torch.stack(list(robust.values())).all(dim=0)
                if settings.targeted:
                    hits[WORST] = torch.stack([hits[loss] for loss in settings.losses]).any(dim=0)
                for loss in [*settings.losses, WORST]:
                    rows.append(
                        dict(
                            attack=attack,
                            loss=loss,
                            mode="untargeted",
                            eps=eps,
                            accuracy=float(robust[loss].float().mean()),
                            targeted_success=float("nan"),
                            n_examples=len(sweep.y),
                        )
                    )
                    if settings.targeted:
                        rows.append(
                            dict(
                                attack=attack,
                                loss=loss,
                                mode="targeted",
                                eps=eps,
                                accuracy=float("nan"),
                                targeted_success=float(hits[loss].float().mean()),
                                n_examples=len(sweep.y),
                            )
                        )
    bar.close()
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def curves(table: pd.DataFrame, mode: str = "untargeted") -> pd.DataFrame:
    """One row per attack/loss, one column per ε: accuracy (untargeted) or targeted success."""
    col = "accuracy" if mode == "untargeted" else "targeted_success"
    sub = table[table["mode"] == mode]
    return sub.pivot_table(index=["attack", "loss"], columns="eps", values=col, sort=False)
