"""Helpers of the tests/test_trust_*.py files: a tiny synthnorb, a temporary MLflow store, short runs."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from harness import tracking, train
from harness.config import RunConfig, apply_overrides
from harness.data import synthnorb

TINY = dict(image_size=48, lightings=1, elevations=3, instances=1)  # 270 images per split, ~4 s


def render_tiny(root: Path) -> Path:
    synthnorb.synthesize(root, progress=False, **TINY)
    return root


def temp_store(tmp_path_factory):
    """A fresh sqlite MLflow store for one test module, one torch thread (generator for a fixture)."""
    path = tmp_path_factory.mktemp("mlflow")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path / 'mlflow.db'}")
        mlflow.set_tracking_uri(tracking.tracking_uri())  # the fluent API these helpers use: this store
        yield path
    mlflow.set_tracking_uri(None)  # back to $MLFLOW_TRACKING_URI
    torch.set_num_threads(threads)


def run_config(experiment: str, data_root: Path, *overrides: str) -> RunConfig:
    """A cnn_small run of two epochs on 64 images of the tiny synthnorb (about a second an epoch)."""
    base = [
        f"experiment={experiment}",
        "model.name=cnn_small",
        "data.name=synthnorb",
        f"data.root={data_root}",
        "data.limit_train=64",
        "data.limit_test=64",
        "data.batch_size=32",
        "train.epochs=2",
        "train.system_metrics=false",
        "train.threads=1",
    ]
    return apply_overrides(RunConfig(), [*base, *overrides])


def train_run(experiment: str, data_root: Path, *overrides: str) -> str:
    return train.fit(run_config(experiment, data_root, *overrides)).run_id


def artifact(run_id: str, path: str) -> Path:
    """The local file of a run's artifact (the temporary stores keep artifacts on disk)."""
    return tracking.download_artifact(run_id, path)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def run_ids(experiment: str | None = None) -> list[str]:
    if experiment is None:
        return list(mlflow.search_runs(search_all_experiments=True).run_id)
    return list(mlflow.search_runs(experiment_names=[experiment]).run_id)


def steps(run_id: str, metric: str = "val_error") -> list[int]:
    return sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run_id, metric))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]
