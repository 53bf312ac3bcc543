"""``python -m harness.report NAME``: render a study's comparison report (see harness/report/build.py)."""

from __future__ import annotations

import argparse

from harness.errors import cli_errors
from harness.report.build import write_report


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.report",
        description="Render a study's comparison report (capsules vs CNNs) from its MLflow records. "
        "Reads $MLFLOW_TRACKING_URI (default: the project's mlflow.db).",
        epilog="examples:\n"
        "  python -m harness.report demo                   # -> reports/demo/report.html\n"
        "  MLFLOW_TRACKING_URI=http://host:5000 python -m harness.report smallnorb_azimuth --out /tmp/r",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "name", help="study name (the capsbench.study tag of its runs), e.g. demo or smallnorb_azimuth"
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: $CAPSBENCH_REPORTS/NAME, else reports/NAME)"
    )
    parser.add_argument(
        "--no-log", action="store_true", help="do not log the report to the study's parent run"
    )
    args = parser.parse_args(argv)
    path = write_report(args.name, out_dir=args.out, log=not args.no_log)
    print(f"report: {path}")
    print(f"        {path.with_suffix('.md')}")
    return 0
