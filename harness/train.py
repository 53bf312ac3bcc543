"""The common runner: train any registered model on any registered dataset and record it in MLflow.

    python -m harness.train --model cnn_small --data synthnorb --view azimuth --epochs 10
    python -m harness.train --config studies/x.toml --set optim.lr=0.001 --set model.args.final_lambda=0.02
    python -m harness.train --resume RUN_ID             # continue an interrupted / failed / pruned run
    python -m harness.train --help

Python API (what the studies call)::

    result = fit(cfg, parent_run_id=None, tags=None, epoch_callback=None, resume_run_id=None)

One MLflow run per training (see docs/contracts.md "Tracking"). Every epoch: train loss and error,
validation error, test error (familiar / novel with a view split), a model checkpoint and the full resume
state, written atomically. ``epoch_callback(epoch, metrics) -> bool`` runs after each epoch's evaluation
and checkpoint; returning True stops the run as pruned (MLflow status KILLED). A NaN/inf loss stops the
run FAILED, keeping the last good checkpoint; Ctrl-C ends it KILLED. Both resume with ``--resume``, from
the last completed epoch, and a resumed run equals an uninterrupted one exactly on the CPU. A resume may
change only RESUME_CHANGEABLE (the learning rate, weight decay and epochs, applied from the next epoch, and
how the run executes); it is refused while the run's owner process is alive (``--force`` overrides).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

import models
from harness import checkpoint, data, evaluate, losses, tracking
from harness.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    check_model_name,
    flatten,
    load_config,
    to_dict,
)
from harness.device import autocast, describe, resolve_device, synchronize
from harness.errors import CapsbenchError, cli_errors

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


@dataclass
class FitResult:
    run_id: str
    history: list[dict[str, float]] = field(default_factory=list)  # one dict of metrics per epoch
    best_epoch: int = 0  # epoch with the lowest val_error (the earliest on ties)
    best_val_error: float = float("nan")
    final_test_error: float = float("nan")  # test error after the last epoch that ran
    pruned: bool = False  # stopped by epoch_callback
    status: str = "FINISHED"  # MLflow status: FINISHED | KILLED
    multicrop_test_error: float | None = None
    train_seconds: float = 0.0


@dataclass
class Datasets:
    train: Any
    val: Any
    test: Any
    familiar: np.ndarray | None  # test rows seen from familiar viewpoints (view split only)


# ---------------------------------------------------------------------------------------------
# the Python API
# ---------------------------------------------------------------------------------------------


def fit(
    cfg: RunConfig,
    *,
    parent_run_id: str | None = None,
    tags: dict | None = None,
    epoch_callback: Callable[[int, dict], bool] | None = None,
    resume_run_id: str | None = None,
    force_resume: bool = False,
) -> FitResult:
    """Train ``cfg.model`` on ``cfg.data`` for ``cfg.train.epochs`` epochs, tracked as one MLflow run.

    ``force_resume``: resume even a RUNNING run whose owner process is alive or on another machine.
    """
    check_config(cfg)
    state = _load_resume(resume_run_id, cfg, force_resume) if resume_run_id else None
    _setup_torch(cfg)
    device = resolve_device(cfg.train.device)
    ds = load_datasets(cfg)
    if cfg.train.multicrop and ds.test.images.shape[-1] <= ds.test.input_size:
        raise ConfigError(
            f"train.multicrop needs images larger than the model input; {cfg.data.name} has none"
        )
    model = build_model(cfg, ds.train).to(device)
    loss_name = losses.resolve_loss_name(cfg.loss.name, model.default_loss)
    loss_fn = losses.get_loss(loss_name)
    optimizer = OPTIMIZERS[cfg.optim.optimizer](
        model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.optim.lr_decay)
    history: list[dict[str, float]] = []
    best = {"epoch": 0, "val_error": math.inf}
    train_seconds, start_epoch = 0.0, 0
    if state is not None:
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _apply_resume_changes(optimizer, scheduler, cfg, state)
        history, best, train_seconds = state["history"], state["best"], state["train_seconds"]
        start_epoch = state["epoch"]
        checkpoint.set_rng_state(state["rng"])  # last: building the model above drew from the RNG
    runner = torch.compile(model) if cfg.train.compile else model

    run = _open_run(cfg, model, ds, device, state, resume_run_id, parent_run_id, tags, loss_name)
    print(
        f"[{run.run_id}] {_run_name(cfg)}: {describe(device)}, "
        f"{_n_params(model):,} parameters, loss {loss_name}"
    )
    if start_epoch >= cfg.train.epochs:
        print(f"[{run.run_id}] already trained {start_epoch} of {cfg.train.epochs} epochs; nothing to do")
    status, pruned, last_test = "FAILED", False, None
    try:
        for epoch in range(start_epoch + 1, cfg.train.epochs + 1):
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            train_metrics = train_one_epoch(
                runner, loss_fn, optimizer, ds.train, cfg, epoch, device, run.run_id
            )
            scheduler.step()
            if loss_name is not losses.LossName.SPREAD:
                del train_metrics["margin"]  # only the spread loss has a margin
            eval_metrics, *last_test = evaluate_epoch(runner, ds, cfg, device)
            metrics = {**train_metrics, **eval_metrics, "lr": lr}
            metrics["epoch_seconds"] = time.perf_counter() - t0
            train_seconds += metrics["epoch_seconds"]
            history.append({"epoch": epoch, **metrics})
            if metrics["val_error"] < best["val_error"]:
                best = {"epoch": epoch, "val_error": metrics["val_error"]}
                run.save_torch(checkpoint.model_record(model, epoch), tracking.checkpoint_file("best"))
            if cfg.train.save_every and epoch % cfg.train.save_every == 0:
                run.save_torch(checkpoint.model_record(model, epoch), tracking.checkpoint_file(epoch))
            run.log_metrics(metrics, step=epoch)
            resume = dict(
                epoch=epoch, config=to_dict(cfg), history=history, best=best, train_seconds=train_seconds
            )
            run.save_torch(
                checkpoint.resume_state(model, optimizer, scheduler, **resume),
                tracking.RESUME_FILE,
                previous=tracking.RESUME_PREVIOUS_FILE,
            )
            print(_epoch_line(run.run_id, epoch, cfg.train.epochs, metrics), flush=True)
            if epoch_callback is not None and epoch_callback(epoch, dict(metrics)):
                pruned = True
                print(f"[{run.run_id}] pruned after epoch {epoch}")
                break
        result = _finish(run, runner, model, ds, cfg, device, history, best, train_seconds, pruned, last_test)
        status = "KILLED" if pruned else "FINISHED"
        result.status = status
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        done = history[-1]["epoch"] if history else start_epoch
        print(
            f"\n[{run.run_id}] interrupted; checkpoint of epoch {done} kept. "
            f"Continue with: python -m harness.train --resume {run.run_id}",
            file=sys.stderr,
        )
        raise
    except NonFiniteLossError as e:
        e.run_id = run.run_id
        raise
    finally:
        run.end(status)


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
    if not (cfg.optim.lr > 0 and 0 < cfg.optim.lr_decay <= 1):
        raise ConfigError(
            f"optim.lr={cfg.optim.lr} must be > 0 and optim.lr_decay={cfg.optim.lr_decay} in (0, 1]"
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


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


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


def train_one_epoch(
    model, loss_fn, optimizer, dataset, cfg: RunConfig, epoch: int, device, run_id: str = ""
) -> dict:
    """One pass over the training data -> train_loss, train_error, margin, samples_per_s."""
    model.train()
    n_total = len(dataset)
    steps = max(1, math.ceil(n_total / cfg.data.batch_size))
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    wrong = torch.zeros((), device=device, dtype=torch.int64)
    seen, margin = 0, losses.margin_at(cfg.loss, epoch - 1)
    check_every = 1 if device.type == "cpu" else 25  # .item() syncs an accelerator: check less often
    bar = tqdm(
        total=n_total,
        desc=f"epoch {epoch}/{cfg.train.epochs}",
        unit="img",
        leave=False,
        disable=not sys.stderr.isatty(),
        dynamic_ncols=True,
    )
    synchronize(device)
    t0 = last_note = time.perf_counter()
    batches = data.iterate(
        dataset,
        cfg.data.batch_size,
        shuffle=True,
        train=cfg.data.augment,
        seed=_epoch_seed(cfg, epoch),
        device=device,
    )
    for step, (x, y, _) in enumerate(batches):
        margin = losses.margin_at(cfg.loss, epoch - 1 + step / steps)
        with autocast(device, cfg.train.precision):
            logits = model(x)
        loss = loss_fn(logits, y, margin)
        if step % check_every == 0 and not math.isfinite(loss.item()):
            _non_finite(loss.item(), epoch, step, run_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        wrong += (logits.detach().argmax(1) != y).sum()
        seen += len(y)
        bar.update(len(y))
        now = time.perf_counter()
        if not bar.disable and (step % 10 == 0 or seen == n_total):
            bar.set_postfix(
                loss=f"{loss_sum.item() / seen:.4f}",
                err=f"{wrong.item() / seen:.3f}",
                ips=f"{seen / (now - t0):.1f}",
            )
        elif bar.disable and now - last_note > 60:  # plain progress lines for long epochs in logs
            last_note = now
            print(
                f"  epoch {epoch}: {seen}/{n_total} images, loss {loss_sum.item() / seen:.4f}, "
                f"{seen / (now - t0):.1f} img/s",
                flush=True,
            )
    synchronize(device)
    seconds = time.perf_counter() - t0
    bar.close()
    if seen == 0:
        raise TrainingError(
            f"the training set of {cfg.data.name} is empty; check data.limit_train / data.view"
        )
    mean_loss = loss_sum.item() / seen
    if not math.isfinite(mean_loss):
        _non_finite(mean_loss, epoch, steps - 1, run_id)
    return {
        "train_loss": mean_loss,
        "train_error": wrong.item() / seen,
        "margin": margin,
        "samples_per_s": seen / seconds,
        "epoch_train_seconds": seconds,
    }


def evaluate_epoch(
    model, ds: Datasets, cfg: RunConfig, device
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """val_error, test_error and, with a view split, test_familiar_error / test_novel_error.

    Also returns the test predictions and labels (CPU), reused for the end-of-run tables.
    """
    kw = dict(batch_size=cfg.data.eval_batch_size, device=device, precision=cfg.train.precision)
    val_logits, val_labels = evaluate.predict(model, ds.val, **kw)
    test_logits, test_labels = evaluate.predict(model, ds.test, **kw)
    test_preds = test_logits.argmax(1)
    out = {
        "val_error": evaluate.error_rate(val_logits.argmax(1), val_labels),
        "test_error": evaluate.error_rate(test_preds, test_labels),
    }
    if ds.familiar is not None:
        out["test_familiar_error"] = evaluate.masked_error(test_preds, test_labels, ds.familiar)
        out["test_novel_error"] = evaluate.masked_error(test_preds, test_labels, ~ds.familiar)
    return out, test_preds, test_labels


# ---------------------------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------------------------


def _finish(
    run, runner, model, ds, cfg, device, history, best, train_seconds, pruned, last_test
) -> FitResult:
    """End-of-run metrics and artifacts (final model, viewpoint tables, confusion matrix)."""
    last = history[-1] if history else {}
    result = FitResult(
        run_id=run.run_id,
        history=history,
        best_epoch=best["epoch"],
        best_val_error=best["val_error"] if best["epoch"] else float("nan"),
        final_test_error=last.get("test_error", float("nan")),
        pruned=pruned,
        train_seconds=train_seconds,
    )
    final = {
        "best_epoch": result.best_epoch,
        "best_val_error": result.best_val_error,
        "final_test_error": result.final_test_error,
        "train_seconds": train_seconds,
    }
    step = last.get("epoch", 0)
    if pruned or not history:
        run.log_metrics(final, step=step)
        return result
    run.save_torch(checkpoint.model_record(model, step), tracking.checkpoint_file("final"))
    if last_test is None:  # resumed after the last epoch: evaluate the final model again
        logits, labels = evaluate.predict(
            runner, ds.test, batch_size=cfg.data.eval_batch_size, device=device, precision=cfg.train.precision
        )
        last_test = (logits.argmax(1), labels)
    preds, labels = last_test
    with tempfile.TemporaryDirectory() as tmp:
        cm = evaluate.confusion_matrix(preds, labels, len(ds.test.classes))
        run.log_file(evaluate.plot_confusion(cm, list(ds.test.classes), Path(tmp) / "confusion.png"))
        if ds.test.meta is not None:
            tables = evaluate.viewpoint_errors(preds, labels, ds.test.meta)
            report = {
                "epoch": step,
                "view": cfg.data.view,
                "test_error": evaluate.error_rate(preds, labels),
                **evaluate.viewpoint_tables_to_json(tables),
            }
            run.log_json(report, "viewpoint/errors.json")
            title = f"{cfg.model.name} on {cfg.data.name} test, epoch {step}"
            run.log_file(
                evaluate.plot_viewpoint_heatmap(
                    tables["grid"], Path(tmp) / "heatmap.png", title, view=cfg.data.view
                ),
                "viewpoint",
            )
    if cfg.train.multicrop:
        mc_logits, mc_labels = evaluate.predict_multicrop(
            runner, ds.test, batch_size=cfg.data.eval_batch_size, device=device, precision=cfg.train.precision
        )
        result.multicrop_test_error = evaluate.error_rate(mc_logits.argmax(1), mc_labels)
        final["multicrop_test_error"] = result.multicrop_test_error
    run.log_metrics(final, step=step)
    msg = f"[{run.run_id}] done: best epoch {result.best_epoch} (val {result.best_val_error:.4f}), "
    print(msg + f"final test error {result.final_test_error:.4f}", flush=True)
    return result


def _open_run(cfg, model, ds, device, state, resume_run_id, parent_run_id, tags, loss_name):
    system = cfg.train.system_metrics
    identity = json.dumps(_data_identity(ds), sort_keys=True)
    if state is not None:
        recorded = tracking.get_run(resume_run_id).tags.get("data.identity", identity)
        if recorded != identity:
            raise ConfigError(
                f"data.root={cfg.data.root or '(default)'} holds other {cfg.data.name} files than run "
                f"{resume_run_id[:8]} was trained on (their sha256s differ); point data.root at those files"
            )
        run = tracking.resume_run(resume_run_id, system_metrics=system)
        changed = {k: v for k, v in flatten(cfg).items() if flatten(state["config"]).get(k) != v}
        run.set_tags({"capsbench.resumed_from_epoch": state["epoch"], "device": describe(device)})
        if changed:  # MLflow params are immutable: record what differs from the logged params as a tag
            run.set_tags({"capsbench.resume_overrides": json.dumps(changed, sort_keys=True, default=str)})
        return run
    run_tags = {
        "capsbench.kind": "trial" if parent_run_id else "train",
        "capsbench.model": cfg.model.name,
        "capsbench.family": getattr(model, "family", "unknown"),
        "capsbench.loss": str(loss_name),
        "device": describe(device),
        "data.identity": identity,
        "versions": json.dumps(tracking.versions(), sort_keys=True),
        **tracking.git_info(),
        **(tags or {}),
    }
    run = tracking.start_run(
        cfg.experiment, _run_name(cfg), tags=run_tags, parent_run_id=parent_run_id, system_metrics=system
    )
    try:
        run.log_params({**flatten(cfg), "n_params": _n_params(model)})
        run.log_config(cfg)
    except BaseException:
        run.end("FAILED")
        raise
    return run


def _data_identity(ds: Datasets) -> dict:
    """file name -> sha256 of the files behind each split (the run's ``data.identity`` tag)."""
    return {split: getattr(getattr(ds, split), "identity", {}) for split in ("train", "val", "test")}


def _load_resume(run_id: str, cfg: RunConfig, force: bool) -> dict:
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
    old, new = flatten(state["config"]), flatten(cfg)
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) != new.get(key) and key not in RESUME_CHANGEABLE:
            raise ConfigError(
                f"--resume cannot change {key} (the run was trained with {old.get(key)!r}, now "
                f"{new.get(key)!r}); it may change only {', '.join(RESUME_CHANGEABLE)}: start a new run"
            )
    return state


