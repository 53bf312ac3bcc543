"""Tests for the comparison report (harness/report/).

Every test uses its own temporary MLflow store (MLFLOW_TRACKING_URI -> tmp_path), never the project's.

    .venv/bin/python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

import base64
import html.parser
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from harness import report, tracking
from harness.config import RunConfig, from_dict
from harness.paths import PROJECT_ROOT
from harness.report import cli, fanova, figures, tables
from harness.report.records import parse_attack_metrics

MODELS = [("em_capsnet_small", "capsule"), ("cnn_small", "cnn")]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One temporary MLflow store for the whole module (each study in it has its own name)."""
    folder = tmp_path_factory.mktemp("report_store")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder}/mlflow.db")
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    yield folder
    mp.undo()


# ---------------------------------------------------------------------------------------------
# helpers: parse the HTML back
# ---------------------------------------------------------------------------------------------


class _Page(html.parser.HTMLParser):
    """Collects <img src> values and the cells of every <table>; checks that tags nest and close."""

    VOID = {"img", "meta", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.images: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.open.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def parse_page(path) -> _Page:
    page = _Page()
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>")
    page.feed(text)
    page.close()
    assert page.open == [], f"unclosed tags: {page.open}"
    return page


def table_rows(table: list[list[str]]) -> dict[str, dict[str, str]]:
    """{model: {column: cell}} from a parsed table whose first column is the model."""
    header, *rows = table
    return {row[0]: dict(zip(header, row)) for row in rows}


def assert_embeds_every_figure(out_dir, page: _Page) -> None:
    pngs = sorted(out_dir.glob("*.png"))
    assert pngs, "the report drew no figure"
    assert len(page.images) == len(pngs)
    embedded = {src.removeprefix("data:image/png;base64,") for src in page.images}
    assert all(src.startswith("data:image/png;base64,") for src in page.images)
    for png in pngs:
        assert base64.b64encode(png.read_bytes()).decode("ascii") in embedded, png.name


# ---------------------------------------------------------------------------------------------
# a study written by hand, exactly as docs/contracts.md describes it (fast; no training)
# ---------------------------------------------------------------------------------------------


def fake_study(
    name: str, *, data: str = "synthnorb", view: str = "azimuth", stages=("data", "tune", "train")
):
    """Parent run + trial runs + final runs with per-epoch metrics; returns the parent run id."""
    rng = np.random.default_rng(0)
    parent = tracking.start_run(
        name, name, tags={"capsbench.kind": "study", "capsbench.study": name}, system_metrics=False
    )
    parent.log_params({"tune.n_trials": 5, "tune.epochs": 2, "run.train.epochs": 3, "run.data.name": data})
    for model, family in MODELS:
        tags = {"capsbench.study": name, "capsbench.model": model, "capsbench.family": family}
        trials = []
        for t in range(5):
            run = tracking.start_run(
                name, f"{model}-trial-{t}", parent_run_id=parent.run_id, system_metrics=False,
                tags={**tags, "capsbench.kind": "trial", "capsbench.role": "tune", "optuna.trial": t},
            )  # fmt: skip
            value = float(rng.uniform(0.1, 0.6))
            run.log_metrics({"best_val_error": value})
            run.end("KILLED" if t == 3 else "FINISHED")
            trials.append(
                {"number": t, "value": value, "state": "PRUNED" if t == 3 else "COMPLETE",
                 "params_lr": float(rng.uniform(1e-4, 1e-2)), "params_dropout": float(rng.uniform(0, 0.7))}
            )  # fmt: skip
        parent.log_text(pd.DataFrame(trials).to_csv(index=False), f"tune/{model}_trials.csv")
        if "train" not in stages:
            continue
        run = tracking.start_run(
            name, f"{model}-final", parent_run_id=parent.run_id, system_metrics=False,
            tags={**tags, "capsbench.kind": "train", "capsbench.role": "final"},
        )  # fmt: skip
        run.log_params({"data.name": data, "data.view": view, "model.name": model, "n_params": 70_000})
        for epoch in (1, 2, 3):
            run.log_metrics(
                {"test_familiar_error": 0.5 / epoch, "test_novel_error": 0.7 / epoch,
                 "test_error": 0.6 / epoch, "val_error": 0.4 / epoch, "samples_per_s": 100.0 + epoch},
                step=epoch,
            )  # fmt: skip
        run.log_metrics({"final_test_error": 0.2 if family == "capsule" else 0.25, "train_seconds": 30.0})
        if "attack" in stages:
            metrics = {}
            for attack in ("fgsm", "bim"):
                for loss, drop in (("ce", 0.0), ("margin", 0.1)):  # margin is the stronger loss here
                    for eps in (0, 0.1, 0.2):
                        metrics[f"attack/{attack}/{loss}/acc_eps_{eps}"] = 0.8 - eps - drop * (eps > 0)
                        metrics[f"attack/{attack}/{loss}/targeted_success_eps_{eps}"] = eps + drop
            run.log_metrics(metrics)
            run.set_tags({"attack.masking_flags": "bim weaker than fgsm" if family == "capsule" else ""})
        run.end()
    parent.set_tags({f"capsbench.stage.{s}": "done" for s in stages})
    parent.end()
    return parent.run_id


def test_fake_study_report_matches_records(store, tmp_path):
    parent_id = fake_study("fake", stages=("data", "tune", "train", "attack"))
    helper = tracking.start_run(  # a later parent run of a machine that only helped with tuning
        "fake", "fake", tags={"capsbench.kind": "study", "capsbench.study": "fake"}, system_metrics=False
    )
    helper.set_tags({"capsbench.stage.data": "done", "capsbench.stage.tune": "done"})
    helper.end()
    path = report.write_report("fake", out_dir=tmp_path)
    page = parse_page(path)
    assert_embeds_every_figure(tmp_path, page)
    for name in ("training_curves", "accuracy_vs_eps", "targeted_success_vs_eps", "optuna_history"):
        assert (tmp_path / f"{name}.png").exists(), name
    assert (tmp_path / "optuna_importances.png").exists()  # 4 complete trials per model, 2 parameters
    clean = table_rows(page.tables[0])
    assert clean["em_capsnet_small"]["test error"] == "20.0%"
    assert clean["cnn_small"]["test error"] == "25.0%"
    assert clean["cnn_small"]["params"] == "70.0K"
    assert clean["cnn_small"]["train samples/s"] == "102.0"  # median of 101, 102, 103
    attacked = table_rows(page.tables[1])
    # worst case over losses: the margin loss (accuracy 0.8 - 0.1 - 0.1 = 0.6; success 0.2)
    assert attacked["cnn_small"]["FGSM ε=0.1"] == "60.0% / 20.0%"
    assert attacked["em_capsnet_small"]["BIM ε=0.2"] == "50.0% / 30.0%"
    assert attacked["cnn_small"]["clean"] == "80.0%"  # acc_eps_0: both losses agree
    text = (tmp_path / "report.md").read_text()
    assert f"parent run `{parent_id}`" in text  # the parent that got furthest, not the newest
    assert "Gradient-masking flags on `em_capsnet_small`** (treat its robustness" in text
    assert "upper bounds): bim weaker than fgsm" in text
    assert "stage `viewpoint` has not finished" in text
    assert "synthnorb" in text and "| paper:" not in text  # no paper rows for synthnorb
    assert "Budget: 5 trials per model" in text
    logged = tracking.list_artifacts(parent_id, "report")
    assert "report/report.html" in logged and "report/training_curves.png" in logged


def test_paper_reference_rows_only_for_smallnorb(store):
    fake_study("norb", data="smallnorb", view="azimuth", stages=("data", "tune", "train", "attack"))
    records = report.collect("norb")
    table = report.comparison_table(records)
    paper = table[table["model"].str.startswith("paper:")].set_index("family")
    assert paper.loc["cnn", "novel error (matched)"] == pytest.approx(0.200)
    assert paper.loc["capsule", "novel error (matched)"] == pytest.approx(0.135)
    assert paper.loc["capsule", "FGSM accuracy ε=0.1"] == pytest.approx(0.86)
    assert "FGSM accuracy ε=0.5" not in table  # the study did not attack at 0.5
    assert len(paper) == 2  # the small capsule net's number is full-data test error only


def test_paper_rows_full_data():
    rows = {r["model"]: r for r in tables.paper_rows(["model", "family", "params", "test error"], "none")}
    assert rows["paper: EM capsules small (A=64,B=8,C=D=16)"]["test error"] == pytest.approx(0.022)
    assert rows["paper: CNN baseline"]["test error"] == pytest.approx(0.052)
    assert rows["paper: EM capsules (A=B=C=D=32)"]["params"] == pytest.approx(310e3)


def test_missing_stages_still_report(store, tmp_path):
    fake_study("partial", stages=("data", "tune"))  # no final runs, no attacks, no matched protocol
    path = report.write_report("partial", out_dir=tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "no final training runs" in text
    for stage in ("train", "viewpoint", "attack"):
        assert f"stage `{stage}` has not finished" in text
    assert "No final runs yet" in text
    page = parse_page(path)
    assert_embeds_every_figure(tmp_path, page)  # the Optuna figures exist
    assert (tmp_path / "optuna_history.png").exists()
    assert not (tmp_path / "accuracy_vs_eps.png").exists()


def test_unknown_study_is_a_clear_error(store, capsys):
    with pytest.raises(report.ReportError, match="no MLflow runs tagged capsbench.study='nope'"):
        report.collect("nope")
    assert cli.main(["nope", "--no-log"]) == 2
    assert "make study NAME=nope" in capsys.readouterr().err


def test_attack_metrics_worst_case_is_derived_when_absent():
    metrics = {
        "attack/fgsm/ce/acc_eps_0.1": 0.7,
        "attack/fgsm/margin/acc_eps_0.1": 0.5,
        "attack/fgsm/ce/targeted_success_eps_0.1": 0.2,
        "attack/fgsm/margin/targeted_success_eps_0.1": 0.3,
        "final_test_error": 0.1,
    }
    table = parse_attack_metrics("m", metrics)
    worst = table[table["loss"] == "worst"].set_index("kind")["value"]
    assert worst["acc"] == 0.5 and worst["targeted_success"] == 0.3
    assert len(table) == 6


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    assert "python -m harness.report demo" in capsys.readouterr().out


def test_html_escapes_text():
    blocks = [("h1", "a <b> & c"), ("p", "`x<y` and **bold**")]
    out = report.render_html(blocks, image_dir=None)
    assert "<h1>a &lt;b&gt; &amp; c</h1>" in out
    assert "<code>x&lt;y</code>" in out and "<strong>bold</strong>" in out
    assert re.search(r"<title>a &lt;b&gt; &amp; c</title>", out)


# ---------------------------------------------------------------------------------------------
# a study recorded by the real runner, viewpoint protocol and attack suite (tiny synthnorb)
# ---------------------------------------------------------------------------------------------

REAL = "real_tiny"


@pytest.fixture(scope="module")
def real_store(store):
    """A parent run with two final runs trained by harness.train.fit, matched protocol, then attacks.

    Returns (folder, parent run id, {model: run id}, report written before the attack stage).
    Built the way harness.study records a study (docs/contracts.md "Study records"), minus tuning.
    """
    from harness import attack, data, train
    from harness import viewpoint as vp
    from harness.data import synthnorb

    tmp = store / "real"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        root = tmp / "synthnorb"
        synthnorb.synthesize(root, image_size=48, lightings=1, elevations=3, instances=1, progress=False)
        parent = tracking.start_run(
            REAL, REAL, tags={"capsbench.kind": "study", "capsbench.study": REAL}, system_metrics=False
        )
        finals, histories = {}, {}
        for model, family in MODELS:
            cfg = from_dict(RunConfig, {
                "experiment": REAL,
                "model": {"name": model, "args": {"routing_iters": 1} if family == "capsule" else {}},
                "data": {"name": "synthnorb", "root": str(root), "view": "azimuth", "limit_train": 16,
                         "limit_test": 30, "batch_size": 8, "eval_batch_size": 64},
                "train": {"epochs": 2, "device": "cpu", "threads": 1},
            })  # fmt: skip
            tags = {"capsbench.kind": "train", "capsbench.role": "final", "capsbench.study": REAL,
                    "capsbench.model": model, "capsbench.family": family}  # fmt: skip
            result = train.fit(cfg, parent_run_id=parent.run_id, tags=tags)
            finals[model], histories[model] = result.run_id, result.history
        parent.set_tags({f"capsbench.final.{m}": r for m, r in finals.items()})
        parent.set_tags({"capsbench.stage.data": "done", "capsbench.stage.train": "done"})
        # viewpoint stage, as the study records it
        matched = vp.match_checkpoints(histories, families=dict(MODELS), view="azimuth", run_ids=finals)
        test = data.get_dataset("synthnorb", "test", view="azimuth", root=str(root))
        test = test.select(vp.sample_indices(len(test), 45, seed=0))
        frames = []
        for m in matched.models.values():
            cells = vp.checkpoint_cells(m.run_id, m.matched_epoch, test)
            cells.insert(0, "family", m.family)
            cells.insert(0, "model", m.model)
            frames.append(cells)
        parent.log_metrics(vp.parent_metrics(matched))
        parent.log_text(pd.concat(frames).to_csv(index=False), "viewpoint/cells.csv")
        parent.log_json(matched.to_dict(), "viewpoint/matched.json")
        parent.set_tags({"capsbench.stage.viewpoint": "done"})
        before = report.write_report(REAL, out_dir=tmp / "before_attack", log=False)
        for run_id in finals.values():
            settings = attack.AttackSettings(
                attacks=["fgsm", "bim"],
                eps=[0.1],
                losses=["ce", "margin"],
                targeted=True,
                steps=1,
                n_examples=6,
                device="cpu",
                checks=False,
            )
            attack.attack_run(run_id, settings, progress=False)
        parent.set_tags({"capsbench.stage.attack": "done"})
        parent.end()
        yield tmp, parent.run_id, finals, before
    finally:
        torch.set_num_threads(threads)


def test_real_study_report(real_store):
    tmp, parent_id, finals, _ = real_store
    path = report.write_report(REAL, out_dir=tmp / "full")
    page = parse_page(path)  # parses as HTML
    assert_embeds_every_figure(tmp / "full", page)
    for name in ("training_curves", "accuracy_vs_eps", "targeted_success_vs_eps", "viewpoint_heatmaps"):
        assert (tmp / "full" / f"{name}.png").exists(), name
    clean, attacked = (table_rows(t) for t in page.tables[:2])
    assert set(clean) == set(finals)
    runs = {r.run_id: r for r in tracking.study_runs(REAL)}
    matched = json.loads(tracking.read_artifact_text(parent_id, "viewpoint/matched.json"))["models"]
    for model, run_id in finals.items():
        run = runs[run_id]
        row = clean[model]
        assert row["test error"] == f"{100 * run.metrics['final_test_error']:.1f}%"
        assert row["params"] == tables.format_cell("params", float(run.params["n_params"]))
        assert row["novel error (matched)"] == f"{100 * matched[model]['matched_novel_error']:.1f}%"
        assert row["matched epoch"] == str(matched[model]["matched_epoch"])
        for attack, eps in (("fgsm", 0.1), ("bim", 0.1)):
            acc = run.metrics[f"attack/{attack}/worst/acc_eps_{eps:g}"]
            success = run.metrics[f"attack/{attack}/worst/targeted_success_eps_{eps:g}"]
            assert (
                attacked[model][f"{attack.upper()} ε={eps:g}"] == f"{100 * acc:.1f}% / {100 * success:.1f}%"
            )
        assert attacked[model]["clean"] == f"{100 * run.metrics['attack/clean_accuracy']:.1f}%"
    assert "report/report.html" in tracking.list_artifacts(parent_id, "report")
    text = (tmp / "full" / "report.md").read_text()
    assert "stage `tune` has not finished" in text  # this store has no tuning
    assert "Tuning: no Optuna trials recorded." in text


def test_real_study_report_before_attacks(real_store):
    tmp, _, finals, before = real_store
    page = parse_page(before)
    assert_embeds_every_figure(tmp / "before_attack", page)
    assert len(page.tables) == 1  # no attack table
    assert set(table_rows(page.tables[0])) == set(finals)
    text = (tmp / "before_attack" / "report.md").read_text()
    assert "stage `attack` has not finished" in text
    assert "no attack metrics on the final runs" in text
    assert not (tmp / "before_attack" / "accuracy_vs_eps.png").exists()


def test_attack_cells_without_targeted_results():
    table = pd.DataFrame(
        [{"model": "m", "family": "cnn", "test error": 0.1, "FGSM accuracy ε=0.1": 0.25},
         {"model": "n", "family": "cnn", "test error": 0.2, "FGSM accuracy ε=0.1": None},
         {"model": "paper: x", "family": "cnn", "test error": 0.05, "FGSM accuracy ε=0.1": None}]
    )  # fmt: skip
    clean, attacked = tables.split_comparison(table)
    assert list(clean.columns) == ["model", "family", "test error"] and len(clean) == 3
    assert attacked["FGSM ε=0.1"].tolist() == ["25.0%", "–"]  # a paper row with no attack numbers is dropped


def test_importances_find_the_parameter_that_matters():
    rng = np.random.default_rng(0)
    lr, dropout = rng.uniform(0, 1, 30), rng.uniform(0, 1, 30)
    trials = pd.DataFrame(
        {"model": "m", "number": range(30), "state": "COMPLETE", "value": (lr - 0.3) ** 2 + 0.01 * dropout,
         "params_lr": lr, "params_dropout": dropout, "params_schedule": ["a", "b", "c"] * 10}
    )  # fmt: skip
    trials.loc[29, "state"] = "PRUNED"  # only complete trials count
    imp, notes = fanova.importances(trials)
    assert not notes
    assert set(imp["m"]) == {"lr", "dropout", "schedule"}
    assert imp["m"]["lr"] > 0.8 and sum(imp["m"].values()) == pytest.approx(1.0)
    few, notes = fanova.importances(trials.head(2))
    assert few == {} and "too few" in notes[0]


# ---------------------------------------------------------------------------------------------
# what a reader sees first: the answer in one sentence, the parent run's summary, the UI link
# ---------------------------------------------------------------------------------------------


def test_parent_run_carries_the_comparison(store, tmp_path):
    parent_id = fake_study("summary", stages=("data", "tune", "train", "attack"))
    path = report.write_report("summary", out_dir=tmp_path)
    run = tracking.client().get_run(parent_id)
    m = run.data.metrics
    assert m["caps/test_error"] == pytest.approx(0.2) and m["cnn/test_error"] == pytest.approx(0.25)
    assert m["cnn/fgsm_acc_eps_0.1"] == pytest.approx(0.6)  # worst case over losses
    assert m["caps/bim_targeted_success_eps_0.2"] == pytest.approx(0.3)
    assert m["caps/clean_accuracy"] == pytest.approx(0.8)
    assert not any(k.endswith("_ci95") for k in m)  # one seed: no interval
    note = run.data.tags["mlflow.note.content"]
    lead = "On the test set capsules (`em_capsnet_small`) make 20.0% errors vs the CNN's (`cnn_small`) 25.0%"
    assert note.startswith(lead + "; under FGSM at ε = 0.1 they keep 60.0% accuracy vs 60.0%")
    exp_id = run.info.experiment_id
    assert f"(#/experiments/{exp_id}/runs/{parent_id}/artifacts/report/report.html)" in note
    assert str(path) in note
    text = path.with_suffix(".md").read_text()
    assert text.split("\n\n")[1] == f"**{note.splitlines()[0]}**"  # the page leads with the same sentence
    exp = tracking.client().get_experiment(exp_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(exp.tags["mlflow.sharedViewState.capsbench"])
    assert view["orderByKey"] == "tags.`capsbench.kind`" and view["orderByAsc"] is True
    assert view["selectedColumns"][:2] == ["metrics.`caps/test_error`", "metrics.`cnn/test_error`"]
    link = tracking.ui_url(exp_id)
    assert link == (
        f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        "&viewStateShareKey=capsbench"
    )
    assert f"Browse the runs: `make ui`, then open {link}" in text
    assert ("summary", link) in tracking.ui_links()  # what `make ui` prints, one line per experiment


def test_headline_reads_the_matched_protocol(real_store):
    records = report.collect(REAL)
    matched = records.matched["models"]
    caps, cnn = (f"{100 * matched[m]['matched_novel_error']:.1f}%" for m in ("em_capsnet_small", "cnn_small"))
    target = f"{100 * records.matched['target_familiar_error']:.1f}%"
    assert report.headline(records).startswith(
        f"On novel azimuths capsules (`em_capsnet_small`) make {caps} errors vs the CNN's (`cnn_small`) "
        f"{cnn} at matched familiar-view error {target}; under FGSM at ε = 0.1"
    )
    assert report.headline(records).endswith("list `seeds = [0, 1, 2]` in the study file for one).")


def test_accuracy_curves_start_at_the_clean_point():
    metrics = {"attack/clean_accuracy": 0.9, "attack/fgsm/ce/acc_eps_0.1": 0.5,
               "attack/fgsm/margin/acc_eps_0.1": 0.4, "attack/bim/ce/acc_eps_0": 0.8,
               "attack/bim/ce/acc_eps_0.1": 0.3}  # fmt: skip
    table = parse_attack_metrics("m", metrics)
    zero = table[table["eps"] == 0].set_index(["attack", "loss"])["value"]
    assert zero[("fgsm", "ce")] == zero[("fgsm", "margin")] == zero[("fgsm", "worst")] == 0.9
    assert zero[("bim", "ce")] == 0.8  # a logged ε = 0 point is kept as it is
    fig = figures.attack_curves(table, {"m": "capsule"}, kind="acc")
    xs = [line.get_xdata()[0] for line in fig.axes[0].lines]
    assert xs and all(x == 0 for x in xs)  # every FGSM curve starts at ε = 0


def test_the_repository_cites_no_file_outside_it():
    import subprocess

    root = PROJECT_ROOT
    files = subprocess.run(["git", "-C", str(root), "ls-files"], capture_output=True, text=True, check=True)
    outside = ["DESIGN" + ".md", "DESIGN" + " §", "../" + "shared", "STYLE" + ".md"]  # not spelled out here
    cited = [
        name
        for name in files.stdout.split()
        if (root / name).is_file() and any(o in (root / name).read_text(errors="ignore") for o in outside)
    ]
    assert cited == [], f"cite docs/ instead of files outside the repository: {cited}"
