"""Many machines, without servers: driver and URL errors, heartbeat settings, and a worker that shares an
Optuna RDB (sqlite here) with a live or a dead worker of "another machine" (a trial made by the test).

The same paths against real PostgreSQL and MLflow servers, with two study processes: test_scale_postgres.py.
"""

import sys
import threading
import time
import warnings

import optuna
import pytest

from harness import tracking
from harness.config import ConfigError
from harness.study import main, open_study, run_study, status_text
from harness.study.config import fingerprint, load_study
from harness.study.trials import suggest
from harness.study.tune import load_optuna

optuna.logging.set_verbosity(optuna.logging.WARNING)

FAKE_FIT = '''
"""A stand-in for harness.train.fit: a nested MLflow run, 2 epochs, a val error from the learning rate."""
import math
from dataclasses import dataclass, field

from harness import tracking


@dataclass
class Result:
    run_id: str
    history: list = field(default_factory=list)
    pruned: bool = False


def fit(cfg, *, parent_run_id=None, tags=None, epoch_callback=None, resume_run_id=None):
    run = tracking.start_run(cfg.experiment, cfg.run_name, tags=tags, parent_run_id=parent_run_id,
                             system_metrics=False)
    history = []
    for epoch in (1, 2):
        m = {"val_error": abs(math.log10(cfg.optim.lr) + 2.5) / 4 + 0.3 / epoch}
        history.append({"epoch": epoch, **m})
        run.log_metrics(m, step=epoch)
        if epoch_callback is not None and epoch_callback(epoch, dict(m)):
            run.end("KILLED")
            return Result(run.run_id, history, pruned=True)
    run.end("FINISHED")
    return Result(run.run_id, history)
'''

STUDY = """
models = ["cnn_small"]
stages = ["tune"]
[run.data]
name = "synthnorb"
[tune]
n_trials = 3
n_startup_trials = 3
heartbeat_interval = 1
grace_period = 2
"""
OTHER = "other-machine:4242"  # the worker id of a trial "another machine" holds


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CAPSBENCH_DATA", str(tmp_path / "data"))
    (tmp_path / "scale_fake_fit.py").write_text(FAKE_FIT)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "shared.toml"
    path.write_text(STUDY)
    return tmp_path, path, f"sqlite:///{tmp_path / 'optuna.db'}"


def foreign_trial(tmp_path, cfg, url: str, *, parent_tags: dict | None = None) -> optuna.trial.Trial:
    """A RUNNING trial of "another machine" with one heartbeat, and (optionally) its MLflow runs."""
    study = open_study(cfg, tmp_path / "elsewhere", storage=url, workers=1, fresh=False)
    study.update_state()  # a study folder for --status
    ostudy = load_optuna(study, "cnn_small")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "heartbeat ... used with Study.optimize": a test's ask
        trial = ostudy.ask()
    suggest(trial, "cnn", cfg)
    trial.set_user_attr("worker", OTHER)
    ostudy._storage.record_heartbeat(trial._trial_id)
    if parent_tags is not None:
        parent = tracking.start_run(cfg.experiment, cfg.name, tags=parent_tags, system_metrics=False)
        tags = {"capsbench.kind": "trial", "capsbench.study": cfg.name, "optuna.study": ostudy.study_name}
        tracking.start_run(
            cfg.experiment,
            "cnn_small-trial",
            tags={**tags, "optuna.trial": "0"},
            parent_run_id=parent.run_id,
            system_metrics=False,
        )
        trial.set_user_attr("test_parent_run_id", parent.run_id)
    return trial


def runs_by_kind(cfg) -> dict[str, list]:
    out: dict[str, list] = {}
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.experiment)
    for r in c.search_runs([exp.experiment_id], f"tags.`capsbench.study` = '{cfg.name}'", max_results=1000):
        out.setdefault(r.data.tags.get("capsbench.kind", "other"), []).append(r)
    return out


# ---------------------------------------------------------------------------------------------
# drivers, URLs, settings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, url",
    [
        ("--storage", "postgresql+psycopg://user:secret@127.0.0.1:5432/optuna"),
        ("--storage", "postgresql://user:secret@127.0.0.1:5432/optuna"),  # psycopg 3 on SQLAlchemy >= 2.1
        ("MLFLOW_TRACKING_URI", "postgresql+psycopg://user:secret@127.0.0.1:5432/mlflow"),
    ],
)
def test_a_missing_driver_is_one_line_naming_the_extra_before_any_work(env, monkeypatch, capsys, where, url):
    tmp, path, _ = env
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    args = [str(path), "--root", str(tmp / "studies")]
    if where == "--storage":
        args += ["--storage", url]
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {where} ") and "\n" not in err, err
    assert "psycopg" in err and "pip install -e '.[scale]'" in err and "secret" not in err
    assert not (tmp / "studies" / "shared").exists() and not (tmp / "mlflow.db").exists()  # nothing created


