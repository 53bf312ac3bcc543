"""The attack suite on trained models in MLflow: a run's (or a study's final runs') model, attacked and
the results logged into that same run.

Each model is rebuilt from its MLflow run alone (``tracking.load_model``), the test split is rebuilt from
the run's config, and the first ``n_examples`` test images in a fixed seeded order are attacked. Results
go into the same run (docs/contracts.md, "Tracking":
``attack/{fgsm|bim|pgd}/{ce|margin|worst}/acc_eps_{eps}``, ``.../targeted_success_eps_{eps}``, tag
``attack.masking_flags``, artifacts ``attack/results.json``, ``attack/results.csv``,
``attack/accuracy_vs_eps.png``)::

    report = attack_run(run_id, AttackSettings(attacks=["fgsm", "bim"], eps=[0, 0.1], targeted=True))
    report.table, report.flags, report.clean_accuracy
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

from harness import tracking
from harness.attack.outputs import write_outputs
from harness.attack.settings import EPS_UNITS, AttackError, AttackSettings
from harness.attack.suite import AttackReport, evaluate_attacks
from harness.config import RunConfig
from harness.device import resolve_device

ARTIFACT_DIR = "attack"


def load_examples(cfg: RunConfig, settings: AttackSettings) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``n_examples`` test images of the run's data in a fixed seeded order, eval-preprocessed.

    -> (x float N×C×S×S in [0,1], y int64 N, a description). A view split uses the whole test set.
    """
    from harness import data  # imported late: the data registry is heavy and only needed here

    settings = settings.validated()
    n_examples, seed = settings.n_examples, settings.seed
    d = cfg.data
    view = None if d.view == "none" else d.view
    test = data.get_dataset(
        d.name,
        "test",
        view=view,
        subset="all",
        channels=d.channels,
        root=d.root or None,
        val_fraction=d.val_fraction,
    )
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(seed))[:n_examples]
    if len(order) < n_examples:
        print(f"note: {d.name} test has only {len(test)} images; attacking all of them", file=sys.stderr)
    x = test.preprocess(test.images[order], train=False)  # N×C×S×S float in [0,1]
    y = test.labels[order].long()
    where = f"{d.name} test" + (f" (view split {view}, all viewpoints)" if view else "")
    return x, y, f"{where}, {len(order)} examples (seed {seed})"


def attack_run(
    run_id: str,
    settings: AttackSettings | None = None,
    *,
    log: bool = True,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> AttackReport:
    """Attack the model of MLflow run ``run_id`` and log the results into that run.

    ``settings.checkpoint`` picks the model ("final", "best" or an epoch). ``log=False`` only computes
    (and writes ``out_dir`` if given).
    """
    settings = (settings or AttackSettings()).validated()
    dev = resolve_device(settings.device)
    model, cfg = tracking.load_model(run_id, settings.checkpoint, device=str(dev))
    x, y, where = load_examples(cfg, settings)
    report = evaluate_attacks(model, x, y, settings, progress=progress)
    report.run_id = run_id
    report.model_name = getattr(model, "model_name", cfg.model.name)
    report.settings.update(data=where, checkpoint=str(settings.checkpoint), device=str(dev))
    if out_dir is not None:
        write_outputs(report, out_dir)
    if log:
        with tempfile.TemporaryDirectory(prefix="capsbench-attack-") as tmp:
            write_outputs(report, tmp)
            tracking.log_attack_results(
                run_id, report_metrics(report), report_tags(report), tmp, ARTIFACT_DIR
            )
    return report


def study_final_runs(study: str) -> list[tuple[str, str]]:
    """(run_id, model name) of a study's final models (tags capsbench.study=NAME, capsbench.role=final)."""
    runs = tracking.study_runs(study)
    if not runs:
        raise AttackError(f"study {study!r} has no runs in {tracking.tracking_uri()}; run the study first")
    final = [r for r in runs if r.tags.get("capsbench.role") == "final"]
    if not final:
        raise AttackError(
            f"study {study!r} has no final runs yet (capsbench.role=final); run its train stage"
        )
    for run in final:
        if run.status != "FINISHED":
            print(
                f"note: skipping final run {run.run_id} of study {study!r}: status {run.status}",
                file=sys.stderr,
            )
    finished = [r for r in final if r.status == "FINISHED"]
    if not finished:
        raise AttackError(f"study {study!r} has no FINISHED final runs; finish (or --resume) its trainings")
    return sorted(
        ((r.run_id, r.tags.get("capsbench.model", "")) for r in finished), key=lambda r: (r[1], r[0])
    )


def attack_study(study: str, settings: AttackSettings | None = None, **kwargs) -> list[AttackReport]:
    """``attack_run`` on every final model of ``study``; same keyword arguments."""
    return [attack_run(run_id, settings, **kwargs) for run_id, _ in study_final_runs(study)]


def metric_name(attack: str, loss: str, mode: str, eps: float) -> str:
    """``attack/fgsm/ce/acc_eps_0.1`` or ``attack/bim/worst/targeted_success_eps_0.2``."""
    what = "acc" if mode == "untargeted" else "targeted_success"
    return f"{ARTIFACT_DIR}/{attack}/{loss}/{what}_eps_{eps:g}"


def report_metrics(report: AttackReport) -> dict[str, float]:
    out = {"attack/clean_accuracy": report.clean_accuracy}
    for row in report.table.itertuples(index=False):
        value = row.accuracy if row.mode == "untargeted" else row.targeted_success
        out[metric_name(row.attack, row.loss, row.mode, row.eps)] = float(value)
    return out


def report_tags(report: AttackReport) -> dict[str, str]:
    return {
        "attack.masking_flags": "; ".join(report.flags),
        "attack.eps_units": EPS_UNITS,
        "attack.settings": json.dumps(report.settings, sort_keys=True, default=str),
    }
