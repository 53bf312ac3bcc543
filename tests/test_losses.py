"""Spread loss, cross-entropy and margin schedules against plain float64 references."""

import math

import pytest
import torch

from harness import losses
from harness.config import LossConfig


def spread_reference(logits: torch.Tensor, target: torch.Tensor, margin: float) -> float:
    """L = mean_n sum_{i != t} max(0, m - (a_t - a_i))^2 with a = sigmoid(logits), in float64 loops."""
    a = [[1.0 / (1.0 + math.exp(-float(v))) for v in row] for row in logits.double()]
    total = 0.0
    for n, t in enumerate(target.tolist()):
        total += sum(max(0.0, margin - (a[n][t] - a[n][i])) ** 2 for i in range(len(a[n])) if i != t)
    return total / len(a)


@pytest.mark.parametrize("margin", [0.2, 0.5, 0.9])
def test_spread_loss_matches_reference(margin):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 5, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 5, (7,), generator=g)
    got = losses.spread_loss(logits, target, margin).item()
    assert got == pytest.approx(spread_reference(logits, target, margin), rel=1e-6)


def test_spread_loss_gradient_and_zero_when_separated():
    logits = torch.tensor([[10.0, -10.0, -10.0]], requires_grad=True)
    target = torch.tensor([0])
    loss = losses.spread_loss(logits, target, 0.9)
    assert loss.item() < 1e-6  # a_t - a_i ~ 1 > margin
    wrong = torch.tensor([[-2.0, 2.0, 0.0]], requires_grad=True)
    loss = losses.spread_loss(wrong, target, 0.9)
    loss.backward()
    assert loss.item() > 0.5
    assert wrong.grad[0, 0] < 0 and wrong.grad[0, 1] > 0  # push the target up, the wrong class down


def test_cross_entropy_matches_reference():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64)
    target = torch.randint(0, 4, (6,), generator=g)
    ref = 0.0
    for row, t in zip(logits.tolist(), target.tolist()):
        ref += math.log(sum(math.exp(v) for v in row)) - row[t]
    assert losses.cross_entropy(logits, target).item() == pytest.approx(ref / 6, rel=1e-6)


def test_linear_schedule_is_the_seed_articles_per_epoch_steps():
    cfg = LossConfig(margin_schedule="linear", margin_start=0.2, margin_end=0.9, margin_ramp_epochs=7)
    for k in range(12):  # start of epoch k + 1: 0.2, 0.3, ..., 0.9, then 0.9
        assert losses.margin_at(cfg, k) == pytest.approx(min(0.9, 0.2 + 0.1 * k))
    assert losses.margin_at(cfg, 0.5) == pytest.approx(0.25)


def test_sigmoid_schedule_reproduces_the_official_formula():
    steps_per_epoch = 468
    cfg = LossConfig(
        margin_schedule="sigmoid",
        margin_start=0.2,
        margin_end=0.99,
        margin_ramp_epochs=losses.official_ramp_epochs(steps_per_epoch),
    )
    for step in [0, 1000, 50_000, 200_000, 400_000, 700_000, 900_000]:
        official = 0.2 + 0.79 / (1 + math.exp(-min(10.0, step / 50_000 - 4)))
        assert losses.margin_at(cfg, step / steps_per_epoch) == pytest.approx(official, rel=1e-9)


def test_constant_schedule_and_bad_configs():
    assert losses.margin_at(LossConfig(margin_schedule="constant", margin_end=0.7), 123.0) == 0.7
    with pytest.raises(ValueError, match="margin_schedule"):
        losses.check_loss_config(LossConfig(margin_schedule="cosine"))
    with pytest.raises(ValueError, match="ramp"):
        losses.check_loss_config(LossConfig(margin_ramp_epochs=0))
    with pytest.raises(ValueError, match="must lie in"):
        losses.check_loss_config(LossConfig(margin_end=1.5))


def test_loss_names_resolve():
    assert losses.resolve_loss_name("auto", "spread") is losses.LossName.SPREAD
    assert losses.resolve_loss_name("auto", "cross_entropy") is losses.LossName.CROSS_ENTROPY
    assert losses.resolve_loss_name("cross_entropy", "spread") is losses.LossName.CROSS_ENTROPY
    assert losses.get_loss("spread") is losses.spread_loss
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        losses.resolve_loss_name("hinge", "spread")
