"""Adversarial robustness of any model that returns logits: L∞ ε sweeps and gradient-masking checks.

Pure functions on a model and a batch of examples, no MLflow (``harness/attack.py`` composes them with a
tracked run). Used as a library:

    report = evaluate_attacks(model, x, y, attacks=("fgsm", "bim"), eps=(0, 0.1, 0.2), losses=("ce",))
    report.table      # one row per attack / loss / mode / eps
    report.flags      # gradient-masking checks that fired ([] = none)

ε is the L∞ budget in [0, 1] pixel units of the model input: after the dataset's fixed preprocessing
(NORB: centre crop), before the model's own normalisation (which lives inside every model).

- Attacks: FGSM, BIM and PGD from torchattacks with cross-entropy on logits (``ce``); the same three with a
  CW-style margin loss (``margin``) as a torchattacks ``Attack`` subclass, because cross-entropy on
  saturated outputs understates attacks (gradient masking). ``worst`` is the per-example worst case over
  the losses run. Iterative attacks take ``steps`` steps of size 2.5·ε/steps (Madry et al.).
- Untargeted accuracy counts an example as robust when it is correct on the clean input and on the
  adversarial one (AutoAttack's convention); only clean-correct examples are attacked. At ε = 0 it is the
  clean accuracy exactly.
- Targeted success is the fraction of (example, target) pairs classified as the target, averaged over all
  targets ≠ the true class and over all examples (the paper's Fig. 3, right). At ε = 0 it is the clean
  rate of predicting each wrong class.
- Gradient-masking checks (AutoAttack-style sanity): curves monotone in ε; iterative attacks at least as
  strong as FGSM; an unbounded attack (ε = 1) drives accuracy near 0; input gradients are non-zero.
"""

from __future__ import annotations

import contextlib
import enum
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from torchattacks.attack import Attack
from tqdm.auto import tqdm

from harness.errors import CapsbenchError
from models.choices import parse_choice

EPS_UNITS = (
    "L-inf budget in [0,1] pixel units of the model input "
    "(after the dataset's fixed preprocessing, before the model's own normalisation)"
)
TABLE_COLUMNS = ["attack", "loss", "mode", "eps", "accuracy", "targeted_success", "n_examples"]


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


def parse_names(values: str | Iterable[str], vocab: type[enum.StrEnum], what: str) -> list:
    """``"fgsm,bim"`` or ``["fgsm", "bim"]`` -> enum members, in order, without duplicates."""
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


# ---------------------------------------------------------------------------------------------
# the margin loss and its attack (a torchattacks Attack)
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# predictions under attack
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 128, device: torch.device | None = None):
    """Predicted classes (cpu int64) and the number of classes, in eval mode."""
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


# ---------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# the ε sweep
# ---------------------------------------------------------------------------------------------


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


