"""Several training seeds: the interval maths, the study's per-seed final runs, the report over seeds; and
the progress lines a study writes off a terminal.

The study tests reuse tests/test_study.py's fake ``fit`` (nested MLflow runs, no training), wrapped here so
that the histories depend on the seed and a chosen final run can be made to fail.

    .venv/bin/python -m pytest -q tests/test_seeds.py
"""

from __future__ import annotations

import json
import math

import pytest
from test_study import env, study_runs  # noqa: F401  (env is a fixture)

from harness import report, tracking
from harness import viewpoint as vp
from harness.config import ConfigError
from harness.intervals import estimate
from harness.progress import Progress
from harness.study import links_text, run_study
from harness.study.config import load_study, study_seeds
from harness.study.pipeline import open_parent_run
from harness.study.stages import compare_seed_runs

SEEDED_FIT = '''
"""tests/test_study.py's fake fit, with seed-dependent novel errors and an injectable final-run failure."""
import os

from fake_fit import fit as plain_fit


def fail(epoch, metrics):
    raise RuntimeError("injected failure")


def fit(cfg, **kwargs):
    final = (kwargs.get("tags") or {}).get("capsbench.role") == "final"
    if final and os.environ.get("FAIL_FINAL") == f"{cfg.model.name}:{cfg.train.seed}":
        kwargs["epoch_callback"] = fail  # the run fails after its first epoch, before any checkpoint
    result = plain_fit(cfg, **kwargs)
    shift = 0.01 * cfg.train.seed * (1 if cfg.model.name.startswith("em_") else -1)
    result.history = [{**h, "test_novel_error": h["test_novel_error"] + shift} for h in result.history]
    return result
'''


# ---------------------------------------------------------------------------------------------
# the maths
# ---------------------------------------------------------------------------------------------


def test_t_interval_matches_the_textbook():
    est = estimate([0.10, 0.12, 0.14])
    assert est.mean == pytest.approx(0.12) and est.sd == pytest.approx(0.02)
    assert est.half == pytest.approx(4.302653 * 0.02 / math.sqrt(3), rel=1e-6)  # t(0.975, 2 df)
    assert f"{est:pct}" == "12.0 ± 5.0%"
    one = estimate([0.2, float("nan"), None])
    assert one.n == 1 and math.isnan(one.half) and f"{one:pct}" == "20.0%"
    assert estimate([]).n == 0 and f"{estimate([]):pct}" == "–"


def _history(familiar: list[float], novel: list[float]) -> list[dict]:
    return [
        {"epoch": i + 1, "test_familiar_error": f, "test_novel_error": n, "val_error": f}
        for i, (f, n) in enumerate(zip(familiar, novel))
    ]


def _matches(novel_caps: list[float], novel_cnn: list[float]) -> dict[int, vp.MatchResult]:
    families = {"em_capsnet_small": "capsule", "cnn_small": "cnn"}
    return {
        seed: vp.match_checkpoints(
            {"em_capsnet_small": _history([0.3, 0.1], [0.5, c]), "cnn_small": _history([0.3, 0.1], [0.6, n])},
            families=families,
            view="azimuth",
        )
        for seed, (c, n) in enumerate(zip(novel_caps, novel_cnn))
    }


def test_seed_comparison_says_whether_the_difference_beats_the_spread():
    clear = vp.compare_seeds(_matches([0.14, 0.15, 0.13], [0.20, 0.21, 0.19]))
    assert clear.novel["em_capsnet_small"].mean == pytest.approx(0.14)
    assert clear.difference.mean == pytest.approx(-0.06) and clear.difference.half == pytest.approx(0.0)
    assert clear.spread == pytest.approx(0.01)
    assert clear.larger_than_spread
    assert clear.verdict().startswith("the capsule − CNN difference of -6.0 points")
    assert "is larger than the seed-to-seed spread (SD up to 1.0 points over 3 seeds)" in clear.verdict()
    noisy = vp.compare_seeds(_matches([0.10, 0.25, 0.13], [0.20, 0.12, 0.19]))
    assert not noisy.larger_than_spread and "do not separate the two" in noisy.verdict()
    single = vp.compare_seeds(_matches([0.1], [0.2]))
    assert not single.larger_than_spread and "too few paired seeds" in single.verdict()
    metrics = vp.seed_parent_metrics(clear)
    assert metrics["viewpoint/novel_error_difference"] == pytest.approx(-0.06)
    assert metrics["viewpoint/em_capsnet_small/matched_novel_error_ci95"] == pytest.approx(
        clear.novel["em_capsnet_small"].half
    )


def test_progress_lines_estimate_the_time_left(monkeypatch):
    now = [0.0]
    monkeypatch.setattr("harness.progress.time.perf_counter", lambda: now[0])
    lines: list[str] = []
    bar = Progress(5, "train", "epoch", done=1, log=lines.append, tty=False)  # 1 epoch done earlier
    now[0] = 10.0
    bar.update(1, "cnn_small epoch 1/2")  # 1 new epoch in 10 s -> 3 left, about 30 s
    now[0] = 20.0
    bar.update(1, "cnn_small epoch 2/2")
    now[0] = 30.0
    bar.set(5)
    assert lines[0] == "train: 2/5 epochs (cnn_small epoch 1/2), 10 s elapsed, about 30 s left"
    assert lines[1].startswith("train: 3/5 epochs") and lines[1].endswith("about 20 s left")
    assert lines[2].endswith("done")


