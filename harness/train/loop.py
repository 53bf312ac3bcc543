"""``fit``: one training, epoch after epoch, recorded as one tracking run."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from harness import checkpoint, evaluate, losses, tracking
from harness.config import RunConfig
from harness.device import describe
from harness.train import record
from harness.train.epoch import epoch_line, evaluate_epoch, train_one_epoch
from harness.train.setup import NonFiniteLossError, Training, build_training, check_config, load_resume


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
    state = load_resume(resume_run_id, cfg, force_resume) if resume_run_id else None
    t = build_training(cfg, state)
    if state is None:
        run = record.start_run(t, parent_run_id=parent_run_id, tags=tags)
    else:
        run = record.reopen_run(t, resume_run_id, state)
    print(
        f"[{run.run_id}] {record.run_name(cfg)}: {describe(t.device)}, "
        f"{record.n_params(t.model):,} parameters, loss {t.loss_name}"
    )
    if t.start_epoch >= cfg.train.epochs:
        print(f"[{run.run_id}] already trained {t.start_epoch} of {cfg.train.epochs} epochs; nothing to do")
    status, pruned, last_test = "FAILED", False, None
    try:
        for epoch in range(t.start_epoch + 1, cfg.train.epochs + 1):
            metrics, last_test = _epoch(t, run, epoch)
            if epoch_callback is not None and epoch_callback(epoch, dict(metrics)):
                pruned = True
                print(f"[{run.run_id}] pruned after epoch {epoch}")
                break
        result = _finish(t, run, pruned, last_test)
        status = "KILLED" if pruned else "FINISHED"
        result.status = status
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        done = t.history[-1]["epoch"] if t.history else t.start_epoch
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


def _epoch(t: Training, run: tracking.TrackedRun, epoch: int) -> tuple[dict, tuple]:
    """Train, evaluate and record one epoch -> its metrics and the test (predictions, labels)."""
    t0 = time.perf_counter()
    lr = t.optimizer.param_groups[0]["lr"]
    train_metrics = train_one_epoch(t, epoch, run.run_id)
    if t.loss_name is not losses.LossName.SPREAD:
        del train_metrics["margin"]  # only the spread loss has a margin
    eval_metrics, test_preds, test_labels = evaluate_epoch(t)
    metrics = {**train_metrics, **eval_metrics, "lr": lr}
    metrics["epoch_seconds"] = time.perf_counter() - t0
    t.train_seconds += metrics["epoch_seconds"]
    t.history.append({"epoch": epoch, **metrics})
    record.record_epoch(run, t, epoch, metrics)
    print(epoch_line(run.run_id, epoch, t.cfg.train.epochs, metrics), flush=True)
    return metrics, (test_preds, test_labels)


def _finish(t: Training, run: tracking.TrackedRun, pruned: bool, last_test: tuple | None) -> FitResult:
    """End-of-run metrics and artifacts (final model, viewpoint tables, confusion matrix)."""
    last = t.history[-1] if t.history else {}
    result = FitResult(
        run_id=run.run_id,
        history=t.history,
        best_epoch=t.best["epoch"],
        best_val_error=t.best["val_error"] if t.best["epoch"] else math.nan,
        final_test_error=last.get("test_error", math.nan),
        pruned=pruned,
        train_seconds=t.train_seconds,
    )
    final = {
        "best_epoch": result.best_epoch,
        "best_val_error": result.best_val_error,
        "final_test_error": result.final_test_error,
        "train_seconds": t.train_seconds,
    }
    step = last.get("epoch", 0)
    if pruned or not t.history:
        run.log_metrics(final, step=step)
        return result
    run.save_torch(checkpoint.model_record(t.model, step), tracking.checkpoint_file("final"))
    if last_test is None:  # resumed after the last epoch: evaluate the final model again
        logits, labels = t.predict(t.ds.test)
        last_test = (logits.argmax(1), labels)
    record.record_test_tables(run, t, step, *last_test)
    if t.cfg.train.multicrop:
        mc_logits, mc_labels = t.predict(t.ds.test, multicrop=True)
        result.multicrop_test_error = evaluate.error_rate(mc_logits.argmax(1), mc_labels)
        final["multicrop_test_error"] = result.multicrop_test_error
    run.log_metrics(final, step=step)
    msg = f"[{run.run_id}] done: best epoch {result.best_epoch} (val {result.best_val_error:.4f}), "
    print(msg + f"final test error {result.final_test_error:.4f}", flush=True)
    return result
