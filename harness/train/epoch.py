"""One epoch: a pass over the training data, then the validation and test errors."""

from __future__ import annotations

import math
import sys
import time

import torch
from tqdm.auto import tqdm

from harness import data, evaluate, losses, schedule
from harness.config import RunConfig
from harness.device import autocast, synchronize
from harness.train.setup import NonFiniteLossError, Training, TrainingError


def train_one_epoch(t: Training, epoch: int, run_id: str = "") -> dict:
    """One pass over the training data -> train_loss, train_error, margin, samples_per_s."""
    cfg, device, dataset, model, optimizer = t.cfg, t.device, t.ds.train, t.runner, t.optimizer
    model.train()
    n_total = len(dataset)
    steps = schedule.steps_per_epoch(n_total, cfg.data.batch_size)
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
        loss = t.loss_fn(logits, y, margin)
        if step % check_every == 0 and not math.isfinite(loss.item()):
            _non_finite(loss.item(), epoch, step, run_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t.scheduler.step()  # the schedule moves every step (harness.schedule)
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


def evaluate_epoch(t: Training) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """val_error, test_error and, with a view split, test_familiar_error / test_novel_error.

    Also returns the test predictions and labels (CPU), reused for the end-of-run tables.
    """
    val_logits, val_labels = t.predict(t.ds.val)
    test_logits, test_labels = t.predict(t.ds.test)
    test_preds = test_logits.argmax(1)
    out = {
        "val_error": evaluate.error_rate(val_logits.argmax(1), val_labels),
        "test_error": evaluate.error_rate(test_preds, test_labels),
    }
    if t.ds.familiar is not None:
        out["test_familiar_error"] = evaluate.masked_error(test_preds, test_labels, t.ds.familiar)
        out["test_novel_error"] = evaluate.masked_error(test_preds, test_labels, ~t.ds.familiar)
    return out, test_preds, test_labels


def epoch_line(run_id: str, epoch: int, epochs: int, m: dict) -> str:
    """The one line printed after each epoch."""
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
