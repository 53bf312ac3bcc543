"""Many machines for real: two `python -m harness.study` processes on one PostgreSQL and one MLflow server.

Needs the servers that `bash .ci/with-scale-servers CMD` starts (`make test-scale`, and .ci/run): it exports
CAPSBENCH_TEST_OPTUNA_URL and CAPSBENCH_TEST_MLFLOW_URI. Without them every test here is skipped.

Each test gets a fresh Optuna database and a study name of its own; both processes train cnn_small for
real on a tiny synthnorb (64 images per trial), each in its own study folder: the "main machine" runs the
whole study, the "helper" only `--set stages=data,tune`.
"""

import collections
import functools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import optuna
import pytest

from harness import tracking
from harness.study import storage as study_storage

OPTUNA_URL = os.environ.get("CAPSBENCH_TEST_OPTUNA_URL")
MLFLOW_URI = os.environ.get("CAPSBENCH_TEST_MLFLOW_URI")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
N_TRIALS = 6

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not (OPTUNA_URL and MLFLOW_URI),
        reason="needs PostgreSQL + MLflow servers: run `make test-scale` (bash .ci/with-scale-servers ...)",
    ),
]
optuna.logging.set_verbosity(optuna.logging.WARNING)

STUDY = """
description = "scale-out test: two machines share the trials"
models = ["cnn_small"]
[run.data]
name = "synthnorb"
root = "{data}"
view = "azimuth"
limit_test = 60
batch_size = 32
[run.train]
epochs = 1
threads = 1
[tune]
n_trials = {n_trials}
epochs = {epochs}
limit_train = 64
n_startup_trials = {n_trials}  # random search, no pruning: every trial runs its epochs
heartbeat_interval = 1
grace_period = 4
[attack]
attacks = ["fgsm"]
eps = [0.1]
losses = ["ce"]
targeted = false
steps = 1
n_examples = 20
checks = false
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    from harness.data import synthnorb

    root = tmp_path_factory.mktemp("data") / "synthnorb-scale"
    synthnorb.synthesize(root, image_size=48, lightings=1, elevations=3, instances=1, progress=False)
    return root


def new_database():
    """A new, empty database on the test server (dropped at the end)."""
    import sqlalchemy

    name = f"optuna_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(OPTUNA_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    yield sqlalchemy.engine.make_url(OPTUNA_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


fresh_db = pytest.fixture(new_database)
fresh_db_2 = pytest.fixture(new_database)


@pytest.fixture
def shared(tmp_path, data_root, fresh_db, monkeypatch):
    """(study file, storage URL, tmp folder): a uniquely named tiny study against the two servers."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", MLFLOW_URI)
    name = f"scale_{uuid.uuid4().hex[:8]}"

    def write(epochs: int) -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(STUDY.format(data=data_root, n_trials=N_TRIALS, epochs=epochs))
        return path

    return write, fresh_db, tmp_path


def start(study_file: Path, url: str, folder: Path, *args: str, host: str | None = None) -> subprocess.Popen:
    """`python -m harness.study` as one machine: its own study folder, the shared database and server."""
    folder.mkdir(parents=True)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": MLFLOW_URI,
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "CAPSBENCH_REPORTS": str(folder.parent / "reports"),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    if host:
        env["CAPSBENCH_WORKER_HOST"] = host  # poses as another machine
    cmd = [sys.executable, "-m", "harness.study", str(study_file), "--root", str(folder), "--storage", url]
    out = open(folder / "output.log", "w")
    return subprocess.Popen([*cmd, *args], cwd=PROJECT_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, folder: Path, timeout: float = 150) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return (folder / "output.log").read_text()


@functools.cache
def reader(url: str) -> optuna.storages.RDBStorage:
    """One storage (one connection pool) per database for the test's reads, created under the same lock."""
    return study_storage.rdb_storage(url)


def trials(name: str, url: str) -> list:
    return optuna.load_study(study_name=f"{name}.cnn_small", storage=reader(url)).get_trials(deepcopy=False)


def study_runs(name: str) -> dict[str, list]:
    c = tracking.client()
    exp = c.get_experiment_by_name(name)
    found = c.search_runs([exp.experiment_id], f"tags.`capsbench.study` = '{name}'", max_results=1000)
    out: dict[str, list] = collections.defaultdict(list)
    for r in found:
        out[r.data.tags.get("capsbench.kind")].append(r)
    return out


def check_shared_budget(name: str, url: str) -> dict:
    """The budget is met exactly, every trial has exactly one MLflow run, nothing is left running."""
    ts = trials(name, url)
    states = collections.Counter(t.state.name for t in ts)
    assert states["COMPLETE"] + states["PRUNED"] == N_TRIALS, states
    assert not states["RUNNING"] and not states["WAITING"], states
    assert len({t.number for t in ts}) == len(ts)
    started = {t.number for t in ts if "worker" in t.user_attrs}  # surplus asks never start a run
    runs = study_runs(name)
    per_trial = collections.Counter(int(r.data.tags["optuna.trial"]) for r in runs["trial"])
    assert set(per_trial) == started and set(per_trial.values()) == {1}, per_trial
    assert all(r.info.status != "RUNNING" for kind in runs.values() for r in kind)
    for t in ts:
        if t.state.name == "COMPLETE":
            run = next(r for r in runs["trial"] if r.data.tags["optuna.trial"] == str(t.number))
            assert t.user_attrs["mlflow_run_id"] == run.info.run_id and run.info.status == "FINISHED"
    workers = {t.user_attrs["worker"] for t in ts if "worker" in t.user_attrs}
    return {"trials": dict(states), "trial_runs": len(runs["trial"]), "workers": len(workers)}