def _apply_resume_changes(optimizer, scheduler, cfg: RunConfig, state: dict) -> None:
    """A changed optim.lr restarts the schedule from it (epoch k+1 runs at lr * lr_decay^k); a changed
    optim.weight_decay applies from the next step (the restored optimiser would keep the old values)."""
    old = state["config"]["optim"]
    if cfg.optim.lr != old["lr"]:
        lr = cfg.optim.lr * cfg.optim.lr_decay ** state["epoch"]
        for group in optimizer.param_groups:
            group["lr"], group["initial_lr"] = lr, cfg.optim.lr
        scheduler.base_lrs = [cfg.optim.lr for _ in optimizer.param_groups]
        scheduler._last_lr = [lr for _ in optimizer.param_groups]
    if cfg.optim.weight_decay != old["weight_decay"]:
        for group in optimizer.param_groups:
            group["weight_decay"] = cfg.optim.weight_decay


def _setup_torch(cfg: RunConfig) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)  # also seeds every CUDA device
    if cfg.train.deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def _take(dataset, n: int):
    """The first ``n`` rows of a fixed random permutation (seed 0), so every run sees the same subset."""
    if n >= len(dataset):
        return dataset
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:n].sort().values
    return dataset.select(index)


def _epoch_seed(cfg: RunConfig, epoch: int) -> int:
    """Seed of an epoch's data order and augmentation: a function of (seed, epoch), so resume replays it."""
    return cfg.train.seed * 100_003 + epoch


