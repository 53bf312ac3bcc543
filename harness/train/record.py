"""What a training writes to its tracking run: tags and params, each epoch's metrics and checkpoints,
and the end-of-run test tables."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from harness import checkpoint, evaluate, tracking
from harness.config import ConfigError, RunConfig, flatten, recorded_config, to_dict
from harness.device import describe
from harness.train.setup import Datasets, Training


def start_run(t: Training, *, parent_run_id: str | None, tags: dict | None) -> tracking.TrackedRun:
    """A new run with the tags, params and config of ``t``."""
    cfg = t.cfg
    run_tags = {
        "capsbench.kind": "trial" if parent_run_id else "train",
        "capsbench.model": cfg.model.name,
        "capsbench.family": getattr(t.model, "family", "unknown"),
        "capsbench.loss": str(t.loss_name),
        "device": describe(t.device),
        "data.identity": _data_identity(t.ds),
        "versions": json.dumps(tracking.versions(), sort_keys=True),
        **tracking.git_info(),
        **(tags or {}),
    }
    run = tracking.start_run(
        cfg.experiment,
        run_name(cfg),
        tags=run_tags,
        parent_run_id=parent_run_id,
        system_metrics=cfg.train.system_metrics,
    )
    try:
        run.log_params({**flatten(cfg), "n_params": n_params(t.model)})
        run.log_config(cfg)
    except BaseException:
        run.end("FAILED")
        raise
    return run


def reopen_run(t: Training, run_id: str, state: dict) -> tracking.TrackedRun:
    """The run being resumed, if its data files are the ones it was trained on; settings that differ from
    its logged params are recorded as a tag (MLflow params are immutable)."""
    cfg, identity = t.cfg, _data_identity(t.ds)
    if tracking.get_run(run_id).tags.get("data.identity", identity) != identity:
        raise ConfigError(
            f"data.root={cfg.data.root or '(default)'} holds other {cfg.data.name} files than run "
            f"{run_id[:8]} was trained on (their sha256s differ); point data.root at those files"
        )
    run = tracking.resume_run(run_id, system_metrics=cfg.train.system_metrics)
    before = flatten(recorded_config(state["config"]))
    changed = {k: v for k, v in flatten(cfg).items() if before.get(k) != v}
    run.set_tags({"capsbench.resumed_from_epoch": state["epoch"], "device": describe(t.device)})
    if changed:
        run.set_tags({"capsbench.resume_overrides": json.dumps(changed, sort_keys=True, default=str)})
    return run


def record_epoch(run: tracking.TrackedRun, t: Training, epoch: int, metrics: dict) -> None:
    """Best and periodic model checkpoints, the epoch's metrics, then the resume state."""
    cfg = t.cfg
    if metrics["val_error"] < t.best["val_error"]:
        t.best = {"epoch": epoch, "val_error": metrics["val_error"]}
        run.save_torch(checkpoint.model_record(t.model, epoch), tracking.checkpoint_file("best"))
    if cfg.train.save_every and epoch % cfg.train.save_every == 0:
        run.save_torch(checkpoint.model_record(t.model, epoch), tracking.checkpoint_file(epoch))
    run.log_metrics(metrics, step=epoch)
    resume = dict(
        epoch=epoch, config=to_dict(cfg), history=t.history, best=t.best, train_seconds=t.train_seconds
    )
    run.save_torch(
        checkpoint.resume_state(t.model, t.optimizer, t.scheduler, **resume),
        tracking.RESUME_FILE,
        previous=tracking.RESUME_PREVIOUS_FILE,
    )


def record_test_tables(
    run: tracking.TrackedRun, t: Training, epoch: int, preds: torch.Tensor, labels: torch.Tensor
) -> None:
    """The confusion matrix and, for data with viewpoints, the error tables and heatmap by viewpoint."""
    cfg, test = t.cfg, t.ds.test
    with tempfile.TemporaryDirectory() as tmp:
        cm = evaluate.confusion_matrix(preds, labels, len(test.classes))
        run.log_file(evaluate.plot_confusion(cm, list(test.classes), Path(tmp) / "confusion.png"))
        if test.meta is None:
            return
        tables = evaluate.viewpoint_errors(preds, labels, test.meta)
        report = {
            "epoch": epoch,
            "view": cfg.data.view,
            "test_error": evaluate.error_rate(preds, labels),
            **evaluate.viewpoint_tables_to_json(tables),
        }
        run.log_json(report, "viewpoint/errors.json")
        title = f"{cfg.model.name} on {cfg.data.name} test, epoch {epoch}"
        heatmap = evaluate.plot_viewpoint_heatmap(
            tables["grid"], Path(tmp) / "heatmap.png", title, view=cfg.data.view
        )
        run.log_file(heatmap, "viewpoint")


def run_name(cfg: RunConfig) -> str:
    if cfg.run_name:
        return cfg.run_name
    return "-".join([cfg.model.name, cfg.data.name] + ([cfg.data.view] if cfg.data.view != "none" else []))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _data_identity(ds: Datasets) -> str:
    """The run's ``data.identity`` tag: file name -> sha256 of the files behind each split, as JSON."""
    identity = {split: getattr(getattr(ds, split), "identity", {}) for split in ("train", "val", "test")}
    return json.dumps(identity, sort_keys=True)