def test_an_unreachable_database_is_one_line_before_any_work(env, capsys):
    tmp, path, _ = env
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://user:secret@127.0.0.1:{port}/optuna"
    assert main([str(path), "--root", str(tmp / "studies"), "--storage", url]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot open the Optuna database") and "\n" not in err
    assert "secret" not in err
    assert not (tmp / "studies" / "shared").exists() and not (tmp / "mlflow.db").exists()
    assert main([str(path), "--storage", "not a url"]) == 1
    assert "is not a database URL" in capsys.readouterr().err


def test_heartbeat_settings_are_checked_and_may_change_between_runs(env):
    _, path, _ = env
    with pytest.raises(ConfigError, match="tune.grace_period .* larger than it"):
        load_study(path, ["tune.grace_period=1"])
    with pytest.raises(ConfigError, match="tune.heartbeat_interval .* must be >= 1"):
        load_study(path, ["tune.heartbeat_interval=0"])
    assert fingerprint(load_study(path)) == fingerprint(load_study(path, ["tune.grace_period=600"]))


# ---------------------------------------------------------------------------------------------
# a worker among the workers of other machines
# ---------------------------------------------------------------------------------------------


def test_a_worker_whose_share_is_done_waits_for_the_trial_another_machine_holds(env):
    tmp, path, url = env
    cfg = load_study(path, ["tune.grace_period=30"])  # alive: a busy test machine must not make it look dead
    trial = foreign_trial(tmp, cfg, url)
    stop = threading.Event()

    def other_machine():  # keeps its heartbeat; finishes its trial a while after this machine ran the rest
        complete, deadline = [], time.time() + 120
        while len(complete) < 2 and time.time() < deadline:
            trial.storage.record_heartbeat(trial._trial_id)
            complete = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            if stop.wait(0.5):
                return
        for _ in range(6):  # this machine now waits (and would have stopped before: "only 2 of 3 trials")
            trial.storage.record_heartbeat(trial._trial_id)
            time.sleep(0.5)
        trial.study.tell(trial, 0.5)

    helper = threading.Thread(target=other_machine)
    helper.start()
    try:
        assert "1 running, 0 failed" in status_text(cfg, tmp / "elsewhere", url)
        study = run_study(cfg, root=tmp / "studies", storage=url, fit_target="scale_fake_fit:fit")
    finally:
        stop.set()
        helper.join()
    ts = optuna.load_study(study_name="shared.cnn_small", storage=url).get_trials(deepcopy=False)
    assert [t.state.name for t in ts] == ["COMPLETE"] * 3  # the other machine's trial counted, none extra
    assert ts[0].user_attrs["worker"] == OTHER and ts[0].value == 0.5
    assert "waiting for trial(s) [0] of other workers" in (study.folder / "study.log").read_text()


def test_a_dead_machines_trial_is_failed_retried_and_its_runs_closed(env):
    tmp, path, url = env
    cfg = load_study(path)
    helper_parent = {
        "capsbench.kind": "study",
        "capsbench.study": cfg.name,
        **{tracking.OWNER_HOST: OTHER.split(":")[0], tracking.OWNER_PID: OTHER.split(":")[1]},
    }
    trial = foreign_trial(tmp, cfg, url, parent_tags=helper_parent)
    time.sleep(2.5)  # past grace_period: no heartbeat since
    status = status_text(cfg, tmp / "elsewhere", url)
    assert "0 running, 1 dead (a waiting worker or the next run fails and retries them)" in status
    assert f"dead: trial 0 of {OTHER} (process gone or no heartbeat within tune.grace_period)" in status

    study = run_study(cfg, root=tmp / "studies", storage=url, fit_target="scale_fake_fit:fit")
    ts = optuna.load_study(study_name="shared.cnn_small", storage=url).get_trials(deepcopy=False)
    assert ts[0].state.name == "FAIL"
    retries = [t for t in ts if t.user_attrs.get("retry_of") == 0]
    assert len(retries) == 1 and retries[0].params == trial.params and retries[0].state.name == "COMPLETE"
    assert sum(t.state.name == "COMPLETE" for t in ts) == 3 and len(ts) == 4
    runs = runs_by_kind(cfg)
    dead_run = [r for r in runs["trial"] if r.data.tags["optuna.trial"] == "0"]
    assert [r.info.status for r in dead_run] == ["FAILED"]
    assert {r.data.tags["optuna.trial"] for r in runs["trial"]} == {str(t.number) for t in ts}
    parents = {r.info.run_id: r for r in runs["study"]}
    helper = parents.pop(trial.user_attrs["test_parent_run_id"])  # the dead machine's parent run
    assert helper.info.status == "KILLED" and "found gone" in helper.data.tags[tracking.OWNER_GONE]
    assert [r.info.status for r in parents.values()] == ["FINISHED"]  # this machine's
    log = (study.folder / "study.log").read_text()
    assert "trial 0 of shared.cnn_small (other-machine:4242) is dead: failed, queued again" in log
    assert "0 running, 1 failed of 3" in status_text(cfg, tmp / "studies", url)
