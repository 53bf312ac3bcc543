"""The learning benchmark (`python -m harness.bench learn`): entries, tables, MLflow records, and (slow) its
small configuration staying within the numbers recorded in benchmarks/learnbench_small.json."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from harness import learnbench
from harness.config import ConfigError
from harness.data import mnist

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "learnbench_small.json"
needs_fashion = pytest.mark.skipif(
    not mnist.DEBIAN_FASHION.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (apt-get install dataset-fashion-mnist)",
)


def test_entries_parse_overrides_and_the_paper_recipe():
    e = learnbench.Entry.parse(
        "p=em_capsnet_small,recipe=paper,model.args.beta_a_init=[-1.0, 2.0],optim.lr=0.01"
    )
    assert (e.label, e.model) == ("p", "em_capsnet_small")
    assert e.overrides == ["model.args.recipe='paper'", "model.args.beta_a_init=[-1.0, 2.0]", "optim.lr=0.01"]
    for bad in ("caps", "=cnn_small", "caps="):
        with pytest.raises(ConfigError, match="LABEL=MODEL"):
            learnbench.Entry.parse(bad)


def test_a_bad_entry_is_refused_before_any_run(capsys):
    assert learnbench.main(["--entry", "caps=em_capsnet_small,optim.lrr=1", "--data", "fashion_mnist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "optim" in err and len(err.strip().splitlines()) == 1


def test_table_and_figure(tmp_path):
    rows = [
        dict(
            data=d, entry=e, family=f, epoch=k, test_error=err, train_seconds=10.0 * k, model="m", settings=""
        )
        for d in ("fashion_mnist", "synthnorb")
        for e, f, base in (("caps", "capsule", 0.3), ("cnn", "cnn", 0.2))
        for k, err in ((1, base), (2, base - 0.05))
    ]
    df = pd.DataFrame(rows)
    table = learnbench.error_table(df)
    assert list(table.columns) == ["data", "entry", "epoch 1", "epoch 2", "train_s"]
    assert table.loc[0, "epoch 2"] == 25.0 and table.loc[0, "train_s"] == 20
    learnbench.write_results(df, tmp_path, "python -m harness.bench learn")
    md = (tmp_path / "results.md").read_text()
    assert "| fashion_mnist | caps | 30.0 | 25.0 | 20 |" in md
    assert (tmp_path / "learning_curves.png").stat().st_size > 10_000


@pytest.mark.slow
@needs_fashion
def test_small_configuration_stays_within_its_record(tmp_path, monkeypatch):
    """Rerun the recorded small configuration; every test error within 4 points of the record."""
    record = json.loads(RECORD.read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("CAPSBENCH_DATA", str(tmp_path / "data"))
    argv = record["command"].split()[4:]  # after "python -m harness.bench learn"
    assert learnbench.main([*argv, "--out", str(tmp_path / "out")]) == 0
    got = pd.read_csv(tmp_path / "out" / "results.csv")
    for want in record["rows"]:
        row = got[(got.data == want["data"]) & (got.entry == want["entry"]) & (got.epoch == want["epoch"])]
        assert len(row) == 1, want
        assert abs(row.test_error.item() - want["test_error"]) <= 0.04, (want, row.test_error.item())