def open_at_once(make_storage, url: str, n: int = 4) -> list[str]:
    """``n`` "machines" (threads, each with its own connections) open the storage at the same moment."""
    barrier, errors = threading.Barrier(n), []

    def one() -> None:
        barrier.wait()
        try:
            make_storage(url)
        except Exception as e:
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0]}")

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def test_machines_opening_a_fresh_database_at_once_create_optunas_tables_once(fresh_db, fresh_db_2):
    # the control: Optuna alone races (IntegrityError: duplicate key ... "pg_type_typname_nsp_index")
    assert open_at_once(optuna.storages.RDBStorage, fresh_db_2), "plain RDBStorage did not race; recheck"
    errors = open_at_once(
        lambda url: study_storage.rdb_storage(url, heartbeat_interval=1, grace_period=2, on_stale=print),
        fresh_db,
    )
    assert errors == []
    optuna.create_study(study_name="check", storage=fresh_db)  # the tables are whole


def test_machines_tagging_a_new_experiment_at_once_all_succeed(monkeypatch):
    # MLflow's server races on a new experiment tag (UniqueViolation "experiment_tag_pk"); parents set two
    monkeypatch.setenv("MLFLOW_TRACKING_URI", MLFLOW_URI)
    experiment = tracking.experiment_id(f"tags_{uuid.uuid4().hex[:8]}")
    errors = open_at_once(tracking.share_runs_view, experiment)
    assert errors == []
    assert tracking.RUNS_VIEW_TAG in tracking.client().get_experiment(experiment).tags


def test_two_machines_starting_together_share_the_budget(shared, capsys):
    write, url, tmp = shared
    study_file = write(epochs=2)
    name = study_file.stem
    t0 = time.perf_counter()
    main = start(study_file, url, tmp / "main")
    helper = start(study_file, url, tmp / "helper", "--set", "stages=data,tune")
    helper_out = finish(helper, tmp / "helper")
    main_out = finish(main, tmp / "main")
    seconds = time.perf_counter() - t0
    assert helper.returncode == 0, helper_out[-3000:]
    assert main.returncode == 0, main_out[-3000:]
    assert "rerun" not in helper_out + main_out

    seen = check_shared_budget(name, url)
    assert seen["workers"] == 2  # both machines ran trials
    runs = study_runs(name)
    assert sorted(r.info.status for r in runs["study"]) == ["FINISHED", "FINISHED"]  # one parent per machine
    assert [r.info.status for r in runs["train"]] == ["FINISHED"]  # the main machine's final training
    report = (tmp / "reports" / name / "report.md").read_text()
    line = next(x for x in report.splitlines() if "Tuning `cnn_small`" in x)
    assert f"{seen['trials']['COMPLETE']} complete" in line
    with capsys.disabled():
        print(
            f"\n[two machines] {seconds:.0f}s; optuna {seen['trials']}; {seen['trial_runs']} trial runs; "
            f"report: {line}"
        )


def test_a_killed_helper_on_another_host_is_failed_and_retried_without_a_rerun(shared, capsys):
    write, url, tmp = shared
    study_file = write(epochs=4)  # trials long enough to be caught mid-way
    name = study_file.stem
    t0 = time.perf_counter()
    helper = start(study_file, url, tmp / "helper", "--set", "stages=data,tune", host="helper-host")
    main = start(study_file, url, tmp / "main")
    victim, deadline = None, time.time() + 90
    while victim is None and helper.poll() is None and time.time() < deadline:
        time.sleep(0.2)
        try:
            running = [
                t
                for t in trials(name, url)
                if t.state.name == "RUNNING" and str(t.user_attrs.get("worker")).startswith("helper-host:")
            ]
            runs = study_runs(name)["trial"] if running else []
        except (KeyError, AttributeError):  # the study or the experiment does not exist yet
            continue
        live = {r.data.tags["optuna.trial"] for r in runs if r.info.status == "RUNNING"}
        victim = next((t for t in running if str(t.number) in live), None)
    assert victim is not None, "the helper never held a running trial with an MLflow run"
    os.kill(helper.pid, signal.SIGKILL)  # mid-trial: its Optuna trial RUNNING, its MLflow run RUNNING
    helper.wait()
    main_out = finish(main, tmp / "main")
    seconds = time.perf_counter() - t0
    assert main.returncode == 0, main_out[-3000:]
    assert "rerun" not in main_out

    seen = check_shared_budget(name, url)
    ts = trials(name, url)
    assert ts[victim.number].state.name == "FAIL"
    retry = [t for t in ts if t.user_attrs.get("retry_of") == victim.number]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert retry[0].params == ts[victim.number].params  # the same parameters, as the dead trial stored them
    assert not str(retry[0].user_attrs["worker"]).startswith("helper-host:")  # the main machine ran it
    runs = study_runs(name)
    dead_run = [r for r in runs["trial"] if r.data.tags["optuna.trial"] == str(victim.number)]
    assert [r.info.status for r in dead_run] == ["FAILED"]
    by_pid = {r.data.tags[tracking.OWNER_PID]: r.info.status for r in runs["study"]}
    assert by_pid.pop(str(helper.pid)) == "KILLED"  # the dead helper's parent run
    assert list(by_pid.values()) == ["FINISHED"]
    assert f"trial {victim.number} of {name}.cnn_small (helper-host:" in main_out
    with capsys.disabled():
        print(
            f"\n[killed helper] {seconds:.0f}s; killed trial {victim.number}, retried as {retry[0].number}; "
            f"optuna {seen['trials']}; {seen['trial_runs']} trial runs"
        )
