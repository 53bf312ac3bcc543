"""What a training is built from: checked settings, datasets, model, optimiser, and a run's resume state."""

from __future__ import annotations

import math
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import models
from harness import checkpoint, data, evaluate, losses, schedule, tracking
from harness.config import ConfigError, RunConfig, check_model_name, flatten, recorded_config
from harness.device import resolve_device
from harness.errors import CapsbenchError

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
PRECISIONS = ("fp32", "bf16")
# what --resume may change: the schedule from the next epoch on, and how the run executes (not what it
# learns; data.root only to the same files, checked by their sha256s)
RESUME_APPLIED = ("optim.lr", "optim.weight_decay", "train.epochs")
RESUME_CHANGEABLE = RESUME_APPLIED + (
    "train.device", "train.threads", "train.precision", "train.compile", "train.multicrop",
    "train.save_every", "train.system_metrics", "data.eval_batch_size", "data.root",
)  # fmt: skip


class TrainingError(CapsbenchError, RuntimeError):
    """A training that cannot go on; ``run_id`` names its MLflow run (resumable with --resume)."""

    exit_code = 1

    def __init__(self, message: str, run_id: str | None = None):
        super().__init__(message)
        self.run_id = run_id


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; the run is FAILED and its last good checkpoint is kept."""


def check_config(cfg: RunConfig) -> None:
    """Reject bad settings before anything is built or logged (one line each, with the fix)."""
    check_model_name(cfg.model.name)
    if cfg.data.view not in data.VIEWS:
        raise ConfigError(f"data.view={cfg.data.view!r}: use one of {', '.join(data.VIEWS)}")
    if cfg.optim.optimizer not in OPTIMIZERS:
        raise ConfigError(f"optim.optimizer={cfg.optim.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
    if cfg.train.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={cfg.train.precision!r}: use one of {', '.join(PRECISIONS)}")
    for key, value, low in [
        ("train.epochs", cfg.train.epochs, 1),
        ("data.batch_size", cfg.data.batch_size, 1),
        ("data.eval_batch_size", cfg.data.eval_batch_size, 1),
        ("data.limit_train", cfg.data.limit_train, 0),
        ("data.limit_test", cfg.data.limit_test, 0),
        ("train.save_every", cfg.train.save_every, 0),
    ]:
        if value < low:
            raise ConfigError(f"{key}={value} must be >= {low}")
    if not (cfg.optim.lr >= 0 and 0 < cfg.optim.lr_decay <= 1):
        raise ConfigError(
            f"optim.lr={cfg.optim.lr} must be > 0 (or 0 for the model's default) and "
            f"optim.lr_decay={cfg.optim.lr_decay} in (0, 1]"
        )
    if cfg.optim.schedule not in schedule.CHOICES:
        names = ", ".join(map(repr, schedule.CHOICES))
        raise ConfigError(f"unknown optim.schedule {cfg.optim.schedule!r}: use one of {names}")
    if 0 < cfg.optim.schedule_epochs < cfg.train.epochs or cfg.optim.schedule_epochs < 0:
        raise ConfigError(
            f"optim.schedule_epochs={cfg.optim.schedule_epochs} must be 0 (= train.epochs) or at least "
            f"train.epochs={cfg.train.epochs}: the rate would reach 0 before the run ends"
        )
    try:
        losses.check_loss_config(cfg.loss)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    reserved = {"in_channels", "num_classes", "input_size"} & set(cfg.model.args)
    if reserved:
        raise ConfigError(
            f"model.args.{sorted(reserved)[0]} is set from the dataset; remove it from model.args"
        )


@dataclass
class Datasets:
    train: Any
    val: Any
    test: Any
    familiar: np.ndarray | None  # test rows seen from familiar viewpoints (view split only)


def load_datasets(cfg: RunConfig) -> Datasets:
    """Train / val (from the training files) and test datasets; limits applied with a fixed seed."""
    d = cfg.data
    view = None if d.view == "none" else d.view
    common = dict(view=view, channels=d.channels, root=d.root or None, val_fraction=d.val_fraction)
    common["progress"] = sys.stderr.isatty()
    train = data.get_dataset(d.name, "train", **common)
    val = data.get_dataset(d.name, "val", **common)
    test = data.get_dataset(d.name, "test", subset="all", **common)
    if d.limit_train:
        train = _take(train, d.limit_train)
        val = _take(val, max(1, d.limit_train // 4))
    if d.limit_test:
        test = _take(test, d.limit_test)
    familiar = data.familiar_mask(test.meta, view) if view else None
    return Datasets(train, val, test, familiar)


def build_model(cfg: RunConfig, train_ds) -> nn.Module:
    """``cfg.model.args`` plus in_channels / num_classes / input_size from the dataset."""
    kwargs = dict(
        cfg.model.args,
        in_channels=train_ds.in_channels,
        num_classes=len(train_ds.classes),
        input_size=train_ds.input_size,
    )
    try:
        return models.create_model(cfg.model.name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"model {cfg.model.name!r} rejected its arguments ({e}); check model.args") from e


def with_model_defaults(cfg: RunConfig, model: nn.Module) -> RunConfig:
    """``cfg`` with ``optim.lr = 0`` and ``optim.schedule = "auto"`` replaced by the model's
    ``default_lr`` and ``default_schedule``: runs log the rate and schedule they used."""
    lr = cfg.optim.lr or model.default_lr
    return replace(
        cfg,
        optim=replace(
            cfg.optim, lr=lr, schedule=schedule.resolve(cfg.optim.schedule, model.default_schedule)
        ),
    )


def resumed_config(cfg: RunConfig, state: dict) -> RunConfig:
    """``cfg`` for resuming the run of ``state``: ``optim.schedule = "auto"`` means the schedule it ran on."""
    if cfg.optim.schedule != schedule.AUTO:
        return cfg
    recorded = recorded_config(state["config"])["optim"]["schedule"]
    return replace(cfg, optim=replace(cfg.optim, schedule=recorded))


@dataclass
class Training:
    """A training's moving parts: built before the first epoch, ``history`` onwards updated after each."""

    cfg: RunConfig
    device: torch.device
    ds: Datasets
    model: nn.Module  # the plain model, what checkpoints record
    runner: nn.Module  # what trains and evaluates: the model or its torch.compile wrapper
    loss_name: losses.LossName
    loss_fn: Callable
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    history: list[dict[str, float]] = field(default_factory=list)  # one dict of metrics per epoch
    best: dict = field(default_factory=lambda: {"epoch": 0, "val_error": math.inf})
    train_seconds: float = 0.0
    start_epoch: int = 0  # epochs completed before this process started (a resumed run)

    def predict(self, dataset, *, multicrop: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and labels of ``dataset`` with the run's eval batch size, device and precision."""
        fn = evaluate.predict_multicrop if multicrop else evaluate.predict
        d, t = self.cfg.data, self.cfg.train
        return fn(
            self.runner, dataset, batch_size=d.eval_batch_size, device=self.device, precision=t.precision
        )


def build_training(cfg: RunConfig, state: dict | None = None) -> Training:
    """Seed, load the data, build model, loss and optimiser; continue from ``state`` (a run's resume
    state) when given."""
    _setup_torch(cfg)
    device = resolve_device(cfg.train.device)
    ds = load_datasets(cfg)
    if cfg.train.multicrop and ds.test.images.shape[-1] <= ds.test.input_size:
        raise ConfigError(
            f"train.multicrop needs images larger than the model input; {cfg.data.name} has none"
        )
    model = build_model(cfg, ds.train).to(device)
    cfg = with_model_defaults(cfg if state is None else resumed_config(cfg, state), model)
    loss_name = losses.resolve_loss_name(cfg.loss.name, model.default_loss)
    optimizer = OPTIMIZERS[cfg.optim.optimizer](
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    steps = schedule.steps_per_epoch(len(ds.train), cfg.data.batch_size)
    done = state["epoch"] * steps if state is not None else 0
    scheduler = schedule.build_scheduler(optimizer, cfg, steps, steps_done=done)
    t = Training(
        cfg=cfg,
        device=device,
        ds=ds,
        model=model,
        runner=model,
        loss_name=loss_name,
        loss_fn=losses.get_loss(loss_name),
        optimizer=optimizer,
        scheduler=scheduler,
    )
    if state is not None:
        _restore(t, state)
    if cfg.train.compile:
        t.runner = torch.compile(model)
    return t


# ---------------------------------------------------------------------------------------------
# resume
# ---------------------------------------------------------------------------------------------


def load_resume(run_id: str, cfg: RunConfig, force: bool) -> dict:
    """The run's resume state, after checking nobody else trains it and ``cfg`` changes only what may."""
    note = tracking.claim_run(run_id, force=force)
    if note:
        print(f"note: {note}", file=sys.stderr)
    try:
        state = tracking.load_resume_state(run_id)
    except tracking.CheckpointFileError:
        raise
    except tracking.TrackingError as e:
        raise TrainingError(
            f"cannot resume run {run_id}: {e}; it has no completed epoch to resume from, start a new run"
        ) from e
    old, new = flatten(recorded_config(state["config"])), flatten(resumed_config(cfg, state))
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key) and key not in RESUME_CHANGEABLE:
            raise ConfigError(
                f"--resume cannot change {key} (the run was trained with {old.get(key)!r}, now "
                f"{new.get(key)!r}); it may change only {', '.join(RESUME_CHANGEABLE)}: start a new run"
            )
    return state


def _restore(t: Training, state: dict) -> None:
    """The model and run state of ``state`` (the optimiser and the schedule's position are restored by
    build_training; a changed optim.lr or train.epochs takes effect through the schedule)."""
    t.model.load_state_dict(state["state_dict"])
    _apply_weight_decay_change(t, state)
    t.history, t.best, t.train_seconds = state["history"], state["best"], state["train_seconds"]
    t.start_epoch = state["epoch"]
    checkpoint.set_rng_state(state["rng"])  # last: building the model drew from the RNG


def _apply_weight_decay_change(t: Training, state: dict) -> None:
    """A changed optim.weight_decay applies from the next step (the restored optimiser keeps the old one)."""
    new, old = t.cfg.optim, state["config"]["optim"]
    if new.weight_decay != old["weight_decay"]:
        for group in t.optimizer.param_groups:
            group["weight_decay"] = new.weight_decay


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _setup_torch(cfg: RunConfig) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # also seeds every CUDA device
    if cfg.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def _take(dataset, n: int):
    """The first ``n`` rows of a fixed random permutation (seed 0), so every run sees the same subset."""
    if n >= len(dataset):
        return dataset
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return dataset.select(index)
