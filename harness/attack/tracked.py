"""Attack trained models: FGSM / BIM / PGD over an ε sweep, with gradient-masking checks, logged to MLflow.

    python -m harness.attack --fgsm --bim --run-id RUN_ID                 # untargeted, ce + margin losses
    python -m harness.attack --fgsm --bim --targeted --run-id RUN_ID      # + targeted success (Fig. 3 right)
    python -m harness.attack --fgsm --pgd --study demo --n-examples 200   # the final models of a study
    python -m harness.attack --help

ε is the L∞ budget in [0,1] pixel units of the model input: after the dataset's fixed preprocessing (NORB:
centre crop), before the model's own normalisation. Each model is rebuilt from its MLflow run alone
(``tracking.load_model``), the test split is rebuilt from the run's config, and the first ``n_examples``
test images in a fixed seeded order are attacked. Results go into the same run (docs/contracts.md,
"Tracking": ``attack/{fgsm|bim|pgd}/{ce|margin|worst}/acc_eps_{eps}``, ``.../targeted_success_eps_{eps}``,
tag ``attack.masking_flags``, artifacts ``attack/results.json``, ``attack/results.csv``,
``attack/accuracy_vs_eps.png``) and a table is printed. Python API (what the study calls)::

    report = attack_run(run_id, attacks=("fgsm", "bim"), eps=(0, 0.1), losses=("ce", "margin"), targeted=True)
    report.table, report.flags, report.clean_accuracy
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from harness import tracking  # noqa: E402
from harness.adversarial import (  # noqa: E402
    EPS_UNITS,
    WORST,
    AttackError,
    AttackName,
    AttackReport,
    curves,
    evaluate_attacks,
    parse_eps,
    parse_names,
)
from harness.config import RunConfig  # noqa: E402
from harness.device import resolve_device  # noqa: E402
from harness.errors import cli_errors  # noqa: E402

DEFAULT_EPS = (0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
ARTIFACT_DIR = "attack"
EPS_SHORT = "eps in [0,1] pixel units of the model input"
LINE_STYLES = {"ce": ":", "margin": "--", WORST: "-"}

__all__ = [
    "AttackReport",
    "AttackError",
    "attack_run",
    "attack_study",
    "load_examples",
    "format_report",
    "main",
]


# ---------------------------------------------------------------------------------------------
# data and model from a run
# ---------------------------------------------------------------------------------------------


def load_examples(cfg: RunConfig, n_examples: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The first ``n_examples`` test images of the run's data in a fixed seeded order, eval-preprocessed.

    -> (x float N×C×S×S in [0,1], y int64 N, a description). A view split uses the whole test set.
    """
    from harness import data  # imported late: the data registry is heavy and only needed here

    if n_examples < 1:
        raise AttackError(f"n_examples must be at least 1, got {n_examples}")
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


# ---------------------------------------------------------------------------------------------
# the entry points
# ---------------------------------------------------------------------------------------------