def _non_finite(value: float, epoch: int, step: int, run_id: str) -> None:
    raise NonFiniteLossError(
        f"loss became {value} at epoch {epoch}, batch {step + 1}; stopped, the checkpoint of "
        f"epoch {epoch - 1} is kept. Lower optim.lr (or change the loss) and resume with: "
        f"python -m harness.train --resume {run_id} --set optim.lr=...",
        run_id,
    )


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _run_name(cfg: RunConfig) -> str:
    if cfg.run_name:
        return cfg.run_name
    return "-".join([cfg.model.name, cfg.data.name] + ([cfg.data.view] if cfg.data.view != "none" else []))


def _epoch_line(run_id: str, epoch: int, epochs: int, m: dict) -> str:
    parts = [
        f"loss {m['train_loss']:.4f}",
        f"train {m['train_error']:.4f}",
        f"val {m['val_error']:.4f}",
        f"test {m['test_error']:.4f}",
    ]
    if "test_novel_error" in m:
        parts += [f"familiar {m['test_familiar_error']:.4f}", f"novel {m['test_novel_error']:.4f}"]
    parts += [f"{m['samples_per_s']:.1f} img/s", f"{m['epoch_seconds']:.1f}s"]
    return f"[{run_id[:8]}] epoch {epoch}/{epochs}: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------

