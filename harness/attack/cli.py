"""Attack trained models: FGSM / BIM / PGD over an ε sweep, with gradient-masking checks, logged to MLflow.

    python -m harness.attack --fgsm --bim --run-id RUN_ID                 # untargeted, ce + margin losses
    python -m harness.attack --fgsm --bim --targeted --run-id RUN_ID      # + targeted success (Fig. 3 right)
    python -m harness.attack --fgsm --pgd --study demo --n-examples 200   # the final models of a study
    python -m harness.attack --help

ε is the L∞ budget in [0,1] pixel units of the model input: after the dataset's fixed preprocessing (NORB:
centre crop), before the model's own normalisation. The results go into each attacked run (see
``tracked.py``) and a table is printed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness import tracking
from harness.attack.outputs import EPS_SHORT, format_report, summary_table
from harness.attack.settings import EPS_UNITS, AttackName, AttackSettings
from harness.attack.tracked import attack_run, study_final_runs
from harness.errors import cli_errors


def build_parser() -> argparse.ArgumentParser:
    defaults = AttackSettings()
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
        default=",".join(f"{e:g}" for e in defaults.eps),
        help="comma-separated L-inf budgets in [0,1] pixel units (default %(default)s)",
    )
    p.add_argument(
        "--targeted",
        action="store_true",
        help="also run targeted attacks; success averaged over all target classes != true class",
    )
    p.add_argument(
        "--loss",
        default=",".join(defaults.losses),
        help="attack losses: ce (cross-entropy on logits), margin (CW-style); default %(default)s",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=defaults.steps,
        help="steps of the iterative attacks (default %(default)s)",
    )
    p.add_argument(
        "--n-examples",
        type=int,
        default=defaults.n_examples,
        help="test images to attack (default %(default)s)",
    )
    p.add_argument(
        "--which",
        default=defaults.checkpoint,
        help="checkpoint: final, best or an epoch number (default %(default)s)",
    )
    p.add_argument(
        "--device", default=defaults.device, help="auto | cpu | cuda | cuda:N | mps (default %(default)s)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="order of the test images and PGD starts (default %(default)s)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=defaults.batch_size,
        help="images per attack batch (default %(default)s)",
    )
    p.add_argument("--no-checks", action="store_true", help="skip the gradient-masking checks")
    p.add_argument(
        "--check-examples",
        type=int,
        default=defaults.check_examples,
        help="examples for the unbounded/gradient checks",
    )
    p.add_argument(
        "--check-steps",
        type=int,
        default=defaults.check_steps,
        help="steps of the unbounded (eps=1) check attack",
    )
    p.add_argument("--no-log", action="store_true", help="do not write into the MLflow run; only print")
    p.add_argument("--out", help="also write results.json / results.csv / accuracy_vs_eps.png in this folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    return p


def settings_from_args(args: argparse.Namespace) -> AttackSettings:
    """The command line's AttackSettings, validated."""
    return AttackSettings(
        attacks=[a.value for a in AttackName if getattr(args, a.value)] or AttackSettings().attacks,
        eps=args.eps,
        losses=args.loss,
        targeted=args.targeted,
        steps=args.steps,
        n_examples=args.n_examples,
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        checkpoint=args.which,
        checks=not args.no_checks,
        check_examples=args.check_examples,
        check_steps=args.check_steps,
    ).validated()


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    runs = [(tracking.resolve_run_id(args.run_id), "")] if args.run_id else study_final_runs(args.study)
    reports = []
    for run_id, _ in runs:
        out = Path(args.out) / run_id if args.out and len(runs) > 1 else args.out
        report = attack_run(run_id, settings, log=not args.no_log, out_dir=out, progress=not args.quiet)
        reports.append(report)
        print(format_report(report), end="\n\n", flush=True)
    if len(reports) > 1:
        print(f"study {args.study}: worst-case (over losses) untargeted accuracy by eps ({EPS_SHORT})")
        print(summary_table(reports).to_string(float_format="{:.3f}".format))
    if not args.no_log:
        print(f"logged into run(s) {', '.join(r.run_id for r in reports)} in {tracking.tracking_uri()}")
    return 0
