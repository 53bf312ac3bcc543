"""The learning-rate schedules: their formulas, per-step stepping in a run, and exact resumption."""

import math

import pytest
import torch

import models
from harness import schedule
from harness.config import ConfigError, RunConfig, apply_overrides
from harness.train import check_config
from harness.train.setup import with_model_defaults


def config(*overrides: str) -> RunConfig:
    return apply_overrides(RunConfig(), list(overrides))


def test_exponential_steps_down_once_per_epoch():
    cfg = config("optim.schedule=exponential", "optim.lr_decay=0.5")
    assert [schedule.lr_factor(cfg, p) for p in (0, 0.99, 1, 2.5, 3)] == [1, 1, 0.5, 0.25, 0.125]


def test_cosine_falls_from_one_to_zero_over_the_run():
    cfg = config("optim.schedule=cosine", "train.epochs=4")
    assert schedule.lr_factor(cfg, 0) == 1
    assert schedule.lr_factor(cfg, 2) == pytest.approx(0.5)
    assert schedule.lr_factor(cfg, 4) == pytest.approx(0, abs=1e-12)
    factors = [schedule.lr_factor(cfg, p / 10) for p in range(41)]
    assert all(a > b for a, b in zip(factors, factors[1:]))
    assert schedule.lr_factor(cfg, 1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def _rates(cfg: RunConfig, steps_per_epoch: int, steps: int, steps_done: int = 0) -> list[float]:
    """The rate of each optimiser step from ``steps_done`` on, stepping as the runner does."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight], lr=123.0)  # the schedule sets the rate from cfg
    scheduler = schedule.build_scheduler(optimizer, cfg, steps_per_epoch, steps_done=steps_done)
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name", ["exponential", "cosine"])
def test_the_scheduler_follows_the_formula_and_resumes_where_it_stopped(name):
    cfg = config(f"optim.schedule={name}", "optim.lr=0.01", "optim.lr_decay=0.7", "train.epochs=3")
    rates = _rates(cfg, steps_per_epoch=5, steps=15)
    assert rates == pytest.approx([0.01 * schedule.lr_factor(cfg, s / 5) for s in range(15)], rel=1e-12)
    assert _rates(cfg, steps_per_epoch=5, steps=10, steps_done=5) == pytest.approx(rates[5:], rel=1e-12)


def test_a_resumed_cosine_with_more_epochs_stretches_from_where_it_is():
    cfg = config("optim.schedule=cosine", "optim.lr=0.01", "train.epochs=2")
    longer = config("optim.schedule=cosine", "optim.lr=0.01", "train.epochs=4")
    (first,) = _rates(longer, steps_per_epoch=5, steps=1, steps_done=5)
    assert first == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert _rates(cfg, steps_per_epoch=5, steps=1, steps_done=5)[0] == pytest.approx(0.005)


def test_a_longer_cosine_length_runs_the_start_of_that_cosine():
    trial = config("optim.schedule=cosine", "train.epochs=2", "optim.schedule_epochs=8")
    final = config("optim.schedule=cosine", "train.epochs=8")
    for progress in (0, 1, 2):
        assert schedule.lr_factor(trial, progress) == schedule.lr_factor(final, progress)
    assert schedule.lr_factor(trial, 2) > 0.8  # not annealed: the final run goes on from there
    check_config(trial)
    with pytest.raises(ConfigError, match="optim.schedule_epochs=1 must be 0 .* or at least train.epochs=2"):
        check_config(config("train.epochs=2", "optim.schedule_epochs=1"))


def test_an_unknown_schedule_is_refused_by_name():
    message = "unknown optim.schedule 'linear': use one of 'auto', 'exponential', 'cosine'"
    with pytest.raises(ConfigError, match=message):
        check_config(config("optim.schedule=linear"))


@pytest.mark.parametrize("model, want", [("em_capsnet_small", "cosine"), ("cnn_small", "exponential")])
def test_auto_takes_each_familys_schedule_and_an_explicit_one_wins(model, want):
    built = models.create_model(model, input_size=28, num_classes=10)
    assert with_model_defaults(config(), built).optim.schedule == want
    assert with_model_defaults(config("optim.schedule=cosine"), built).optim.schedule == "cosine"