# convenience flags -> config keys (applied after --config, before --set)
_FLAGS = {
    "model": "model.name",
    "data": "data.name",
    "view": "data.view",
    "epochs": "train.epochs",
    "batch_size": "data.batch_size",
    "lr": "optim.lr",
    "loss": "loss.name",
    "device": "train.device",
    "precision": "train.precision",
    "seed": "train.seed",
    "limit_train": "data.limit_train",
    "limit_test": "data.limit_test",
    "experiment": "experiment",
    "run_name": "run_name",
    "threads": "train.threads",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.train",
        description="Train a registered model on a registered dataset; every run is recorded in MLflow "
        "(see `python -m harness.tracking uri`). Settings: defaults <- --config <- flags <- --set. "
        "Each flag names the config key it sets and that key's default.",
    )
    defaults = flatten(RunConfig())

    def key(text: str, name: str) -> str:
        return f"{text} [{name}, default {defaults[name]!r}]"

    p.add_argument(
        "--config", metavar="FILE", help="TOML file with the settings that differ from the defaults"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override any setting, e.g. --set optim.lr=0.001 --set model.args.final_lambda=0.02 "
        "(type-checked; unknown keys are errors); repeatable",
    )
    p.add_argument("--model", help=key(f"registered model: {', '.join(models.list_models())}", "model.name"))
    p.add_argument("--data", help=key("registered dataset (harness.data.list_datasets())", "data.name"))
    p.add_argument(
        "--view", choices=data.VIEWS, help=key("novel-viewpoint split of NORB-format data", "data.view")
    )
    p.add_argument("--epochs", type=int, help=key("number of epochs", "train.epochs"))
    p.add_argument("--batch-size", type=int, help=key("training batch size", "data.batch_size"))
    p.add_argument(
        "--lr", type=float, help=key("initial learning rate, decayed by optim.lr_decay per epoch", "optim.lr")
    )
    p.add_argument(
        "--loss",
        choices=[n.value for n in losses.LossName],
        help=key("auto = the model's default", "loss.name"),
    )
    p.add_argument("--device", help=key("auto (cuda, mps, cpu) | cpu | cuda | cuda:N | mps", "train.device"))
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        help=key("bf16 autocasts; EM routing stays float32", "train.precision"),
    )
    p.add_argument(
        "--compile", action="store_true", default=None, help=key("torch.compile the model", "train.compile")
    )
    p.add_argument(
        "--deterministic",
        action="store_true",
        default=None,
        help=key("deterministic algorithms only", "train.deterministic"),
    )
    p.add_argument(
        "--multicrop",
        action="store_true",
        default=None,
        help=key("also report the multi-crop test error", "train.multicrop"),
    )
    p.add_argument(
        "--seed", type=int, help=key("seed of weights, data order, augmentation, dropout", "train.seed")
    )
    p.add_argument(
        "--threads", type=int, help=key("torch CPU threads (0 = torch's default)", "train.threads")
    )
    p.add_argument(
        "--limit-train", type=int, help=key("train on this many images (0 = all)", "data.limit_train")
    )
    p.add_argument(
        "--limit-test", type=int, help=key("test on this many images (0 = all)", "data.limit_test")
    )
    p.add_argument("--experiment", help=key("MLflow experiment", "experiment"))
    p.add_argument("--run-name", help=key("MLflow run name; '' = <model>-<data>[-<view>]", "run_name"))
    p.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue this run (id or a unique prefix, e.g. the 8 characters the logs print) from its last "
        f"completed epoch with its logged config; --set may change {', '.join(RESUME_APPLIED)} (applied "
        "from the next epoch) and how it runs (train.device, train.threads, ...); other keys are refused",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: resume even a RUNNING run whose process is alive or on another machine",
    )
    p.add_argument("--parent-run-id", metavar="RUN_ID", help="nest the new run under this MLflow run")
    p.add_argument(
        "--tag", metavar="KEY=VALUE", action="append", default=[], help="extra MLflow run tag; repeatable"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    flags = [
        f"{key}={_literal(getattr(args, attr))}"
        for attr, key in _FLAGS.items()
        if getattr(args, attr) is not None
    ]
    flags += [f"train.{k}=true" for k in ("compile", "deterministic", "multicrop") if getattr(args, k)]
    if args.resume:
        if args.config:
            raise ConfigError(
                "--resume uses the run's logged config; drop --config (use --set to change keys)"
            )
        return apply_overrides(tracking.load_config(args.resume), flags + args.overrides)
    return load_config(RunConfig, args.config, flags + args.overrides)


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.force and not args.resume:
        raise ConfigError("--force applies to --resume only; drop it")
    if args.resume:
        args.resume = tracking.resolve_run_id(args.resume)
    if args.parent_run_id:
        args.parent_run_id = tracking.resolve_run_id(args.parent_run_id)
    cfg = config_from_args(args)
    if args.print_config:
        from harness.config import dumps_toml

        print(dumps_toml(to_dict(cfg)), end="")
        return 0
    tags = dict(t.split("=", 1) for t in args.tag if "=" in t)
    if len(tags) != len(args.tag):
        raise ConfigError("--tag must look like KEY=VALUE")
    fit(
        cfg,
        parent_run_id=args.parent_run_id,
        tags=tags,
        resume_run_id=args.resume,
        force_resume=args.force,
    )
    return 0


def _literal(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else str(value)


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["fit", "FitResult", "TrainingError", "NonFiniteLossError", "check_config", "main"]
