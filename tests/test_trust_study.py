"""`harness.study --check` checks every model's run settings; `--status` sees dead trials and runs as dead.

Issue 14 items 3 (the study side) and 4. No training: the settings fail before any work, and the status
test builds the study folder, its Optuna journal and MLflow runs directly.
"""

import os
import socket
import subprocess

import mlflow
import psutil
import pytest
import torch

from harness import tracking
from harness.study import main, open_study
from harness.study.config import load_study
from harness.study.tune import load_optuna

NO_SUCH_GPU = "cuda:99" if torch.cuda.is_available() else "cuda"
CAPSULE = "run settings of em_capsnet_small:"
GPU_MESSAGE = "does not exist" if torch.cuda.is_available() else "CUDA is not available here"


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CAPSBENCH_DATA", str(tmp_path / "data"))
    return tmp_path


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            "run.optim.optimizer=sgd",
            "run settings of em_capsnet_small: optim.optimizer='sgd': use one of adam, adamw",
        ),
        (
            "run.train.precision=fp8",
            "run settings of em_capsnet_small: train.precision='fp8': use one of fp32, bf16",
        ),
        (f"run.train.device={NO_SUCH_GPU}", GPU_MESSAGE),
        ("run.data.batch_size=0", f"{CAPSULE} data.batch_size=0 must be >= 1"),
        ("run.optim.lr=-0.01", f"{CAPSULE} optim.lr=-0.01 must be > 0"),
        ("per_model.cnn_small.optim.lr=-1", "run settings of cnn_small: optim.lr=-1.0 must be > 0"),
    ],
)
def test_check_and_run_refuse_bad_run_settings_before_any_work(env, capsys, setting, message):
    assert main(["demo", "--check", "--set", setting]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1, err

    root = env / "studies"
    assert main(["demo", "--root", str(root), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (root / "demo").exists() and not (env / "mlflow.db").exists()  # no folder locked in, no run


def test_check_passes_a_good_study(env, capsys):
    assert main(["demo", "--check"]) == 0
    assert 'models = ["em_capsnet_small", "cnn_small"]' in capsys.readouterr().out


def test_status_does_not_count_dead_trials_as_running_and_marks_dead_runs(env, capsys):
    cfg = load_study("demo")
    study = open_study(cfg, env / "studies", storage=None, workers=1, fresh=False)
    study.update_state(current="tune")  # a runner was in the tune stage when it died
    gone = subprocess.Popen(["sleep", "60"])
    started = f"{psutil.Process(gone.pid).create_time():.2f}"
    gone.kill()
    gone.wait()
    host = socket.gethostname()

    ostudy = load_optuna(study, "cnn_small")
    ostudy.ask().set_user_attr("worker", f"{host}:{gone.pid}")  # its worker was killed
    ostudy.ask().set_user_attr("worker", f"{host}:{os.getpid()}")  # a live worker
    tags = {"capsbench.study": "demo", "capsbench.kind": "trial", "capsbench.model": "cnn_small"}
    dead_run = tracking.start_run("demo", "cnn_small-trial", tags=tags, system_metrics=False).run_id
    live_run = tracking.start_run("demo", "cnn_small-trial", tags=tags, system_metrics=False).run_id
    mlflow.MlflowClient().set_tag(dead_run, tracking.OWNER_PID, str(gone.pid))
    mlflow.MlflowClient().set_tag(dead_run, tracking.OWNER_STARTED, started)

    assert main(["demo", "--root", str(env / "studies"), "--status"]) == 0
    out = capsys.readouterr().out
    assert "  tune       interrupted (rerun to resume)" in out
    assert (
        "  cnn_small: tuning 0 complete, 0 pruned, 1 running, 1 dead (a waiting worker or the next run fails "
        "and retries them), "
        "0 failed of 3" in out
    ), out
    assert f"1 run(s) left RUNNING by a process that is gone, now marked KILLED: {dead_run[:8]}" in out
    dead = mlflow.get_run(dead_run)
    assert (
        dead.info.status == "KILLED"
        and f"pid {gone.pid} on {host} found gone" in dead.data.tags[tracking.OWNER_GONE]
    )
    assert mlflow.get_run(live_run).info.status == "RUNNING"  # this process: alive, left alone
