"""harness.tracking on a temporary sqlite store: URIs, runs, atomic artifacts, load_model, the ui command."""

import os

import mlflow
import pytest
import torch

from harness import checkpoint, tracking
from harness.config import RunConfig, apply_overrides
from harness.paths import PROJECT_ROOT
from harness.tracking.ui import main as tracking_cli
from models import create_model


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One temporary store per module (a new MLflow database costs seconds); one experiment per test."""
    path = tmp_path_factory.mktemp("mlflow")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{path / 'mlflow.db'}")
        yield path


def test_uri_and_artifact_root(store, monkeypatch):
    assert tracking.tracking_uri() == f"sqlite:///{store / 'mlflow.db'}"
    assert tracking.artifact_root() == store / "mlartifacts"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri() == f"sqlite:///{PROJECT_ROOT / 'mlflow.db'}"
    assert tracking.artifact_root() == PROJECT_ROOT / "mlartifacts"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_run_logs_tags_params_metrics_artifacts_and_status(store):
    run = tracking.start_run("exp one", "r1", tags={"capsbench.kind": "train"}, system_metrics=False)
    run.log_params({"optim.lr": 0.003, "model.args.widths": [16, 32]})
    run.log_metrics({"val_error": 0.5}, step=1)
    run.log_metrics({"val_error": 0.25}, step=2)
    run.log_json({"a": 1}, "viewpoint/errors.json")
    run.save_torch({"x": torch.arange(3)}, "checkpoints/resume.pt")
    run.end("KILLED")

    exp = mlflow.get_experiment_by_name("exp one")
    assert exp.artifact_location.startswith((store / "mlartifacts").as_uri())
    df = mlflow.search_runs([exp.experiment_id])
    row = df.iloc[0]
    assert row["status"] == "KILLED" and row["tags.capsbench.kind"] == "train"
    assert row["tags.mlflow.runName"] == "r1"
    assert row["params.optim.lr"] == "0.003" and row["params.model.args.widths"] == "[16, 32]"
    hist = mlflow.MlflowClient().get_metric_history(run.run_id, "val_error")
    assert [(m.step, m.value) for m in hist] == [(1, 0.5), (2, 0.25)]
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run.run_id, "checkpoints")}
    assert files == {"checkpoints/resume.pt"}  # no temporary file left behind
    assert torch.load(tracking.download_artifact(run.run_id, tracking.RESUME_FILE))["x"].tolist() == [0, 1, 2]
    with pytest.raises(tracking.TrackingError, match="no artifact"):
        tracking.download_artifact(run.run_id, "checkpoints/model_final.pt")


def test_nested_run_and_resume(store):
    parent = tracking.start_run("study", "parent", system_metrics=False)
    child = tracking.start_run("ignored", "trial-0", parent_run_id=parent.run_id, system_metrics=False)
    child.end("FAILED")
    info = mlflow.get_run(child.run_id)
    assert info.data.tags["mlflow.parentRunId"] == parent.run_id
    assert info.info.experiment_id == parent.experiment_id  # trials live in the study's experiment
    again = tracking.resume_run(child.run_id, system_metrics=False)
    assert tracking.run_status(child.run_id) == "RUNNING"
    again.end("FINISHED")
    parent.end()
    assert tracking.run_status(child.run_id) == "FINISHED"
    with pytest.raises(tracking.TrackingError, match="not found"):
        tracking.resume_run("0" * 32, system_metrics=False)
    with pytest.raises(tracking.TrackingError, match="parent run"):
        tracking.start_run("x", "y", parent_run_id="f" * 32, system_metrics=False)


def test_load_model_rebuilds_from_the_run_alone(store):
    cfg = apply_overrides(RunConfig(), ["model.name=cnn_small", "data.name=fashion_mnist"])
    model = create_model("cnn_small", in_channels=1, num_classes=10, input_size=28).eval()
    run = tracking.start_run("load", "r", system_metrics=False)
    run.log_config(cfg)
    for which in ("final", "best", 3):
        run.save_torch(checkpoint.model_record(model, 3), tracking.checkpoint_file(which))
    run.end()
    x = torch.rand(2, 1, 28, 28)
    for which in ("final", "best", 3):
        loaded, loaded_cfg = tracking.load_model(run.run_id, which)
        assert not loaded.training and loaded_cfg == cfg
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(tracking.TrackingError, match="which="):
        tracking.checkpoint_file("last")


def test_system_metrics_are_sampled(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    run = tracking.start_run("sys", "r", system_metrics=True)
    import time

    time.sleep(1.0)
    run.end()
    keys = mlflow.get_run(run.run_id).data.metrics
    assert any(k.startswith("system/cpu_utilization") for k in keys), sorted(keys)


def test_atomic_save_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.atomic_save({"v": 1}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        checkpoint.atomic_save({"v": Boom()}, path)
    assert torch.load(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]


def test_cli_uri_and_ui_command(store, monkeypatch, capsys):
    assert tracking_cli(["uri"]) == 0
    assert str(store / "mlflow.db") in capsys.readouterr().out
    seen = {}
    monkeypatch.setattr(os, "execv", lambda exe, argv: seen.update(argv=argv))
    tracking_cli(["ui", "--port", "5123"])
    argv = seen["argv"]
    assert argv[1:4] == ["-m", "mlflow", "ui"]
    assert argv[argv.index("--backend-store-uri") + 1] == tracking.tracking_uri()
    assert argv[argv.index("--default-artifact-root") + 1] == (store / "mlartifacts").as_uri()
    assert argv[argv.index("--port") + 1] == "5123"
