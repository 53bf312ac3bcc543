"""The common runner end to end on tiny real data, recorded in a temporary MLflow store.

Covers: learning well below chance (CNN on a Fashion-MNIST subset and on a small synthnorb; a short
capsule run), the MLflow record (params, tags, per-epoch metric histories, artifacts), resume after an
interruption or a prune equals an uninterrupted run exactly, NaN handling, nested runs, and the CLI's
errors. The capsule run that must learn is marked slow.
"""

from pathlib import Path

import mlflow
import pytest
import torch
from trust_support import temp_store

from harness import losses, schedule, tracking, train
from harness.config import RunConfig, apply_overrides
from harness.data import synthnorb
from harness.device import DeviceError, resolve_device

FASHION = Path("/usr/share/datasets/fashion-mnist")
TIMING = ("samples_per_s", "epoch_seconds", "epoch_train_seconds")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthnorb")
    synthnorb.synthesize(root, image_size=48, lightings=1, elevations=3, progress=False)
    return root


@pytest.fixture(scope="module", autouse=True)
def store(tmp_path_factory):
    """One temporary store per module (a new MLflow database costs seconds); one experiment per test."""
    yield from temp_store(tmp_path_factory)


@pytest.fixture
def synth_cfg(synth_root, request):
    """Config of a small cnn_small run on the synthnorb fixture, in an experiment named after the test."""

    def make(*extra):
        return apply_overrides(
            RunConfig(), [f"experiment={request.node.name}", *BASE, f"data.root={synth_root}", *extra]
        )

    return make


BASE = [
    "model.name=cnn_small",
    "data.name=synthnorb",
    "data.view=azimuth",
    "train.epochs=2",
    "train.system_metrics=false",
    "data.batch_size=32",
]


def runs(experiment):
    return list(mlflow.search_runs(experiment_names=[experiment]).run_id)


def strip(history):
    return [{k: v for k, v in h.items() if k not in TIMING} for h in history]


def same_weights(run_a, run_b, which="final"):
    a, _ = tracking.load_model(run_a, which)
    b, _ = tracking.load_model(run_b, which)
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def artifacts(run_id, folder=""):
    out = []
    for f in mlflow.MlflowClient().list_artifacts(run_id, folder or None):
        out += artifacts(run_id, f.path) if f.is_dir else [f.path]
    return sorted(out)


def test_cnn_learns_on_synthnorb_and_the_run_record_is_complete(synth_cfg):
    result = train.fit(synth_cfg("train.epochs=3", "optim.lr=0.002"))
    assert result.status == "FINISHED" and not result.pruned and len(result.history) == 3
    assert result.final_test_error < 0.45  # chance is 0.8; familiar and novel views both well below
    assert result.history[-1]["test_familiar_error"] < 0.45 and result.history[-1]["test_novel_error"] < 0.6

    run = mlflow.get_run(result.run_id)
    p, t, m = run.data.params, run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED"
    assert p["model.name"] == "cnn_small" and p["optim.lr"] == "0.002" and p["data.view"] == "azimuth"
    assert int(p["n_params"]) > 100_000 and "loss.margin_schedule" in p
    assert (
        t["capsbench.kind"] == "train"
        and t["capsbench.model"] == "cnn_small"
        and t["capsbench.family"] == "cnn"
    )
    assert len(t["git.commit"]) == 40 or t["git.commit"] == "unknown"
    assert t["git.dirty"] in ("true", "false", "unknown") and t["device"].startswith("cpu")
    assert "torch" in t["versions"] and "sha256" not in t["data.identity"]
    assert any(name.endswith("training-dat.mat.gz") for name in t["data.identity"].split('"'))
    client = mlflow.MlflowClient()
    per_epoch = ["train_loss", "train_error", "val_error", "test_error", "test_familiar_error"]
    per_epoch += ["test_novel_error", "lr", "samples_per_s", "epoch_seconds", "epoch_train_seconds"]
    for key in per_epoch:
        assert [h.step for h in client.get_metric_history(result.run_id, key)] == [1, 2, 3], key
    assert "margin" not in m  # cross-entropy has no margin
    assert m["best_epoch"] == result.best_epoch and m["final_test_error"] == pytest.approx(
        result.final_test_error
    )
    assert m["best_val_error"] == pytest.approx(min(h["val_error"] for h in result.history))
    lrs = [h.value for h in client.get_metric_history(result.run_id, "lr")]
    assert lrs == pytest.approx([0.002, 0.002 * 0.8, 0.002 * 0.8**2])  # the CNNs' exponential schedule
    assert p["optim.schedule"] == "exponential"  # "auto" resolved and logged
    assert artifacts(result.run_id) == [
        "checkpoints/model_best.pt",
        "checkpoints/model_epoch_001.pt",
        "checkpoints/model_epoch_002.pt",
        "checkpoints/model_epoch_003.pt",
        "checkpoints/model_final.pt",
        "checkpoints/resume.pt",
        "checkpoints/resume_previous.pt",
        "config.toml",
        "confusion.png",
        "viewpoint/errors.json",
        "viewpoint/heatmap.png",
    ]
    model, cfg = tracking.load_model(result.run_id, "best")
    assert cfg == synth_cfg("train.epochs=3", "optim.lr=0.002", "optim.schedule=exponential")  # as resolved
    assert model.model_kwargs["in_channels"] == 1 and model.model_kwargs["num_classes"] == 5