def attack_run(
    run_id: str,
    *,
    attacks: Sequence[str] = ("fgsm", "bim"),
    eps: Sequence[float] = DEFAULT_EPS,
    losses: Sequence[str] = ("ce", "margin"),
    targeted: bool = True,
    steps: int = 10,
    n_examples: int = 500,
    device: str = "auto",
    seed: int = 0,
    which: str | int = "final",
    batch_size: int = 100,
    checks: bool = True,
    check_examples: int = 100,
    check_steps: int = 50,
    log: bool = True,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> AttackReport:
    """Attack the model of MLflow run ``run_id`` and log the results into that run.

    ``which`` picks the checkpoint ("final", "best" or an epoch). ``log=False`` only computes (and writes
    ``out_dir`` if given). See harness.adversarial.evaluate_attacks for the checks' settings.
    """
    attacks = parse_names(attacks, AttackName, "attack")
    eps = parse_eps(eps)
    dev = resolve_device(device)
    model, cfg = tracking.load_model(run_id, which, device=str(dev))
    x, y, where = load_examples(cfg, n_examples, seed)
    report = evaluate_attacks(
        model,
        x,
        y,
        attacks=attacks,
        eps=eps,
        losses=losses,
        targeted=targeted,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        device=dev,
        checks=checks,
        check_examples=check_examples,
        check_steps=check_steps,
        progress=progress,
    )
    report.run_id = run_id
    report.model_name = getattr(model, "model_name", cfg.model.name)
    report.settings.update(data=where, checkpoint=str(which), device=str(dev))
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
    if not tracking.study_runs(study):
        raise AttackError(f"study {study!r} has no runs in {tracking.tracking_uri()}; run the study first")
    final = tracking.find_runs({"capsbench.study": study, "capsbench.role": "final"})
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


def attack_study(study: str, **kwargs: Any) -> list[AttackReport]:
    """``attack_run`` on every final model of ``study``; same keyword arguments."""
    return [attack_run(run_id, **kwargs) for run_id, _ in study_final_runs(study)]


# ---------------------------------------------------------------------------------------------
# outputs: metrics, table, JSON, CSV, plot
# ---------------------------------------------------------------------------------------------


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


def format_report(report: AttackReport) -> str:
    """The printed table: accuracy (and targeted success) per attack/loss by ε, then the masking flags."""
    fmt = "{:.3f}".format
    head = f"{report.model_name or 'model'}" + (f"  run {report.run_id}" if report.run_id else "")
    lines = [
        f"{head}  |  {report.settings.get('data', f'{report.n_examples} examples')}  |  "
        f"clean accuracy {report.clean_accuracy:.3f}",
        f"eps: {EPS_UNITS}",
        "",
        f"untargeted accuracy by eps ({EPS_SHORT}; correct on clean and adversarial input):",
        _eps_table(curves(report.table, "untargeted")).to_string(float_format=fmt),
    ]
    if (report.table["mode"] == "targeted").any():
        lines += [
            "",
            f"targeted success by eps ({EPS_SHORT}; mean over all target classes != true class):",
            _eps_table(curves(report.table, "targeted")).to_string(float_format=fmt),
        ]
    lines += ["", format_flags(report.flags, report.settings.get("checks", True))]
    lines += [f"  note: {n}" for n in report.checks.get("notes", [])]
    return "\n".join(lines)


def format_flags(flags: Sequence[str], checked: bool = True) -> str:
    if not flags:
        if not checked:
            return "gradient-masking checks: NOT RUN (--no-checks); robustness numbers are unverified"
        return "gradient-masking checks: all passed (no flags)"
    return "\n".join(
        [f"GRADIENT-MASKING FLAGS ({len(flags)}): these numbers may overstate robustness"]
        + [f"  ! {f}" for f in flags]
    )


def _eps_table(table: pd.DataFrame) -> pd.DataFrame:
    table = table.copy()
    table.columns = [f"eps={e:g}" for e in table.columns]
    return table


def write_outputs(report: AttackReport, folder: str | Path) -> dict[str, Path]:
    """``results.json``, ``results.csv`` and ``accuracy_vs_eps.png`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": folder / "results.json",
        "csv": folder / "results.csv",
        "png": folder / "accuracy_vs_eps.png",
    }
    paths["json"].write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    table = report.table.assign(eps_units=EPS_UNITS, masking_flags="; ".join(report.flags))
    table.to_csv(paths["csv"], index=False)
    plot_report(report, paths["png"])
    return paths


def plot_report(report: AttackReport, path: str | Path) -> Path:
    """Accuracy vs ε (left) and targeted success vs ε (right), one line per attack/loss; flags in red."""
    modes = ["untargeted"] + (["targeted"] if (report.table["mode"] == "targeted").any() else [])
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        table = curves(report.table, mode)
        for (attack, loss), values in table.iterrows():  # colour = attack, line style = loss
            color = f"C{[a.value for a in AttackName].index(attack)}"
            style = LINE_STYLES.get(loss, "-.")
            ax.plot(
                table.columns,
                values.to_numpy(),
                style,
                color=color,
                marker="o",
                ms=3,
                label=f"{attack}/{loss}",
            )
        ax.set_xlabel("ε (L∞, [0,1] pixel units of the model input)")
        ax.set_ylabel("accuracy" if mode == "untargeted" else "targeted success rate")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"{mode}", fontsize=10)
    fig.suptitle(
        f"{report.model_name or 'model'} (clean accuracy {report.clean_accuracy:.3f}, "
        f"{report.n_examples} examples)\nε: L∞ budget in [0,1] pixel units of the model input",
        fontsize=10,
    )
    bottom = 0.0
    if report.flags:  # wrapped to the figure's width (~19 characters per inch at 7 pt), room kept below
        lines = [f"GRADIENT-MASKING FLAGS ({len(report.flags)}):"]
        lines += [w for f in report.flags for w in textwrap.wrap(f"! {f}", int(19 * fig.get_figwidth()))]
        bottom = min(0.45, 0.03 + 0.028 * len(lines))
        fig.text(0.01, 0.01, "\n".join(lines), color="red", fontsize=7, va="bottom")
    elif not report.settings.get("checks", True):
        bottom = 0.05
        fig.text(0.01, 0.01, "gradient-masking checks not run: unverified", color="gray", fontsize=7)
    fig.tight_layout(rect=(0, bottom, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def summary_table(reports: Sequence[AttackReport]) -> pd.DataFrame:
    """Models side by side: worst-case untargeted accuracy per attack by ε (plus a flags count)."""
    frames = []
    for r in reports:
        t = r.table[(r.table["mode"] == "untargeted") & (r.table["loss"] == WORST)]
        wide = t.pivot_table(index="attack", columns="eps", values="accuracy", sort=False)
        wide.columns = [f"eps={e:g}" for e in wide.columns]
        wide.insert(0, "model", r.model_name)
        wide["flags"] = len(r.flags)
        frames.append(wide.reset_index().set_index(["model", "attack"]))
    return pd.concat(frames) if frames else pd.DataFrame()


# ---------------------------------------------------------------------------------------------
# the command line
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.attack",
        description="Attack trained capsbench models (FGSM/BIM/PGD, eps sweep, gradient-masking checks) and "
        f"log the results into their MLflow runs. eps is the {EPS_UNITS}.",
        epilog="Without --fgsm/--bim/--pgd the attacks are --fgsm --bim. Example: python -m harness.attack "
        "--fgsm --bim --targeted --run-id 0123abcd --n-examples 200",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument(
        "--run-id", help="MLflow run of the trained model to attack (or a unique prefix of its id)"
    )
    target.add_argument("--study", help="attack every final model of this study (capsbench.role=final)")
    p.add_argument("--fgsm", action="store_true", help="FGSM (one step of size eps)")
    p.add_argument("--bim", action="store_true", help="BIM / iterative FGSM (--steps steps of 2.5*eps/steps)")
    p.add_argument(
        "--pgd", action="store_true", help="PGD (BIM from a uniformly random start in the eps ball)"
    )
    p.add_argument(
        "--eps",
        default=",".join(f"{e:g}" for e in DEFAULT_EPS),
        help="comma-separated L-inf budgets in [0,1] pixel units (default %(default)s)",
    )
    p.add_argument(
        "--targeted",
        action="store_true",
        help="also run targeted attacks; success averaged over all target classes != true class",
    )
    p.add_argument(
        "--loss",
        default="ce,margin",
        help="attack losses: ce (cross-entropy on logits), margin (CW-style); default %(default)s",
    )
    p.add_argument("--steps", type=int, default=10, help="steps of the iterative attacks (default 10)")
    p.add_argument("--n-examples", type=int, default=500, help="test images to attack (default 500)")
    p.add_argument(
        "--which", default="final", help="checkpoint: final, best or an epoch number (default final)"
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default auto)")
    p.add_argument("--seed", type=int, default=0, help="order of the test images and PGD starts (default 0)")
    p.add_argument("--batch-size", type=int, default=100, help="images per attack batch (default 100)")
    p.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    p.add_argument(
        "--check-examples", type=int, default=100, help="examples for the unbounded/gradient checks"
    )
    p.add_argument("--check-steps", type=int, default=50, help="steps of the unbounded (eps=1) check attack")
    p.add_argument("--no-log", action="store_true", help="do not write into the MLflow run; only print")
    p.add_argument("--out", help="also write results.json / results.csv / accuracy_vs_eps.png in this folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    attacks = [a.value for a in AttackName if getattr(args, a.value)] or ["fgsm", "bim"]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    which: str | int = int(args.which) if args.which.isdigit() else args.which
    if args.batch_size < 1 or args.steps < 1 or args.check_steps < 1 or args.check_examples < 1:
        raise AttackError("--batch-size, --steps, --check-steps and --check-examples must be >= 1")
    kwargs = dict(
        attacks=attacks,
        eps=args.eps,
        losses=args.loss,
        targeted=args.targeted,
        steps=args.steps,
        n_examples=args.n_examples,
        device=args.device,
        seed=args.seed,
        which=which,
        batch_size=args.batch_size,
        checks=not args.no_checks,
        check_examples=args.check_examples,
        check_steps=args.check_steps,
        log=not args.no_log,
        progress=not args.quiet,
    )
    runs = [(tracking.resolve_run_id(args.run_id), "")] if args.run_id else study_final_runs(args.study)
    reports = []
    for run_id, _ in runs:
        out = Path(args.out) / run_id if args.out and len(runs) > 1 else args.out
        report = attack_run(run_id, out_dir=out, **kwargs)
        reports.append(report)
        print(format_report(report), end="\n\n", flush=True)
    if len(reports) > 1:
        print(f"study {args.study}: worst-case (over losses) untargeted accuracy by eps ({EPS_SHORT})")
        print(summary_table(reports).to_string(float_format="{:.3f}".format))
    if not args.no_log:
        print(f"logged into run(s) {', '.join(r.run_id for r in reports)} in {tracking.tracking_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
