"""Gradient-masking checks (AutoAttack-style sanity) on a sweep's table and on the model itself.

Curves monotone in ε; iterative attacks at least as strong as FGSM; an unbounded attack (ε = 1) drives
accuracy near 0; input gradients are non-zero and finite. Each failed check is a flag (one line).
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness.attack.attacks import adversarial_predictions, make_attack, margin_loss, predicted_classes
from harness.attack.settings import AttackLoss, AttackName, AttackSettings


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
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: AttackSettings
) -> dict[str, dict[str, float]]:
    """Per loss: the fraction of examples whose input gradient is all zero, and the fraction non-finite."""
    settings = settings.validated()
    device = next(model.parameters()).device
    model.eval()
    out = {}
    for loss in settings.losses:
        zero = bad = 0
        for i in range(0, len(x), settings.batch_size):
            xb = x[i : i + settings.batch_size].to(device).requires_grad_(True)
            yb = y[i : i + settings.batch_size].to(device)
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
        out[loss] = {"zero_fraction": zero / len(x), "nonfinite_fraction": bad / len(x)}
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
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, settings: AttackSettings, *, progress: bool = True
) -> float:
    """Worst-case accuracy over the losses under BIM with ε = 1 (any image in [0,1]) for ``check_steps``."""
    settings = settings.validated()
    device = next(model.parameters()).device
    n_batches = math.ceil(len(x) / settings.batch_size)
    clean_pred, _ = predicted_classes(model, x, settings.batch_size, device)
    robust = clean_pred == y
    bar = tqdm(
        total=len(settings.losses) * n_batches,
        desc="unbounded check",
        unit="batch",
        disable=not progress,
        leave=False,
    )
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        for loss in settings.losses:
            idx = robust.nonzero().squeeze(1)  # only examples no loss has broken yet
            atk = make_attack(model, AttackName.BIM, loss, 1.0, settings.check_steps)
            if len(idx):
                robust[idx] = (
                    adversarial_predictions(model, atk, x[idx], y[idx], settings.batch_size, device, bar)
                    == y[idx]
                )
            bar.update(max(0, n_batches - math.ceil(len(idx) / settings.batch_size)))
    bar.close()
    return float(robust.float().mean())


def masking_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    table: pd.DataFrame,
    settings: AttackSettings,
    *,
    progress: bool = True,
) -> tuple[list[str], dict[str, Any]]:
    """Every check on a sweep's ``table`` and on ``model`` -> (flags, the numbers behind them).

    Monotone curves and iterative ≥ FGSM with slack ``tolerance`` + one example; BIM with ε = 1 and
    ``check_steps`` steps on the first ``check_examples`` examples must leave accuracy ≤ ``near_zero``;
    more than ``max_zero_grad_fraction`` of examples with an all-zero input gradient is a flag.
    """
    s = settings.validated()
    slack = s.tolerance + 1.0 / len(y)
    flags, notes = monotone_flags(table, slack)
    flags += iterative_flags(table, slack)
    m = min(s.check_examples, len(y))
    stats = input_gradient_stats(model, x[:m], y[:m], s)
    flags += gradient_flags(stats, s.max_zero_grad_fraction)
    unbounded = unbounded_accuracy(model, x[:m], y[:m], s, progress=progress)
    if unbounded > s.near_zero:
        flags.append(
            f"unbounded-attack: BIM at eps 1 ({s.check_steps} steps, worst over losses) leaves accuracy "
            f"{unbounded:.3f} > {s.near_zero} on {m} examples (gradient masking, or too few steps?)"
        )
    details = dict(
        notes=notes,
        tolerance=slack,
        check_examples=m,
        check_steps=s.check_steps,
        near_zero=s.near_zero,
        unbounded_accuracy=unbounded,
        input_gradients=stats,
        max_zero_grad_fraction=s.max_zero_grad_fraction,
    )
    return flags, details