@pytest.mark.skipif(not FASHION.is_dir(), reason="Debian package dataset-fashion-mnist is not installed")
def test_cnn_learns_fashion_mnist_subset():
    cfg = apply_overrides(
        RunConfig(),
        [
            "model.name=cnn_small",
            "data.name=fashion_mnist",
            f"data.root={FASHION}",
            "data.limit_train=2000",
            "data.limit_test=1000",
            "train.epochs=2",
            "train.system_metrics=false",
        ],  # fmt: skip
    )
    result = train.fit(cfg)
    assert result.final_test_error < 0.35  # chance is 0.9
    assert mlflow.get_run(result.run_id).data.params["optim.lr"] == "0.001"  # optim.lr=0: CNNs' default_lr
    assert result.history[0]["lr"] == 0.001
    assert "viewpoint/errors.json" not in artifacts(result.run_id)  # no viewpoint metadata in MNIST-likes


def test_capsule_run_trains_and_reloads(synth_cfg):
    cfg = synth_cfg("model.name=em_capsnet_small", "train.epochs=1", "data.limit_train=48",
                    "data.limit_test=32", "data.batch_size=16")  # fmt: skip
    result = train.fit(cfg)
    assert result.status == "FINISHED" and result.history[0]["train_loss"] > 0
    run = mlflow.get_run(result.run_id)
    tags = run.data.tags
    assert tags["capsbench.family"] == "capsule" and tags["capsbench.loss"] == "cross_entropy"  # recipe's
    assert run.data.params["optim.lr"] == "0.003" and result.history[0]["lr"] == 0.003  # capsules' default_lr
    assert run.data.params["optim.schedule"] == "cosine"  # and their default schedule
    assert "margin" not in result.history[0] and "margin" not in run.data.metrics  # the capsbench recipe's CE
    model, _ = tracking.load_model(result.run_id)
    x = torch.rand(2, 1, 32, 32)
    assert model(x).shape == (2, 5) and torch.isfinite(model(x)).all()


@pytest.mark.slow
def test_capsule_learns_on_synthnorb(synth_cfg):
    """~15 min on one CPU thread; measured: test error 0.75 after epoch 1, 0.55 after 10 (best val 0.44)."""
    cfg = synth_cfg("model.name=em_capsnet_small", "data.view=none", "train.epochs=10", "data.batch_size=16",
                    "data.limit_test=300", "loss.margin_ramp_epochs=20", "train.save_every=0")  # fmt: skip
    result = train.fit(cfg)
    assert result.best_val_error < 0.55 and result.final_test_error < 0.65  # chance 0.8
    assert result.final_test_error < result.history[0]["test_error"] - 0.1


@pytest.mark.parametrize("lr_schedule", ["exponential", "cosine"])
def test_interrupted_or_pruned_then_resumed_equals_uninterrupted(synth_cfg, lr_schedule):
    cfg = synth_cfg(
        "loss.name=spread", f"optim.schedule={lr_schedule}", "train.epochs=3", "data.limit_train=256"
    )
    full = train.fit(cfg)
    lr = [h["lr"] for h in full.history]  # each epoch's first-step rate, moved every step by the schedule
    assert lr == pytest.approx([lr[0] * schedule.lr_factor(cfg, epoch) for epoch in range(3)])

    def interrupt(epoch, metrics):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train.fit(cfg, epoch_callback=interrupt)
    (interrupted,) = [r for r in runs(cfg.experiment) if r != full.run_id]
    assert tracking.run_status(interrupted) == "KILLED"
    resumed = train.fit(cfg, resume_run_id=interrupted)
    assert resumed.run_id == interrupted and resumed.status == "FINISHED"
    assert strip(resumed.history) == strip(full.history) and same_weights(full.run_id, interrupted)

    pruned = train.fit(cfg, epoch_callback=lambda epoch, metrics: epoch == 2)
    assert pruned.pruned and pruned.status == "KILLED" and len(pruned.history) == 2
    assert tracking.run_status(pruned.run_id) == "KILLED"
    assert "checkpoints/model_final.pt" not in artifacts(pruned.run_id)
    again = train.fit(cfg, resume_run_id=pruned.run_id)
    assert strip(again.history) == strip(full.history) and same_weights(full.run_id, pruned.run_id)
    history = mlflow.MlflowClient().get_metric_history(pruned.run_id, "margin")  # the spread loss's margin
    assert [h.step for h in history] == [1, 2, 3]
    assert [h.value for h in history] == sorted(h.value for h in history) and 0.2 < history[0].value < 0.3


