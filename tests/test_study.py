"""Studies: study-file validation, Optuna orchestration (workers, kill + resume), the demo end to end.

Orchestration tests use a fake ``fit`` (written to tmp_path, importable by spawned workers) that logs real
nested MLflow runs but trains nothing; the end-to-end test runs the real demo, shrunken by --set.
Every test points MLFLOW_TRACKING_URI and CAPSBENCH_DATA at tmp_path.
"""

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from harness import schedule, tracking
from harness.config import ConfigError
from harness.study import StudyError, main, open_study, run_study, status_text
from harness.study.config import list_studies, load_study, run_config
from harness.study.trials import params_to_keys, suggest, trial_run_config
from harness.train import check_config

optuna.logging.set_verbosity(optuna.logging.WARNING)

FAKE_FIT = '''
"""A stand-in for harness.train.fit: nested MLflow runs and a val error that depends on the params."""
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from harness import tracking


@dataclass
class Result:
    run_id: str
    history: list = field(default_factory=list)
    pruned: bool = False
    status: str = "FINISHED"


def fit(cfg, *, parent_run_id=None, tags=None, epoch_callback=None, resume_run_id=None):
    if resume_run_id:
        run = tracking.resume_run(resume_run_id, system_metrics=False)
    else:
        run = tracking.start_run(cfg.experiment, cfg.run_name, tags=tags, parent_run_id=parent_run_id,
                                 system_metrics=False)
    lam = cfg.model.args.get("final_lambda", 0.01)
    base = abs(math.log10(cfg.optim.lr or 3e-3) + 2.5) / 4 + abs(math.log10(lam) + 2) / 4 + 0.05
    history, status = [], "FAILED"
    try:
        for epoch in range(1, cfg.train.epochs + 1):
            time.sleep(float(os.environ.get("FAKE_FIT_SLEEP", "0")))
            m = {"val_error": base + 0.3 / epoch, "test_familiar_error": base + 0.3 / epoch,
                 "test_novel_error": 2 * base + 0.3 / epoch}
            history.append({"epoch": epoch, **m})
            run.log_metrics(m, step=epoch)
            if epoch_callback is not None and epoch_callback(epoch, dict(m)):
                status = "KILLED"
                return Result(run.run_id, history, pruned=True, status=status)
        status = "FINISHED"
        return Result(run.run_id, history)
    finally:
        run.end(status)


def run_in_child(path, overrides, root):
    from harness.study import run_study
    from harness.study.config import load_study

    run_study(load_study(path, overrides), root=Path(root), fit_target="fake_fit:fit")
'''

TINY = """
models = ["em_capsnet_small", "cnn_small"]
stages = ["tune", "train"]
[run.data]
name = "synthnorb"
view = "azimuth"
[run.train]
epochs = 2
[tune]
n_trials = 4
epochs = 3
n_startup_trials = 2
n_warmup_epochs = 1
"""


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CAPSBENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("CAPSBENCH_REPORTS", str(tmp_path / "reports"))
    monkeypatch.setenv("FAKE_FIT_SLEEP", "0")
    (tmp_path / "fake_fit.py").write_text(FAKE_FIT)
    monkeypatch.syspath_prepend(str(tmp_path))
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(TINY)
    return tmp_path, study_file


def trials(root: Path, study: str, model: str) -> list:
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(root / study / "optuna.journal")))
    return optuna.load_study(study_name=f"{study}.{model}", storage=storage).get_trials(deepcopy=False)


def study_runs(study: str) -> list:
    c = tracking.client()
    exp = c.get_experiment_by_name(study)
    return c.search_runs([exp.experiment_id], f"tags.`capsbench.study` = '{study}'", max_results=1000)


def in_first_epoch(optuna_study: str, number: int) -> bool:
    """The trial's MLflow run exists and has logged no epoch yet (so it runs for >= 2 more sleeps)."""
    exp = tracking.client().get_experiment_by_name("tiny")
    if exp is None:
        return False
    query = f"tags.`optuna.study` = '{optuna_study}' and tags.`optuna.trial` = '{number}'"
    runs = tracking.client().search_runs([exp.experiment_id], query)
    return len(runs) == 1 and "val_error" not in runs[0].data.metrics


