"""The L∞ attacks (torchattacks, plus a margin-loss variant) and the model's predictions under them.

FGSM, BIM and PGD come from torchattacks with cross-entropy on logits (``ce``); the same three with a
CW-style margin loss (``margin``) are a torchattacks ``Attack`` subclass, because cross-entropy on
saturated outputs understates attacks (gradient masking). Iterative attacks take ``steps`` steps of size
2.5·ε/steps (Madry et al.).
"""

from __future__ import annotations

import contextlib
import io

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from torchattacks.attack import Attack
from tqdm.auto import tqdm

from harness.attack.settings import AttackLoss, AttackName


def margin_loss(
    logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None = None
) -> torch.Tensor:
    """CW-style margin an attacker ascends, summed over the batch (so each example's gradient is its own).

    untargeted: max_{j≠y} z_j − z_y   (> 0: misclassified);  targeted: z_t − max_{j≠t} z_j   (> 0: hit).
    """
    cls = labels if targets is None else targets
    own = logits.gather(1, cls[:, None]).squeeze(1)  # N
    others = logits.masked_fill(F.one_hot(cls, logits.shape[1]).bool(), float("-inf")).amax(dim=1)  # N
    return (others - own).sum() if targets is None else (own - others).sum()


class LinfSignAttack(Attack):
    """FGSM / BIM / PGD with a pluggable loss, following torchattacks 3.3's update rules exactly.

    ``loss="margin"`` is the margin variant the suite uses; ``loss="ce"`` (batch-mean cross-entropy, as
    torchattacks) exists so tests can check this class against torchattacks' own FGSM/BIM/PGD.
    Targeted modes come from torchattacks (``set_mode_targeted_by_function`` etc.).
    """

    def __init__(
        self,
        model: nn.Module,
        kind: str = "fgsm",
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        loss: str = "margin",
    ):
        kind, loss = AttackName(kind), AttackLoss(loss)
        super().__init__(f"{loss.value.capitalize()}{kind.value.upper()}", model)
        self.kind, self.loss, self.eps = kind, loss, eps
        self.steps = 1 if kind == AttackName.FGSM else steps
        self.alpha = eps if kind == AttackName.FGSM else (2.5 * eps / steps if alpha is None else alpha)
        self.random_start = kind == AttackName.PGD
        self.supported_mode = ["default", "targeted"]

    def cost(self, logits: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        if self.loss == AttackLoss.MARGIN:
            return margin_loss(logits, labels, targets)
        return -F.cross_entropy(logits, targets) if targets is not None else F.cross_entropy(logits, labels)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        images = images.clone().detach().to(self.device)
        labels = labels.clone().detach().to(self.device)
        targets = self.get_target_label(images, labels) if self.targeted else None
        adv = images.clone()
        if self.random_start:
            adv = (adv + torch.empty_like(adv).uniform_(-self.eps, self.eps)).clamp(0, 1)
        for _ in range(self.steps):
            adv.requires_grad_(True)
            grad = torch.autograd.grad(self.cost(self.get_logits(adv), labels, targets), adv)[0]
            adv = adv.detach() + self.alpha * grad.sign()
            adv = torch.minimum(torch.maximum(adv, images - self.eps), images + self.eps).clamp(0, 1).detach()
        return adv


def make_attack(model: nn.Module, attack: str, loss: str, eps: float, steps: int = 10) -> Attack:
    """A configured attack: torchattacks' own class for cross-entropy, ``LinfSignAttack`` for the margin."""
    attack, loss = AttackName(attack), AttackLoss(loss)
    alpha = 2.5 * eps / steps
    if loss == AttackLoss.MARGIN:
        return LinfSignAttack(model, attack, eps=eps, alpha=alpha, steps=steps, loss="margin")
    if attack == AttackName.FGSM:
        return torchattacks.FGSM(model, eps=eps)
    if attack == AttackName.BIM:
        return torchattacks.BIM(model, eps=eps, alpha=alpha, steps=steps)
    return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)


def set_target_offset(atk: Attack, offset: int, num_classes: int) -> None:
    """Targeted mode with target = (y + offset) mod classes (torchattacks prints a line; keep it quiet)."""
    with contextlib.redirect_stdout(io.StringIO()):
        atk.set_mode_targeted_by_function(lambda images, labels: (labels + offset) % num_classes)


@torch.no_grad()
def predicted_classes(
    model: nn.Module, x: torch.Tensor, batch_size: int = 128, device: torch.device | None = None
) -> tuple[torch.Tensor, int]:
    """(predicted classes, cpu int64; the number of classes), in eval mode."""
    device = device or next(model.parameters()).device
    preds, num_classes = [], 0
    for i in range(0, len(x), batch_size):
        logits = model(x[i : i + batch_size].to(device))  # B×classes
        num_classes = logits.shape[1]
        preds.append(logits.argmax(dim=1).cpu())
    return torch.cat(preds), num_classes


def adversarial_predictions(
    model: nn.Module,
    atk: Attack,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    device: torch.device,
    bar: tqdm | None = None,
) -> torch.Tensor:
    """Predicted classes (cpu) on ``atk``'s adversarial versions of ``x``, batch by batch."""
    preds = []
    for i in range(0, len(x), batch_size):
        adv = atk(x[i : i + batch_size].to(device), y[i : i + batch_size].to(device))
        with torch.no_grad():
            preds.append(model(adv).argmax(dim=1).cpu())
        if bar is not None:
            bar.update(1)
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)