def test_non_finite_loss_fails_the_run_and_resumes(synth_cfg, monkeypatch):
    cfg = synth_cfg("loss.name=spread", "data.limit_train=128")
    real = losses.spread_loss
    poisoned = {}
    monkeypatch.setattr(losses, "spread_loss", lambda *a: real(*a) * (float("nan") if poisoned else 1.0))
    with pytest.raises(train.NonFiniteLossError, match="loss became nan at epoch 2.*--resume") as err:
        train.fit(cfg, epoch_callback=lambda epoch, metrics: poisoned.setdefault("on", True) and False)
    run_id = err.value.run_id
    assert tracking.run_status(run_id) == "FAILED"
    assert tracking.load_resume_state(run_id)["epoch"] == 1  # the last good checkpoint
    monkeypatch.setattr(losses, "spread_loss", real)
    result = train.fit(cfg, resume_run_id=run_id)
    assert result.status == "FINISHED" and [h["epoch"] for h in result.history] == [1, 2]
    assert tracking.run_status(run_id) == "FINISHED"


def test_device_choice():
    assert resolve_device("auto").type in ("cuda", "mps", "cpu") and resolve_device("cpu").type == "cpu"
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="CUDA is not available"):
            resolve_device("cuda")


def test_bf16_autocast_and_multicrop(synth_cfg):
    cfg = synth_cfg("train.epochs=1", "data.limit_train=64", "train.precision=bf16", "train.multicrop=true")
    result = train.fit(cfg)
    assert result.multicrop_test_error is not None and 0 <= result.multicrop_test_error <= 1
    assert mlflow.get_run(result.run_id).data.metrics["multicrop_test_error"] == result.multicrop_test_error
    assert all(v == v for v in result.history[0].values())  # no NaN


def test_nested_trial_run(synth_cfg):
    parent = tracking.start_run("study-x", "parent", system_metrics=False)
    cfg = synth_cfg("train.epochs=1", "data.limit_train=64")
    result = train.fit(
        cfg, parent_run_id=parent.run_id, tags={"capsbench.study": "x", "capsbench.role": "tune"}
    )
    parent.end()
    tags = mlflow.get_run(result.run_id).data.tags
    assert tags["mlflow.parentRunId"] == parent.run_id and tags["capsbench.kind"] == "trial"
    assert tags["capsbench.study"] == "x" and tags["capsbench.role"] == "tune"


def test_cli_trains_resumes_and_rejects_bad_input(synth_root, capsys):
    base = [
        "--experiment",
        "cli",
        "--model",
        "cnn_small",
        "--data",
        "synthnorb",
        "--set",
        f"data.root={synth_root}",
        "--epochs",
    ]
    base += ["1", "--limit-train", "64", "--limit-test", "64", "--set", "train.system_metrics=false"]
    assert train.main(base) == 0
    (run_id,) = runs("cli")
    n_runs = len(mlflow.search_runs(search_all_experiments=True))
    assert train.main(["--resume", run_id, "--set", "train.epochs=2"]) == 0
    assert [h.step for h in mlflow.MlflowClient().get_metric_history(run_id, "val_error")] == [1, 2]
    assert "train.epochs" in mlflow.get_run(run_id).data.tags["capsbench.resume_overrides"]
    capsys.readouterr()

    for argv, message in [
        (["--model", "cnn_smal"], "unknown model 'cnn_smal': did you mean cnn_small"),
        (["--model", "cnn_small", "--data", "synthnrob"], "unknown dataset 'synthnrob'"),
        (["--set", "optim.learning_rate=0.1"], "unknown key 'learning_rate'"),
        (["--set", "loss.margin_schedule=cosine"], "unknown loss.margin_schedule 'cosine'"),
        (["--model", "cnn_small", "--device", "cuda:7"], "device"),
        (["--resume", "0" * 32], "not found"),
    ]:
        assert train.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert len(mlflow.search_runs(search_all_experiments=True)) == n_runs  # bad input never opens a run
    with pytest.raises(SystemExit) as exit_:
        train.main(["--help"])
    assert exit_.value.code == 0 and "--resume" in capsys.readouterr().out
