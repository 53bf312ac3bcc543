"""A resumed run is exactly what it says, a dead run is seen as dead, a run id may be a unique prefix.

Issue 14 items 2, 3 and 6 (run-id prefixes). cnn_small on a tiny synthnorb in a temporary MLflow store.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import mlflow
import psutil
import pytest
import torch
from trust_support import TINY, artifact, one_line_error, render_tiny, run_config, run_ids, steps, temp_store

from harness import tracking, train
from harness.data import synthnorb


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    yield from temp_store(tmp_path_factory)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return render_tiny(tmp_path_factory.mktemp("synthnorb"))


def interrupted_run(experiment, data_root, *overrides):
    """A run stopped by Ctrl-C after its first epoch (status KILLED, resume.pt of epoch 1)."""

    def interrupt(epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.fit(run_config(experiment, data_root, *overrides), epoch_callback=interrupt)
    (run_id,) = run_ids(experiment)
    return run_id


def test_resume_applies_a_new_learning_rate_and_weight_decay(data_root, capsys):
    run_id = interrupted_run(
        "resume-lr", data_root, "optim.lr=0.01", "optim.schedule=exponential", "optim.lr_decay=0.5"
    )
    argv = ["--resume", run_id[:8], "--set", "optim.lr=0.001", "--set", "optim.weight_decay=0.05"]
    assert train.main(argv) == 0

    lr = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "lr")}
    assert lr == {1: 0.01, 2: pytest.approx(0.001 * 0.5)}  # epoch 2 ran on the new schedule
    state = torch.load(artifact(run_id, tracking.RESUME_FILE), weights_only=True)
    (group,) = state["optimizer"]["param_groups"]
    assert group["lr"] == pytest.approx(0.001 * 0.5**2) and group["weight_decay"] == 0.05
    assert state["scheduler"]["base_lrs"] == [0.001]
    tags = mlflow.get_run(run_id).data.tags
    assert '"optim.lr": 0.001' in tags["capsbench.resume_overrides"]
    assert tracking.run_status(run_id) == "FINISHED"


def test_a_run_recorded_before_the_schedule_setting_resumes_on_its_exponential_schedule(data_root):
    run_id = interrupted_run(
        "resume-older", data_root, "optim.lr=0.01", "optim.schedule=exponential", "optim.lr_decay=0.5"
    )
    # what a run recorded before optim.schedule existed holds: neither key, in the state nor in config.toml
    state_file, config_file = artifact(run_id, tracking.RESUME_FILE), artifact(run_id, tracking.CONFIG_FILE)
    state = torch.load(state_file, weights_only=True)
    del state["config"]["optim"]["schedule"], state["config"]["optim"]["schedule_epochs"]
    torch.save(state, state_file)
    lines = config_file.read_text().splitlines()
    config_file.write_text("\n".join(line for line in lines if not line.startswith("schedule")) + "\n")
    assert "\nschedule = " not in config_file.read_text()

    assert train.main(["--resume", run_id]) == 0
    lr = {m.step: m.value for m in mlflow.MlflowClient().get_metric_history(run_id, "lr")}
    assert lr == {1: 0.01, 2: pytest.approx(0.005)}  # not the cosine of today's default
    assert "capsbench.resume_overrides" not in mlflow.get_run(run_id).data.tags


@pytest.mark.parametrize(
    "setting, message",
    [
        ("data.batch_size=16", "cannot change data.batch_size (the run was trained with 32, now 16)"),
        ("model.args.dropout=0.1", "cannot change model.args.dropout (the run was trained with None"),
        ("optim.optimizer=adamw", "cannot change optim.optimizer (the run was trained with 'adam'"),
        ("optim.lr_decay=0.5", "cannot change optim.lr_decay"),
        ("loss.name=spread", "cannot change loss.name"),
    ],
)
def test_resume_refuses_what_it_cannot_change_by_name(data_root, capsys, setting, message):
    run_id = interrupted_run(f"refuse-{setting}", data_root)
    capsys.readouterr()
    assert train.main(["--resume", run_id, "--set", setting]) == 2
    line = one_line_error(capsys)
    assert f"--resume {message}" in line, line
    assert "it may change only optim.lr, optim.weight_decay, train.epochs" in line, line
    run = mlflow.get_run(run_id)
    assert run.info.status == "KILLED" and "capsbench.resume_overrides" not in run.data.tags
    assert steps(run_id) == [1]


def test_resume_may_move_data_root_only_to_the_same_files(data_root, tmp_path, capsys):
    run_id = interrupted_run("moved-data", data_root, "train.epochs=3")
    other = tmp_path / "other"
    synthnorb.synthesize(other, progress=False, seed=1, **TINY)  # same options, other objects
    capsys.readouterr()
    assert train.main(["--resume", run_id, "--set", f"data.root={other}"]) == 2
    line = one_line_error(capsys)
    assert f"data.root={other} holds other synthnorb files than run {run_id[:8]} was trained on" in line
    assert steps(run_id) == [1] and tracking.run_status(run_id) == "KILLED"

    moved = shutil.copytree(data_root, tmp_path / "moved")
    assert train.main(["--resume", run_id, "--set", f"data.root={moved}"]) == 0
    assert steps(run_id) == [1, 2, 3]


def test_each_run_records_its_owner(data_root):
    run_id = interrupted_run("owner", data_root)
    tags = mlflow.get_run(run_id).data.tags
    me = psutil.Process()
    assert tags[tracking.OWNER_HOST] == socket.gethostname() and tags[tracking.OWNER_PID] == str(os.getpid())
    assert abs(float(tags[tracking.OWNER_STARTED]) - me.create_time()) < 0.01


def test_a_live_owner_blocks_resume_and_a_dead_one_is_marked(data_root, capsys):
    run_id = interrupted_run("live-owner", data_root)
    other = subprocess.Popen(["sleep", "60"])  # stands for another process still training this run
    try:
        c = mlflow.MlflowClient()
        c.update_run(run_id, status="RUNNING")
        started = f"{psutil.Process(other.pid).create_time():.2f}"
        owner = {tracking.OWNER_PID: str(other.pid), tracking.OWNER_STARTED: started}
        for key, value in owner.items():
            c.set_tag(run_id, key, value)
        capsys.readouterr()

        assert train.main(["--resume", run_id[:8]]) == 2
        line = one_line_error(capsys)
        assert f"run {run_id[:8]} is RUNNING, owned by pid {other.pid} on {socket.gethostname()}" in line
        assert "(still alive); wait for it to end, or pass --force" in line
        assert tracking.run_status(run_id) == "RUNNING" and steps(run_id) == [1]
    finally:
        other.kill()
        other.wait()

    assert train.main(["--resume", run_id[:8]]) == 0
    err = capsys.readouterr().err
    assert f"run {run_id[:8]} was RUNNING but its process (pid {other.pid} on" in err
    assert "is gone; marked KILLED" in err
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and steps(run_id) == [1, 2]
    assert f"pid {other.pid} on {socket.gethostname()} found gone at" in run.data.tags[tracking.OWNER_GONE]
    assert run.data.tags[tracking.OWNER_PID] == str(os.getpid())  # the resuming process owns it now


def test_force_resumes_a_run_whose_owner_cannot_be_checked(data_root, capsys):
    run_id = interrupted_run("force", data_root)
    c = mlflow.MlflowClient()
    c.update_run(run_id, status="RUNNING")
    c.set_tag(run_id, tracking.OWNER_HOST, "another-machine")
    capsys.readouterr()
    assert train.main(["--resume", run_id]) == 2
    line = one_line_error(capsys)
    assert f"owned by pid {os.getpid()} on another-machine (cannot be checked from this machine)" in line
    assert train.main(["--resume", run_id, "--force"]) == 0
    assert tracking.run_status(run_id) == "FINISHED" and steps(run_id) == [1, 2]
    assert train.main(["--force", "--model", "cnn_small"]) == 2
    assert "--force applies to --resume only" in one_line_error(capsys)


def test_a_run_id_may_be_a_unique_prefix(data_root, capsys):
    ids = []
    while True:  # at most 17 runs until two share their first character
        ids.append(tracking.start_run("prefix", "r", system_metrics=False).run_id)
        first = [i[0] for i in ids]
        if len(set(first)) < len(first):
            break
    shared = next(c for c in first if first.count(c) > 1)
    for run_id in ids:
        assert tracking.resolve_run_id(run_id[:8]) == run_id and tracking.resolve_run_id(run_id) == run_id
    ambiguous = f"run id '{shared}' is ambiguous: .* give more characters"
    with pytest.raises(tracking.TrackingError, match=ambiguous):
        tracking.resolve_run_id(shared)
    capsys.readouterr()
    missing = next(p for p in ("0" * 12, "1" * 12, "2" * 12) if not any(i.startswith(p) for i in ids))
    assert train.main(["--resume", missing]) == 2
    assert f"run '{missing}' not found in" in one_line_error(capsys)
    assert train.main(["--resume", "not-an-id"]) == 2
    assert "is not a (prefix of a) 32-character hex MLflow run id" in one_line_error(capsys)

    argv = ["--experiment", "prefix", "--model", "cnn_small", "--data", "synthnorb", "--epochs", "1"]
    argv += ["--set", f"data.root={data_root}", "--limit-train", "32", "--limit-test", "32"]
    argv += ["--set", "train.system_metrics=false", "--parent-run-id", ids[0][:8]]
    assert train.main(argv) == 0
    (child,) = set(run_ids("prefix")) - set(ids)
    assert mlflow.get_run(child).data.tags["mlflow.parentRunId"] == ids[0]


def test_a_running_run_without_an_owner_needs_force(data_root, capsys):
    run_id = interrupted_run("ownerless", data_root)
    c = mlflow.MlflowClient()
    c.update_run(run_id, status="RUNNING")
    for key in (tracking.OWNER_HOST, tracking.OWNER_PID, tracking.OWNER_STARTED):
        c.delete_tag(run_id, key)  # as runs written before owners were recorded
    capsys.readouterr()
    assert train.main(["--resume", run_id]) == 2
    assert "is RUNNING, with no recorded owner (it predates owner records)" in one_line_error(capsys)
    assert train.main(["--resume", run_id, "--force"]) == 0 and tracking.run_status(run_id) == "FINISHED"


@pytest.mark.slow
def test_kill_9_leaves_a_run_that_resume_finds_dead(data_root, tmp_path, capsys):
    """The real thing: a training process killed with SIGKILL, then --resume of its 8-character id."""
    argv = [sys.executable, "-m", "harness.train", "--experiment", "kill9", "--model", "cnn_small"]
    argv += ["--data", "synthnorb", "--set", f"data.root={data_root}", "--limit-train", "64"]
    argv += ["--limit-test", "64", "--epochs", "1000", "--threads", "1"]
    argv += ["--set", "train.system_metrics=false"]
    proc = subprocess.Popen(argv, env={**os.environ}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            ids = run_ids("kill9") if mlflow.get_experiment_by_name("kill9") else []
            if ids and steps(ids[0]):
                break
            time.sleep(0.2)
        (run_id,) = ids
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert tracking.run_status(run_id) == "RUNNING"  # what kill -9 leaves behind
    done = tracking.load_resume_state(run_id)["epoch"]
    capsys.readouterr()
    assert train.main(["--resume", run_id[:8], "--set", f"train.epochs={done + 1}"]) == 0
    assert "was RUNNING but its process" in capsys.readouterr().err
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and tracking.OWNER_GONE in run.data.tags
