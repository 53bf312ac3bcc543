"""``python -m harness.study NAME``: run a study, or --status / --check / --list it (see harness/study)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from harness.config import ConfigError
from harness.errors import cli_errors
from harness.study import storage
from harness.study.config import list_studies, load_study, study_toml
from harness.study.pipeline import check_runs, run_study
from harness.study.state import DEFAULT_ROOT, single_runner
from harness.study.status import links_text, status_text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m harness.study",
        description="Run a study (studies/NAME.toml): tune, train, matched viewpoint protocol, attacks, "
        "report. Rerun the same command to resume.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("name", nargs="?", help="study name (studies/NAME.toml) or path to a study file")
    p.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a study setting, e.g. --set tune.n_trials=4 --set train.epochs=3 (run.train.epochs); "
        "type-checked, unknown keys are errors; repeatable",
    )
    p.add_argument("--workers", type=int, default=1, help="local worker processes sharing the Optuna studies")
    p.add_argument(
        "--storage",
        metavar="URL",
        help="Optuna RDB URL shared by machines, e.g. postgresql+psycopg://user:pw@host/optuna (driver: "
        "pip install -e '.[scale]'); default: a journal file in the study folder",
    )
    p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="where study folders live")
    p.add_argument("--fresh", action="store_true", help="delete the study folder and start over")
    p.add_argument("--status", action="store_true", help="print what is done and what is left, then exit")
    p.add_argument(
        "--check",
        action="store_true",
        help="validate the study file and every model's run settings (as harness.train does, device "
        "included), then print it resolved",
    )
    p.add_argument("--list", action="store_true", help="list the study files and exit")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        print("\n".join(list_studies()))
        return 0
    if not args.name:
        print("error: name a study, e.g. `python -m harness.study demo` (--list shows them)", file=sys.stderr)
        return 2
    from harness.tracking import tracking_uri

    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    cfg = load_study(args.name, args.overrides)
    if args.check:
        check_runs(cfg)
        print(study_toml(cfg), end="")
        return 0
    # a missing driver or an unreachable database fails here, before anything is created
    storage.check_tracking_uri(tracking_uri())
    if args.storage:
        storage.check_storage(args.storage)
    if args.status:
        print(status_text(cfg, args.root, args.storage))
        return 0
    t0 = time.perf_counter()
    with single_runner(args.root, cfg.name):
        study = run_study(cfg, root=args.root, storage=args.storage, workers=args.workers, fresh=args.fresh)
    print(status_text(cfg, args.root, args.storage))
    print(f"study {cfg.name} finished in {time.perf_counter() - t0:.0f}s (folder {study.folder})")
    print(links_text(study))
    return 0