def counted(ts: list) -> list:
    return [t for t in ts if t.state.name in ("COMPLETE", "PRUNED")]


# ---------------------------------------------------------------------------------------------
# study files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_studies())
def test_every_study_file_is_valid(name):
    cfg = load_study(name)
    assert cfg.name == name and cfg.experiment == name and len(cfg.models) >= 1
    for model in cfg.models:
        assert run_config(cfg, model).model.name == model


def test_required_study_files_exist():
    need = {
        "smallnorb_azimuth",
        "smallnorb_elevation",
        "smallnorb_standard",
        "synthnorb_azimuth",
        "synthnorb_elevation",
        "fashion_mnist_fgsm",
        "demo",
    }
    assert need <= set(list_studies())


def test_per_model_settings_and_overrides_apply():
    cfg = load_study(
        "demo",
        ["tune.n_trials=5", "run.train.epochs=7", "per_model.em_capsnet_small.model.args.routing_iters=2",
         "per_model.cnn_small.optim.lr=0.002"],
    )  # fmt: skip
    assert cfg.tune.n_trials == 5 and cfg.run.train.epochs == 7
    assert run_config(cfg, "cnn_small").optim.lr == 0.002
    assert run_config(cfg, "em_capsnet_small").optim.lr == cfg.run.optim.lr == 0  # the model's default_lr
    assert run_config(cfg, "em_capsnet_small").model.args == {"routing_iters": 2}
    assert "routing_iters" not in run_config(cfg, "cnn_small").model.args
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        load_study("demo", ["tune.bogus=1"])
    # RunConfig sections may drop the "run." prefix, in overrides and in files
    short = load_study("demo", ["train.epochs=9", "data.limit_test=11"])
    assert (
        short.run.train.epochs == 9 and short.run.data.limit_test == 11 and short.run.data.view == "azimuth"
    )
    with pytest.raises(ConfigError, match="unknown key 'epoch'"):
        load_study("demo", ["train.epoch=9"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("[tune]\nn_trails = 3\n", "unknown key 'n_trails' in \\[tune\\]"),
        ("[tune]\nn_trials = 'many'\n", "tune.n_trials: expected an integer"),
        ("models = ['em_capsnet_smal']\n", "unknown model 'em_capsnet_smal': did you mean em_capsnet_small"),
        ("[run.data]\nname = 'norb'\n", "unknown dataset 'norb'"),
        ("[run.data]\nview = 'sideways'\n", "run.data.view: expected one of"),
        ("[tune.cnn]\nlr = [0.1, 0.01]\n", "tune.cnn.lr: expected \\[low, high\\]"),
        ("[tune.capsule]\nloss = ['hinge']\n", "tune.capsule.loss: choose from cross_entropy, spread"),
        ("stages = ['tune', 'plot']\n", "unknown stage 'plot'"),
        ("[per_model.cnn_baseline.optim]\nlr = 0.1\n", "names a model that is not in models"),
        ("[per_model.cnn_small.model.args]\nroutings = 3\n", "model 'cnn_small' rejects its args"),
        ("models = [\n", "is not valid TOML"),
    ],
)
def test_bad_study_file_fails_before_any_work(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_study(path)
    assert main([str(path), "--root", str(tmp_path / "studies")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not (tmp_path / "studies").exists() and not (tmp_path / "mlflow.db").exists()  # no work done


def test_capsule_trials_sample_a_margin_only_for_the_spread_loss():
    cfg = load_study("demo")
    assert cfg.tune.capsule.loss == ["spread"]  # the default: the paper's loss and its margin schedule
    cfg.tune.capsule.loss = ["cross_entropy", "spread"]
    common = dict(lambda_schedule="official", final_lambda=0.01, lr=3e-3)
    margins = dict(margin_start=0.2, margin_end=0.9, margin_ramp_epochs=5.0)
    ce = suggest(optuna.trial.FixedTrial(dict(common, loss="cross_entropy")), "capsule", cfg)
    assert ce["loss.name"] == "cross_entropy" and not any(k.startswith("loss.margin") for k in ce)
    assert "model.args.class_lambda_scale" not in ce  # the recipe's own class λ
    params = dict(common, loss="spread", **margins)
    spread = suggest(optuna.trial.FixedTrial(params), "capsule", cfg)
    assert spread["loss.name"] == "spread" and spread["loss.margin_end"] == 0.9
    assert spread["loss.margin_ramp_epochs"] == 5.0 and spread["model.args.final_lambda"] == 0.01
    # the spread loss runs at the paper's class λ, in the trial and in the final run from its best params
    assert spread["model.args.class_lambda_scale"] == 1.0
    assert params_to_keys("capsule", params) == spread


def test_a_trial_trains_the_first_epochs_of_its_final_runs_schedule():
    cfg = load_study("demo", ["tune.epochs=2", "run.train.epochs=6", "run.optim.schedule=cosine"])
    trial = trial_run_config(SimpleNamespace(cfg=cfg, workers=1), "cnn_small", {"optim.lr": 0.002})
    final = run_config(cfg, "cnn_small", {"optim.lr": 0.002})
    assert trial.train.epochs == 2 and trial.optim.schedule_epochs == 6 and final.optim.schedule_epochs == 0
    check_config(trial)
    for progress in (0.0, 0.5, 1.0, 1.99):  # the trial's rates are the final run's over its first 2 epochs
        assert schedule.lr_factor(trial, progress) == schedule.lr_factor(final, progress)
    longer = load_study("demo", ["tune.epochs=3", "run.train.epochs=1"])  # trials longer than the final run
    trial = trial_run_config(SimpleNamespace(cfg=longer, workers=1), "cnn_small", {})
    assert trial.train.epochs == 3 and trial.optim.schedule_epochs == 0
    check_config(trial)


def test_unknown_study_name_lists_the_known_ones(capsys):
    assert main(["no_such_study"]) == 2
    assert "known studies: " in capsys.readouterr().err


def test_a_rerun_may_not_change_what_finished_work_used(env):
    tmp, study_file = env
    open_study(load_study(study_file), tmp / "studies", storage=None, workers=1, fresh=False)
    changed = load_study(study_file, ["tune.epochs=5"])
    with pytest.raises(StudyError, match="tune.epochs=3, now 5.*--fresh"):
        open_study(changed, tmp / "studies", storage=None, workers=1, fresh=False)
    # attack settings may change: they affect only stages that have not run
    open_study(
        load_study(study_file, ["attack.n_examples=7"]), tmp / "studies", storage=None, workers=1, fresh=False
    )
    open_study(changed, tmp / "studies", storage=None, workers=1, fresh=True)  # --fresh starts over


# ---------------------------------------------------------------------------------------------
# Optuna orchestration (fake fit)
# ---------------------------------------------------------------------------------------------


def test_two_workers_lose_no_trial_and_mlflow_nests_every_trial(env):
    tmp, study_file = env
    cfg = load_study(study_file)
    study = run_study(cfg, root=tmp / "studies", workers=2, fit_target="fake_fit:fit")
    runs = study_runs("tiny")
    parent = [r for r in runs if r.data.tags.get("capsbench.kind") == "study"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    pid = parent[0].info.run_id
    assert parent[0].data.tags["capsbench.stage.tune"] == "done"
    for model in cfg.models:
        ts = trials(tmp / "studies", "tiny", model)
        done = counted(ts)
        assert len(done) == 4, [(t.number, t.state.name) for t in ts]
        assert all(t.user_attrs.get("surplus") for t in ts if t not in done)  # only surplus asks left over
        trial_runs = [r for r in runs if r.data.tags.get("optuna.study") == f"tiny.{model}"]
        assert all(r.data.tags["mlflow.parentRunId"] == pid for r in trial_runs)
        assert all(
            r.data.tags["capsbench.kind"] == "trial" and r.data.tags["capsbench.role"] == "tune"
            for r in trial_runs
        )
        by_number = {int(r.data.tags["optuna.trial"]): r for r in trial_runs}
        assert len(by_number) == len(trial_runs) == 4  # one MLflow run per trial, none duplicated
        for t in done:
            status = by_number[t.number].info.status
            assert status == ("FINISHED" if t.state.name == "COMPLETE" else "KILLED")
            assert t.user_attrs["mlflow_run_id"] == by_number[t.number].info.run_id
        assert "final_lambda" in done[0].params if model.startswith("em_") else "dropout" in done[0].params
        assert (
            parent[0].data.metrics[f"tune/{model}/n_complete"]
            + parent[0].data.metrics[f"tune/{model}/n_pruned"]
            == 4
        )
    finals = [r for r in runs if r.data.tags.get("capsbench.role") == "final"]
    assert sorted(r.data.tags["capsbench.model"] for r in finals) == sorted(cfg.models)
    state = json.loads((study.folder / "state.json").read_text())
    assert state["final_runs"] == {m: parent[0].data.tags[f"capsbench.final.{m}"] for m in cfg.models}
    best = state["best_params"]["cnn_small"]
    assert set(best) == {"optim.lr", "model.args.dropout", "optim.weight_decay"}
    text = status_text(cfg, tmp / "studies")
    assert "tune       done" in text and "of 4" in text


def test_rdb_storage_url_holds_the_trials(env):
    tmp, study_file = env
    url = f"sqlite:///{tmp / 'optuna.db'}"
    cfg = load_study(study_file, ["tune.n_trials=2", "stages=tune"])
    run_study(cfg, root=tmp / "studies", storage=url, fit_target="fake_fit:fit")
    for model in cfg.models:
        assert len(counted(optuna.load_study(study_name=f"tiny.{model}", storage=url).trials)) == 2
    assert not (tmp / "studies" / "tiny" / "optuna.journal").exists()


def test_killed_study_resumes_without_losing_or_duplicating_anything(env, monkeypatch):
    tmp, study_file = env
    root = tmp / "studies"
    monkeypatch.setenv("FAKE_FIT_SLEEP", "1.0")
    ctx = multiprocessing.get_context("spawn")
    import fake_fit

    child = ctx.Process(target=fake_fit.run_in_child, args=(str(study_file), [], str(root)))
    child.start()
    model = "em_capsnet_small"
    deadline = time.time() + 120
    killed_trial = None
    while time.time() < deadline and killed_trial is None:
        time.sleep(0.3)
        try:
            ts = trials(root, "tiny", model)
        except (KeyError, FileNotFoundError, OSError):
            continue
        running = [t for t in ts if t.state.name == "RUNNING" and "worker" in t.user_attrs]
        if counted(ts) and running and in_first_epoch(f"tiny.{model}", running[0].number):
            os.kill(child.pid, signal.SIGKILL)  # mid-trial: its MLflow run exists and is RUNNING
            killed_trial = running[0]
    child.join()
    assert killed_trial is not None, "the child study never reached a running second trial"
    before = len(counted(trials(root, "tiny", model)))
    status = status_text(load_study(study_file), root)  # also marks the runs the kill left RUNNING
    assert "tune       interrupted (rerun to resume)" in status and "now marked KILLED" in status

    monkeypatch.setenv("FAKE_FIT_SLEEP", "0")
    cfg = load_study(study_file)
    study = run_study(cfg, root=root, fit_target="fake_fit:fit")
    ts = trials(root, "tiny", model)
    assert len(counted(ts)) == 4 and before < 4
    dead = ts[killed_trial.number]
    assert dead.state.name == "FAIL"
    retry = [t for t in ts if t.user_attrs.get("retry_of") == killed_trial.number]
    assert len(retry) == 1 and retry[0].params == dead.params and retry[0].state.name != "FAIL"
    runs = study_runs("tiny")
    dead_runs = [
        r
        for r in runs
        if r.data.tags.get("optuna.study") == f"tiny.{model}"
        and r.data.tags.get("optuna.trial") == str(killed_trial.number)
    ]
    assert [(r.info.status, tracking.OWNER_GONE in r.data.tags) for r in dead_runs] == [("KILLED", True)]
    parents = [r for r in runs if r.data.tags.get("capsbench.kind") == "study"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same parent run, reopened

    # a third run does nothing new
    n_runs = len(runs)
    state = json.loads((study.folder / "state.json").read_text())
    run_study(cfg, root=root, fit_target="fake_fit:fit")
    assert len(study_runs("tiny")) == n_runs
    assert json.loads((study.folder / "state.json").read_text())["stages"] == state["stages"]
    assert "to do: none" in (study.folder / "study.log").read_text().splitlines()[-1]
    assert len(counted(trials(root, "tiny", "cnn_small"))) == 4


# ---------------------------------------------------------------------------------------------
# the demo, end to end (real runner, models, attacks, report)
# ---------------------------------------------------------------------------------------------

SHRINK = [
    "synthnorb.instances=1",
    "synthnorb.elevations=1",
    "tune.n_trials=1",
    "tune.epochs=1",
    "run.train.epochs=2",
    "run.data.limit_test=30",
    "attack.attacks=fgsm",
    "attack.eps=[0.1]",
    "attack.n_examples=10",
    "attack.checks=false",
    # a thinner capsule net: the machinery is under test here, not the model
    "per_model.em_capsnet_small.model.args.routing_iters=1",
    "per_model.em_capsnet_small.model.args.A=16",
    "per_model.em_capsnet_small.model.args.C=8",
    "per_model.em_capsnet_small.model.args.D=8",
]


def check_demo(tmp: Path, n_trials: int) -> None:
    runs = study_runs("demo")
    kinds = [r.data.tags.get("capsbench.kind") for r in runs]
    assert kinds.count("study") == 1 and kinds.count("trial") == 2 * n_trials
    parent = next(r for r in runs if r.data.tags["capsbench.kind"] == "study")
    assert parent.info.status == "FINISHED"
    for stage in ("data", "tune", "train", "viewpoint", "attack", "report"):
        assert parent.data.tags[f"capsbench.stage.{stage}"] == "done"
    finals = [r for r in runs if r.data.tags.get("capsbench.role") == "final"]
    assert {r.data.tags["capsbench.family"] for r in finals} == {"capsule", "cnn"}
    assert all(r.info.status == "FINISHED" for r in finals)
    assert all(any(k.startswith("attack/fgsm/") for k in r.data.metrics) for r in finals)
    for model in ("em_capsnet_small", "cnn_small"):
        assert len(counted(trials(tmp / "studies", "demo", model))) == n_trials
        assert f"viewpoint/{model}/matched_novel_error" in parent.data.metrics
    matched = json.loads(tracking.download_artifact(parent.info.run_id, "viewpoint/matched.json").read_text())
    assert set(matched["models"]) == {"em_capsnet_small", "cnn_small"}
    cells = (tmp / "studies" / "demo" / "viewpoint" / "cells.csv").read_text().splitlines()
    assert cells[0] == "model,family,epoch,elevation,azimuth,n,errors,error" and len(cells) > 18
    assert (tmp / "reports" / "demo" / "report.html").is_file()


def test_demo_end_to_end_shrunken(env, capsys):
    tmp, _ = env
    args = ["demo", "--root", str(tmp / "studies")] + [a for s in SHRINK for a in ("--set", s)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "matched novel-viewpoint protocol (azimuth)" in out and "| em_capsnet_small | capsule |" in out
    check_demo(tmp, n_trials=1)


@pytest.mark.slow
def test_demo_full(env):
    tmp, _ = env
    assert main(["demo", "--root", str(tmp / "studies")]) == 0
    check_demo(tmp, n_trials=load_study("demo").tune.n_trials)


def test_help_runs():
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
