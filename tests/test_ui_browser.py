"""The MLflow UI as a user opens it, in a real browser: headless Chromium on `mlflow ui` (slow suite).

A tiny real study (tests/test_study.py's shrunken demo, two seeds) writes a temporary store; the test
starts `mlflow ui` on it (127.0.0.1 only, a free port), loads the study's link in headless Chromium
(`--dump-dom`), and checks that the runs table lists the parent run, the final runs and the trials by name
with the comparison's metric columns and values, and that the parent run's page shows the headline with a
link to the report. The rendered pages stay in the test's tmp folder (runs_page.html, parent_page.html).

    .venv/bin/python -m pytest -q -m slow tests/test_ui_browser.py
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_study import SHRINK, env  # noqa: F401  (env is a fixture)

from harness import tracking
from harness.study import main as study_main

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).is_file(), reason="needs Chromium (Debian: apt-get install chromium)"
    ),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(store_uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow ui` on 127.0.0.1:port in its own process group (stopped by that id), ready when /health is."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store_uri]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow ui exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    stop_ui(proc)
    raise RuntimeError(f"mlflow ui did not answer on port {port} within 120 s: {log.read_text()[-2000:]}")


def stop_ui(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def dump_dom(url: str, profile: Path, out: Path) -> list[str]:
    """The page as Chromium renders it; returns its visible text, one entry per text node."""
    cmd = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=2400,1200", "--virtual-time-budget=30000",
        "--dump-dom", url,
    ]  # fmt: skip
    page = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True).stdout
    out.write_text(page)
    text = re.sub(r"<(style|script)\b.*?</\1>", "", page, flags=re.S)
    return [t for t in (html.unescape(s).strip() for s in re.split(r"<[^>]+>", text)) if t]


def test_runs_table_shows_the_comparison_in_a_browser(env):  # noqa: F811
    tmp, _ = env
    args = ["demo", "--root", str(tmp / "studies")]
    for setting in [*SHRINK, "seeds=[0, 1]"]:
        args += ["--set", setting]
    assert study_main(args) == 0
    state = json.loads((tmp / "studies" / "demo" / "state.json").read_text())
    parent = tracking.client().get_run(state["parent_run_id"])
    exp_id = parent.info.experiment_id

    port = free_port()
    server = start_ui(tracking.tracking_uri(), port, tmp / "mlflow_ui.log")
    try:
        url = tracking.ui_url(exp_id, port=port)
        assert url.startswith(
            f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs?workflowType=machine_learning"
        )
        runs_page = dump_dom(url, tmp / "chromium", tmp / "runs_page.html")
        run_page = dump_dom(
            f"http://127.0.0.1:{port}/#/experiments/{exp_id}/runs/{parent.info.run_id}",
            tmp / "chromium",
            tmp / "parent_page.html",
        )
    finally:
        stop_ui(server)

    # the runs table: every run by name, flat (parent first), with the comparison's columns and values
    names = ["demo"] + [f"final · {m} · seed {s}" for s in (0, 1) for m in ("em_capsnet_small", "cnn_small")]
    names += [f"trial 0 · {m}" for m in ("em_capsnet_small", "cnn_small")]
    for name in names:
        assert name in runs_page, f"{name!r} not in the runs table: {runs_page[:200]}"
    assert runs_page.index("demo", runs_page.index("Run Name")) < runs_page.index(
        "final · cnn_small · seed 0"
    )
    for column in ("caps/novel_error_matched", "cnn/novel_error_matched", "caps/fgsm_acc_eps_0.1"):
        assert column in runs_page, f"no column {column}"
    value = repr(parent.data.metrics["caps/novel_error_matched"]).removesuffix(
        ".0"
    )  # as JavaScript prints it
    assert value in runs_page[runs_page.index("Run Name") :], f"{value} not in the table"
    assert "Model training" in runs_page and "Sort: capsbench.kind" in runs_page

    # the parent run's page: the answer in one sentence and the report link
    text = " ".join(run_page)
    assert "On novel azimuths capsules (" in text and "mean ± 95% interval over 2 training seeds" in text
    link = f'href="#/experiments/{exp_id}/runs/{parent.info.run_id}/artifacts/report/report.html"'
    assert link in (tmp / "parent_page.html").read_text()
