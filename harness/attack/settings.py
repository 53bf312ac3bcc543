"""What an attack evaluation is asked to do: ``AttackSettings``, the attack and loss names, the ε units.

No torch here: the report reads ``EPS_UNITS`` and the study config holds an ``AttackSettings``.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from harness.errors import CapsbenchError

EPS_UNITS = (
    "L-inf budget in [0,1] pixel units of the model input "
    "(after the dataset's fixed preprocessing, before the model's own normalisation)"
)


class AttackError(CapsbenchError, ValueError):
    """Arguments of an attack evaluation that make no sense (one line: the problem and the fix)."""


class AttackName(enum.StrEnum):
    FGSM = "fgsm"
    BIM = "bim"
    PGD = "pgd"


class AttackLoss(enum.StrEnum):
    CE = "ce"  # cross-entropy on logits, as torchattacks computes it
    MARGIN = "margin"  # CW-style logit margin


WORST = "worst"  # per-example worst case over the losses run

COUNTS = ("steps", "n_examples", "batch_size", "check_examples", "check_steps")  # each must be >= 1


@dataclass
class AttackSettings:
    """The settings of one attack evaluation: plain TOML-able values (a study's ``[attack]`` table).

    The defaults are the command line's. ``device`` and ``checkpoint`` say where and which model
    ``attack_run`` loads; the functions given a model run on that model's device. ``validated()`` is
    the one place the settings are checked.
    """

    attacks: list[str] = field(default_factory=lambda: [AttackName.FGSM.value, AttackName.BIM.value])
    eps: list[float] = field(default_factory=lambda: [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5])  # EPS_UNITS
    losses: list[str] = field(default_factory=lambda: [AttackLoss.CE.value, AttackLoss.MARGIN.value])
    targeted: bool = False  # also the targeted attacks, success over every target class != the true one
    steps: int = 10  # iterations of BIM / PGD, each of size 2.5·ε/steps
    n_examples: int = 500  # test images attacked, in a fixed seeded order (attack_run)
    batch_size: int = 100  # images per attack batch
    device: str = "auto"  # where attack_run loads the model: auto | cpu | cuda | cuda:N | mps
    seed: int = 0  # order of the test images and PGD's random starts
    checkpoint: str | int = "final"  # the run's model attack_run loads: final | best | an epoch number
    checks: bool = True  # the gradient-masking checks
    check_examples: int = 100  # examples of the unbounded-attack and input-gradient checks
    check_steps: int = 50  # steps of the unbounded (ε = 1) BIM check
    tolerance: float = 0.01  # slack (plus one example) of the monotone and iterative >= FGSM checks
    near_zero: float = 0.05  # the most accuracy the unbounded attack may leave
    max_zero_grad_fraction: float = 0.05  # the most examples whose input gradient may be all zero

    def validated(self) -> AttackSettings:
        """A checked copy: names canonical (``"fgsm,bim"`` strings accepted), ε sorted and unique, an
        epoch number as an int; an ``AttackError`` naming the fix for anything that makes no sense."""
        attacks = [a.value for a in parse_names(self.attacks, AttackName, "attack")]
        losses = [loss.value for loss in parse_names(self.losses, AttackLoss, "loss")]
        eps = parse_eps(self.eps)
        for name in COUNTS:
            if getattr(self, name) < 1:
                raise AttackError(f"{name} must be at least 1, got {getattr(self, name)}")
        checkpoint = self.checkpoint
        if isinstance(checkpoint, str) and checkpoint.isdigit():
            checkpoint = int(checkpoint)
        return dataclasses.replace(self, attacks=attacks, losses=losses, eps=eps, checkpoint=checkpoint)


def parse_names(values: str | Iterable[str], vocab: type[enum.StrEnum], what: str) -> list:
    """``"fgsm,bim"`` or ``["fgsm", "bim"]`` -> enum members, in order, without duplicates."""
    from models.choices import parse_choice  # here, not at the top: the models package imports torch

    if isinstance(values, str):
        values = values.split(",")
    out = []
    for v in values:
        v = str(v).strip().lower()
        if not v:
            continue
        member = parse_choice(vocab, v, what, AttackError)
        if member not in out:
            out.append(member)
    if not out:
        raise AttackError(f"no {what} given: choose at least one of {', '.join(m.value for m in vocab)}")
    return out


def parse_eps(values: str | Iterable[float]) -> list[float]:
    """``"0,0.1,0.2"`` or floats -> sorted unique ε values, each checked to lie in [0, 1]."""
    if isinstance(values, str):
        try:
            values = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise AttackError(f"--eps {values!r} must be comma-separated numbers, e.g. 0,0.05,0.1") from None
    eps = sorted({float(e) for e in values})
    if not eps:
        raise AttackError("no eps given: pass at least one budget in [0, 1], e.g. 0,0.1,0.2")
    bad = [e for e in eps if not (0.0 <= e <= 1.0) or math.isnan(e)]
    if bad:
        raise AttackError(f"eps {bad[0]} is outside [0, 1]: eps is in [0,1] pixel units of the model input")
    return eps
