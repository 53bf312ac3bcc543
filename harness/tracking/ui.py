"""The MLflow UI: links that open an experiment's runs table, and ``python -m harness.tracking ui|uri``."""

from __future__ import annotations

import argparse
import json
import os
import sys

import mlflow

from harness.errors import cli_errors
from harness.tracking.store import artifact_root, client, tracking_uri

UI_HOST, UI_PORT = "127.0.0.1", 5000


# MLflow 3 opens every experiment in its GenAI view unless the link asks for the model-training one
EXPERIMENT_KIND = "custom_model_development"


# a shared runs-table view (an experiment tag the UI reads when the link names it): runs listed flat, the
# study's parent run first, then its final runs, then the trials (sorted by capsbench.kind: study < train
# < trial; the default start-time order folds them under the parent), with the comparison's metric columns
RUNS_VIEW = "capsbench"


RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"


RUN_COLUMNS = ["final_test_error", "test_familiar_error", "test_novel_error", "best_val_error"]


def ui_url(experiment_id: str, *, host: str = UI_HOST, port: int = UI_PORT) -> str:
    """The `mlflow ui` link to an experiment's runs table, in the model-training view (and the capsbench
    runs view when the experiment has one)."""
    url = f"http://{host}:{port}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    tags = client().get_experiment(experiment_id).tags
    return url + (f"&viewStateShareKey={RUNS_VIEW}" if RUNS_VIEW_TAG in tags else "")


def share_runs_view(experiment_id: str, summary_metrics: list[str] = ()) -> None:
    """Tag the experiment as model training and (re)write its runs view: ``summary_metrics`` (the parent
    run's comparison) first, then the final runs' and trials' own metrics."""
    columns = [f"metrics.`{m}`" for m in dict.fromkeys([*summary_metrics, *RUN_COLUMNS])]
    view = {
        "orderByKey": "tags.`capsbench.kind`",
        "orderByAsc": True,
        "searchFilter": "",
        "selectedColumns": columns,
    }
    c = client()
    for key, value in (("mlflow.experimentKind", EXPERIMENT_KIND), (RUNS_VIEW_TAG, json.dumps(view))):
        try:
            c.set_experiment_tag(experiment_id, key, value)
        except mlflow.exceptions.MlflowException:  # another machine inserted the tag at the same moment
            c.set_experiment_tag(experiment_id, key, value)


def ui_links(host: str = UI_HOST, port: int = UI_PORT) -> list[tuple[str, str]]:
    """(experiment name, runs-table link) of every live experiment that holds runs, newest first."""
    c = client()
    exps = c.search_experiments(order_by=["last_update_time DESC"])
    live = [e for e in exps if c.search_runs([e.experiment_id], max_results=1)]
    return [(e.name, ui_url(e.experiment_id, host=host, port=port)) for e in live]


@cli_errors
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m harness.tracking",
        description="The capsbench MLflow store: browse it or print where it is.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ui = sub.add_parser("ui", help="print each experiment's runs link, then run `mlflow ui` on the store")
    ui.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    ui.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    sub.add_parser("uri", help="print the tracking URI and the artifact root")
    args = parser.parse_args(argv)

    uri, root = tracking_uri(), artifact_root()
    if args.command == "uri":
        print(f"tracking URI:  {uri}\nartifact root: {root or '(chosen by the tracking server)'}")
        return 0
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host]
    cmd += ["--port", str(args.port)]
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        cmd += ["--default-artifact-root", root.as_uri()]
    print(" ".join(cmd), flush=True)
    links = ui_links(args.host, args.port)
    for name, url in links:
        print(f"experiment {name!r}: {url}", flush=True)
    if not links:
        print(f"no runs yet in {uri}; run `make study NAME=demo` first", flush=True)
    os.execv(sys.executable, cmd)
    return 0  # not reached