def eps_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attacks: Sequence[str] = ("fgsm", "bim"),
    eps: Sequence[float] = (0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
    losses: Sequence[str] = ("ce", "margin"),
    targeted: bool = True,
    steps: int = 10,
    batch_size: int = 100,
    seed: int = 0,
    device: torch.device | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Untargeted accuracy (and targeted success) per attack, loss (+ worst over losses) and ε.

    Returns a DataFrame with ``TABLE_COLUMNS``; see the module docstring for the definitions.
    """
    attacks = parse_names(attacks, AttackName, "attack")
    losses = parse_names(losses, AttackLoss, "loss")
    eps = parse_eps(eps)
    if steps < 1 or batch_size < 1:
        raise AttackError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    check_inputs(x, y)
    device = device or next(model.parameters()).device
    model.eval()
    x, y = x.detach().cpu(), y.detach().cpu().long()
    clean_pred, num_classes = predict(model, x, batch_size, device)
    if int(y.max()) >= num_classes or int(y.min()) < 0:
        raise AttackError(
            f"labels must lie in 0..{num_classes - 1} (the model's classes), got {int(y.max())}"
        )
    correct = clean_pred == y  # N
    n = len(y)
    offsets = range(1, num_classes) if targeted else range(0)
    targets = torch.stack([(y + k) % num_classes for k in offsets]) if targeted else None  # (classes-1)×N

    n_batches = lambda m: math.ceil(m / batch_size)  # noqa: E731
    active = [e for e in eps if e > 0]
    total = (
        len(attacks)
        * len(active)
        * len(losses)
        * (n_batches(int(correct.sum())) + len(offsets) * n_batches(n))
    )
    bar = tqdm(total=total, desc="attacks", unit="batch", disable=not progress, leave=False)
    rows = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for a in attacks:
            for e in eps:
                robust = {}  # loss -> N bool (correct on clean and adversarial)
                hits = {}  # loss -> (classes-1)×N bool (classified as the target)
                for loss in losses:
                    if e == 0:  # no perturbation: the clean predictions themselves
                        robust[loss] = correct.clone()
                        hits[loss] = clean_pred[None] == targets if targeted else None
                    else:
                        robust[loss], hits[loss] = _attack_one(
                            model,
                            a,
                            loss,
                            e,
                            steps,
                            x,
                            y,
                            correct,
                            targets,
                            num_classes,
                            batch_size,
                            device,
                            seed,
                            bar,
                        )
                robust[WORST] = torch.stack(list(robust.values())).all(dim=0)
                if targeted:
                    hits[WORST] = torch.stack([hits[loss] for loss in losses]).any(dim=0)
                for loss in [*losses, WORST]:
                    name = loss.value if isinstance(loss, AttackLoss) else loss
                    rows.append(
                        dict(
                            attack=a.value,
                            loss=name,
                            mode="untargeted",
                            eps=e,
                            accuracy=float(robust[loss].float().mean()),
                            targeted_success=float("nan"),
                            n_examples=n,
                        )
                    )
                    if targeted:
                        rows.append(
                            dict(
                                attack=a.value,
                                loss=name,
                                mode="targeted",
                                eps=e,
                                accuracy=float("nan"),
                                targeted_success=float(hits[loss].float().mean()),
                                n_examples=n,
                            )
                        )
    bar.close()
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _attack_one(model, a, loss, e, steps, x, y, correct, targets, num_classes, batch_size, device, seed, bar):
    """One attack/loss/ε: (robust N bool, hits (classes-1)×N bool or None)."""
    torch.manual_seed(seed)  # PGD's random start draws from the global generator
    atk = make_attack(model, a, loss, e, steps)
    robust = torch.zeros_like(correct)
    idx = correct.nonzero().squeeze(1)  # attack only what the model gets right
    if len(idx):
        robust[idx] = adversarial_predictions(model, atk, x[idx], y[idx], batch_size, device, bar) == y[idx]
    if targets is None:
        return robust, None
    hits = torch.zeros_like(targets, dtype=torch.bool)
    for k in range(len(targets)):
        set_target_offset(atk, k + 1, num_classes)
        hits[k] = adversarial_predictions(model, atk, x, y, batch_size, device, bar) == targets[k]
    return robust, hits


# ---------------------------------------------------------------------------------------------
# gradient-masking checks
# ---------------------------------------------------------------------------------------------


def monotone_flags(table: pd.DataFrame, tol: float) -> tuple[list[str], list[str]]:
    """Accuracy must not rise with ε, nor targeted success fall (beyond ``tol``) -> (flags, notes).

    One flag per attack and mode, naming the curves (losses) that break. A single step overshoots at
    large ε even on undefended models, so FGSM's own curves give notes, not flags, whenever an iterative
    attack ran in the same mode; then the best attack per ε (the number a reader takes away) must be
    monotone instead.
    """
    flags, notes = [], []
    for mode, m in table.groupby("mode", sort=False):
        col, sign, word = (
            ("accuracy", 1, "rises") if mode == "untargeted" else ("targeted_success", -1, "falls")
        )
        iterative = (m["attack"] != AttackName.FGSM.value).any()
        for a, g in m.groupby("attack", sort=False):
            breaks = [_first_break(gl, col, sign, tol, loss) for loss, gl in g.groupby("loss", sort=False)]
            breaks = [b for b in breaks if b]
            if breaks:
                text = f"non-monotone: {a} {mode} {col} {word} with eps ({'; '.join(breaks)})"
                if a == AttackName.FGSM.value and iterative:
                    notes.append(f"{text}: single-step overshoot; the best-attack curve is what counts")
                elif a == AttackName.FGSM.value:
                    flags.append(f"{text} (single-step overshoot or gradient masking: add bim/pgd to tell)")
                else:
                    flags.append(f"{text} (gradient masking, or too few steps?)")
        if iterative:
            best = (
                m.groupby("eps")[col].min() if sign > 0 else m.groupby("eps")[col].max()
            )  # over attacks, losses
            b = _first_break(best.reset_index(), col, sign, tol, "best attack")
            if b:
                flags.append(f"non-monotone: {mode} {col} of the best attack per eps {word} with eps ({b}) "
                             "(gradient masking, or too few steps?)")  # fmt: skip
    return flags, notes


def _first_break(g: pd.DataFrame, col: str, sign: int, tol: float, label: str) -> str:
    g = g.sort_values("eps")
    vals, eps = g[col].to_numpy(), g["eps"].to_numpy()
    for i in range(1, len(vals)):
        if sign * (vals[i] - vals[i - 1]) > tol:
            return f"{label} {vals[i - 1]:.3f} at eps {eps[i - 1]:g} -> {vals[i]:.3f} at eps {eps[i]:g}"
    return ""


def iterative_flags(table: pd.DataFrame, tol: float) -> list[str]:
    """BIM and PGD must be at least as strong as FGSM at the same ε, loss and mode."""
    flags = []
    fgsm = table[table.attack == AttackName.FGSM.value].set_index(["loss", "mode", "eps"])
    for _, row in table[(table.attack != AttackName.FGSM.value) & (table.eps > 0)].iterrows():
        key = (row["loss"], row["mode"], row["eps"])
        if key not in fgsm.index:
            continue
        ref = fgsm.loc[key]
        if row["mode"] == "untargeted" and row["accuracy"] > ref["accuracy"] + tol:
            flags.append(
                f"weak-iterative: {row['attack']}/{row['loss']} accuracy {row['accuracy']:.3f} > fgsm "
                f"{ref['accuracy']:.3f} at eps {row['eps']:g} (gradient masking, or too few steps?)"
            )
        elif row["mode"] == "targeted" and row["targeted_success"] < ref["targeted_success"] - tol:
            flags.append(
                f"weak-iterative: {row['attack']}/{row['loss']} targeted success "
                f"{row['targeted_success']:.3f} < fgsm {ref['targeted_success']:.3f} at eps {row['eps']:g} "
                "(gradient masking, or too few steps?)"
            )
    return flags


def input_gradient_stats(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    losses: Sequence[str],
    batch_size: int = 100,
    device: torch.device | None = None,
) -> dict[str, dict[str, float]]:
    """Per loss: the fraction of examples whose input gradient is all zero, and the fraction non-finite."""
    device = device or next(model.parameters()).device
    model.eval()
    out = {}
    for loss in parse_names(losses, AttackLoss, "loss"):
        zero = bad = 0
        for i in range(0, len(x), batch_size):
            xb = x[i : i + batch_size].to(device).requires_grad_(True)
            yb = y[i : i + batch_size].to(device)
            logits = model(xb)
            cost = (
                margin_loss(logits, yb)
                if loss == AttackLoss.MARGIN
                else F.cross_entropy(logits, yb, reduction="sum")
            )
            g = torch.autograd.grad(cost, xb)[0].flatten(1)  # B×(C·H·W)
            finite = torch.isfinite(g).all(dim=1)
            bad += int((~finite).sum())
            zero += int((finite & (g.abs().amax(dim=1) == 0)).sum())
        out[loss.value] = {"zero_fraction": zero / len(x), "nonfinite_fraction": bad / len(x)}
    return out


def gradient_flags(stats: dict[str, dict[str, float]], max_zero_fraction: float) -> list[str]:
    flags = []
    for loss, s in stats.items():
        if s["nonfinite_fraction"] > 0:
            flags.append(
                f"nonfinite-gradient: {loss} loss input gradient is NaN/inf for "
                f"{100 * s['nonfinite_fraction']:.1f}% of examples"
            )
        if s["zero_fraction"] > max_zero_fraction:
            flags.append(
                f"zero-gradient: {loss} loss input gradient is exactly zero for "
                f"{100 * s['zero_fraction']:.1f}% of examples (gradient masking: attacks see nothing)"
            )
    return flags


def unbounded_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    losses: Sequence[str],
    steps: int,
    batch_size: int = 100,
    seed: int = 0,
    device: torch.device | None = None,
    progress: bool = True,
) -> float:
    """Worst-case accuracy over ``losses`` under BIM with ε = 1 (any image in [0,1]) for ``steps`` steps."""
    device = device or next(model.parameters()).device
    losses = parse_names(losses, AttackLoss, "loss")
    clean_pred, _ = predict(model, x, batch_size, device)
    robust = clean_pred == y
    bar = tqdm(
        total=len(losses) * math.ceil(len(x) / batch_size),
        desc="unbounded check",
        unit="batch",
        disable=not progress,
        leave=False,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for loss in losses:
            idx = robust.nonzero().squeeze(1)  # only examples no loss has broken yet
            atk = make_attack(model, AttackName.BIM, loss, 1.0, steps)
            if len(idx):
                robust[idx] = (
                    adversarial_predictions(model, atk, x[idx], y[idx], batch_size, device, bar) == y[idx]
                )
            bar.update(max(0, math.ceil(len(x) / batch_size) - math.ceil(len(idx) / batch_size)))
    bar.close()
    return float(robust.float().mean())


# ---------------------------------------------------------------------------------------------
# composition
# ---------------------------------------------------------------------------------------------


def evaluate_attacks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attacks: Sequence[str] = ("fgsm", "bim"),
    eps: Sequence[float] = (0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5),
    losses: Sequence[str] = ("ce", "margin"),
    targeted: bool = True,
    steps: int = 10,
    batch_size: int = 100,
    seed: int = 0,
    device: torch.device | None = None,
    checks: bool = True,
    check_examples: int = 100,
    check_steps: int = 50,
    tol: float = 0.01,
    near_zero: float = 0.05,
    max_zero_grad_fraction: float = 0.05,
    progress: bool = True,
) -> AttackReport:
    """The ε sweep plus the gradient-masking checks on (x, y): an ``AttackReport``.

    Checks: monotone curves and iterative ≥ FGSM with slack ``tol`` + one example; BIM with ε = 1 and
    ``check_steps`` steps on the first ``check_examples`` examples must leave accuracy ≤ ``near_zero``;
    more than ``max_zero_grad_fraction`` of examples with an all-zero input gradient is a flag.
    """
    attacks = parse_names(attacks, AttackName, "attack")
    losses = parse_names(losses, AttackLoss, "loss")
    eps = parse_eps(eps)
    device = device or next(model.parameters()).device
    table = eps_sweep(
        model,
        x,
        y,
        attacks=attacks,
        eps=eps,
        losses=losses,
        targeted=targeted,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        device=device,
        progress=progress,
    )
    clean_pred, _ = predict(model, x.detach().cpu(), batch_size, device)
    clean_accuracy = float((clean_pred == y.cpu()).float().mean())
    settings = dict(
        attacks=[a.value for a in attacks],
        eps=eps,
        losses=[loss.value for loss in losses],
        targeted=targeted,
        steps=steps,
        step_size="2.5*eps/steps",
        seed=seed,
        n_examples=len(y),
        untargeted_accuracy="correct on clean and adversarial input (only clean-correct attacked)",
        targeted_success="mean over examples and all target classes != true class",
    )
    flags: list[str] = []
    details: dict[str, Any] = {}
    if checks:
        slack = tol + 1.0 / len(y)
        mono, notes = monotone_flags(table, slack)
        flags += mono
        flags += iterative_flags(table, slack)
        m = min(check_examples, len(y))
        stats = input_gradient_stats(model, x[:m], y[:m], losses, batch_size, device)
        flags += gradient_flags(stats, max_zero_grad_fraction)
        unbounded = unbounded_accuracy(
            model, x[:m], y[:m], losses, check_steps, batch_size, seed, device, progress
        )
        if unbounded > near_zero:
            flags.append(
                f"unbounded-attack: BIM at eps 1 ({check_steps} steps, worst over losses) leaves accuracy "
                f"{unbounded:.3f} > {near_zero} on {m} examples (gradient masking, or too few steps?)"
            )
        details = dict(
            notes=notes,
            tolerance=slack,
            check_examples=m,
            check_steps=check_steps,
            near_zero=near_zero,
            unbounded_accuracy=unbounded,
            input_gradients=stats,
            max_zero_grad_fraction=max_zero_grad_fraction,
        )
    settings["checks"] = checks
    return AttackReport(
        table=table,
        flags=flags,
        clean_accuracy=clean_accuracy,
        n_examples=len(y),
        settings=settings,
        checks=details,
        model_name=getattr(model, "model_name", ""),
    )


def curves(table: pd.DataFrame, mode: str = "untargeted") -> pd.DataFrame:
    """One row per attack/loss, one column per ε: accuracy (untargeted) or targeted success."""
    col = "accuracy" if mode == "untargeted" else "targeted_success"
    sub = table[table["mode"] == mode]
    return sub.pivot_table(index=["attack", "loss"], columns="eps", values=col, sort=False)


__all__ = [
    "EPS_UNITS",
    "TABLE_COLUMNS",
    "WORST",
    "AttackError",
    "AttackName",
    "AttackLoss",
    "AttackReport",
    "LinfSignAttack",
    "margin_loss",
    "make_attack",
    "set_target_offset",
    "parse_names",
    "parse_eps",
    "predict",
    "adversarial_predictions",
    "eps_sweep",
    "monotone_flags",
    "iterative_flags",
    "input_gradient_stats",
    "gradient_flags",
    "unbounded_accuracy",
    "evaluate_attacks",
    "curves",
]