# ---------------------------------------------------------------------------------------------
# a study with seeds (fake fit)
# ---------------------------------------------------------------------------------------------


def seeded(tmp, study_file, *overrides):
    (tmp / "seeded_fit.py").write_text(SEEDED_FIT)
    cfg = load_study(study_file, ["tune.n_trials=2", "seeds=[0, 1, 2]", *overrides])
    return cfg


def test_seeds_must_be_distinct(env):  # noqa: F811
    _, study_file = env
    with pytest.raises(ConfigError, match="seeds must be distinct integers >= 0"):
        load_study(study_file, ["seeds=[1, 1]"])
    assert study_seeds(load_study(study_file)) == [0]  # default: one seed, run.train.seed


def test_every_seed_gets_its_own_named_final_run(env):  # noqa: F811
    tmp, study_file = env
    cfg = seeded(tmp, study_file)
    study = run_study(cfg, root=tmp / "studies", fit_target="seeded_fit:fit")
    runs = study_runs("tiny")
    finals = [r for r in runs if r.data.tags.get("capsbench.role") == "final"]
    names = sorted(r.data.tags["mlflow.runName"] for r in finals)
    assert names == sorted(f"final · {m} · seed {s}" for m in cfg.models for s in (0, 1, 2))
    assert all(
        r.data.tags["mlflow.runName"].endswith(f"seed {r.data.tags['capsbench.seed']}") for r in finals
    )
    trials = sorted(
        r.data.tags["mlflow.runName"] for r in runs if r.data.tags.get("capsbench.kind") == "trial"
    )
    assert trials == sorted(f"trial {k} · {m}" for m in cfg.models for k in (0, 1))
    state = json.loads((study.folder / "state.json").read_text())
    parent = next(r for r in runs if r.data.tags.get("capsbench.kind") == "study")
    for model in cfg.models:
        assert set(state["seed_runs"][model]) == {"0", "1", "2"}
        assert state["final_runs"][model] == state["seed_runs"][model]["0"]  # one run per model: seed 0
        assert parent.data.tags[f"capsbench.final.{model}"] == state["final_runs"][model]
    log = (study.folder / "study.log").read_text()
    assert "train: 12/12 epochs (cnn_small seed 2 epoch 2/2)" in log  # 2 models × 3 seeds × 2 epochs
    assert "about" in log and "left" in log and "tune: 4/4 trials" in log
    exp = tracking.client().get_experiment_by_name("tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    link = f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
    assert f"runs:    make ui, then open {link}&viewStateShareKey=capsbench" in links_text(study)

    # the matched protocol over seeds (the viewpoint stage's seed part; the fake fit has no checkpoints)
    compare_seed_runs(
        study, open_parent_run(study), {m: "capsule" if "caps" in m else "cnn" for m in cfg.models}
    )
    record = json.loads((study.folder / "viewpoint" / "seeds.json").read_text())
    assert record["seeds"] == [0, 1, 2] and set(record["matches"]) == {"0", "1", "2"}
    diff = [
        record["matches"][s]["models"]["em_capsnet_small"]["matched_novel_error"]
        - record["matches"][s]["models"]["cnn_small"]["matched_novel_error"]
        for s in ("0", "1", "2")
    ]
    assert record["difference"]["mean"] == pytest.approx(sum(diff) / 3)
    assert (
        record["verdict"]
        == vp.compare_seeds({int(s): _as_result(m) for s, m in record["matches"].items()}).verdict()
    )


def _as_result(d: dict) -> vp.MatchResult:
    models = {m: vp.MatchedModel(model=m, **v) for m, v in d["models"].items()}
    return vp.MatchResult(d["view"], d["rule"], d["reference_model"], d["target_familiar_error"], models)


def test_a_failed_seed_resumes_without_retraining_the_others(env, monkeypatch):  # noqa: F811
    tmp, study_file = env
    cfg = seeded(tmp, study_file)
    monkeypatch.setenv("FAIL_FINAL", "cnn_small:1")
    with pytest.raises(RuntimeError, match="injected failure"):
        run_study(cfg, root=tmp / "studies", fit_target="seeded_fit:fit")
    state = json.loads((tmp / "studies" / "tiny" / "state.json").read_text())
    done_before = {m: dict(r) for m, r in state["seed_runs"].items()}
    assert set(done_before["em_capsnet_small"]) == {"0", "1"} and set(done_before["cnn_small"]) == {"0"}
    monkeypatch.delenv("FAIL_FINAL")
    study = run_study(cfg, root=tmp / "studies", fit_target="seeded_fit:fit")
    state = json.loads((study.folder / "state.json").read_text())
    for model, runs in done_before.items():
        assert all(state["seed_runs"][model][s] == r for s, r in runs.items())  # kept, not retrained
    finals = [r for r in study_runs("tiny") if r.data.tags.get("capsbench.role") == "final"]
    assert len([r for r in finals if r.info.status == "FINISHED"]) == 6
    assert [r.info.status for r in finals if r.info.status != "FINISHED"] == ["FAILED"]  # the injected one


# ---------------------------------------------------------------------------------------------
# the report over seeds (a store written by hand, as the study records it)
# ---------------------------------------------------------------------------------------------

NOVEL = {"em_capsnet_small": [0.14, 0.15, 0.13], "cnn_small": [0.20, 0.21, 0.19]}
TEST_ERROR = {"em_capsnet_small": [0.10, 0.12, 0.14], "cnn_small": [0.20, 0.20, 0.23]}
FGSM = {"em_capsnet_small": [0.5, 0.6, 0.7], "cnn_small": [0.3, 0.3, 0.3]}


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def seeded_store(name: str) -> str:
    parent = tracking.start_run(
        name, name, tags={"capsbench.kind": "study", "capsbench.study": name}, system_metrics=False
    )
    parent.log_params({"run.data.name": "synthnorb", "run.data.view": "azimuth"})
    matches = _matches(NOVEL["em_capsnet_small"], NOVEL["cnn_small"])
    for model, family in (("em_capsnet_small", "capsule"), ("cnn_small", "cnn")):
        for seed in (0, 1, 2):
            run = tracking.start_run(
                name, f"final · {model} · seed {seed}", parent_run_id=parent.run_id, system_metrics=False,
                tags={"capsbench.kind": "train", "capsbench.role": "final", "capsbench.study": name,
                      "capsbench.model": model, "capsbench.family": family, "capsbench.seed": str(seed)},
            )  # fmt: skip
            run.log_params({"data.name": "synthnorb", "data.view": "azimuth"})
            run.log_metrics({"test_familiar_error": 0.1, "test_novel_error": NOVEL[model][seed]}, step=1)
            run.log_metrics(
                {"final_test_error": TEST_ERROR[model][seed], "attack/clean_accuracy": 0.9,
                 "attack/fgsm/worst/acc_eps_0.1": FGSM[model][seed]}
            )  # fmt: skip
            run.end()
            matches[seed].models[model].run_id = run.run_id
            if seed == 0:
                parent.set_tags({f"capsbench.final.{model}": run.run_id})
    comparison = vp.compare_seeds(matches)
    parent.log_json(matches[0].to_dict(), "viewpoint/matched.json")
    parent.log_json(
        {**comparison.to_dict(), "matches": {str(s): r.to_dict() for s, r in matches.items()}},
        "viewpoint/seeds.json",
    )
    parent.set_tags(
        {f"capsbench.stage.{s}": "done" for s in ("data", "tune", "train", "viewpoint", "attack")}
    )
    parent.end()
    return parent.run_id


def test_report_shows_mean_and_interval_over_seeds(store):
    parent_id = seeded_store("seeded")
    records = report.collect("seeded")
    assert records.n_seeds == 3 and [r.seed for r in records.replicates["cnn_small"]] == ["0", "1", "2"]
    report.write_report("seeded", out_dir=store / "out")
    text = (store / "out" / "report.md").read_text()
    caps, cnn = (estimate(NOVEL[m]) for m in ("em_capsnet_small", "cnn_small"))
    lead = text.split("\n\n")[1]
    assert lead.startswith(
        f"**On novel azimuths capsules (`em_capsnet_small`) make {caps:pct} errors "
        f"vs the CNN's (`cnn_small`) {cnn:pct} at matched familiar-view error 10.0 ± 0.0%"
    )
    assert "(mean ± 95% interval over 3 training seeds); the capsule − CNN difference of -6.0 points" in lead
    assert "is larger than the seed-to-seed spread" in lead
    summary = text.split("## Summary: errors")[1].split("## Under attack")[0]
    rows = {
        line.split(" | ")[0].lstrip("| "): line.split(" | ")
        for line in summary.splitlines()
        if "_small |" in line
    }
    test_caps = estimate(TEST_ERROR["em_capsnet_small"])
    assert rows["em_capsnet_small"][2] == "3"  # the seeds column
    assert f"{test_caps:pct}" in rows["em_capsnet_small"]  # 12.0 ± 5.0%
    assert f"{estimate(FGSM['em_capsnet_small']):pct}" in text  # 60.0 ± 24.8% under FGSM
    parent = tracking.client().get_run(parent_id)
    assert parent.data.metrics["caps/test_error"] == pytest.approx(0.12)
    assert parent.data.metrics["caps/test_error_ci95"] == pytest.approx(test_caps.half)
    assert parent.data.metrics["cnn/fgsm_acc_eps_0.1"] == pytest.approx(0.3)
    assert parent.data.metrics["caps/novel_error_matched_ci95"] == pytest.approx(caps.half)
    assert "the seed-to-seed spread" in parent.data.tags["mlflow.note.content"]
