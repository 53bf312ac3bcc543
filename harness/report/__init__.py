"""The comparison report of a study: capsules vs CNNs side by side, rendered from MLflow records.

    python -m harness.report demo                  # writes reports/demo/report.{md,html} + PNGs
    python -m harness.report smallnorb_azimuth --out /tmp/r --no-log

Reads the study's runs (parent run, Optuna trial runs, final runs with their attack metrics; see
docs/contracts.md "Tracking" and "Study records") through harness.tracking, and writes
``reports/NAME/report.md``, a self-contained ``reports/NAME/report.html`` (figures embedded as data
URIs) and the PNGs, then logs them to the study's parent run under ``report/``, with the summary as
parent-run metrics (``caps/test_error``, ``cnn/novel_error_matched``, ``caps/fgsm_acc_eps_0.1``, ...) and
the answer in one sentence as the run's description. The page leads with that sentence, then the error
table and the accuracy-under-attack table (mean ± 95% interval when the study has several seeds). A
study with a missing stage still gets a report that shows what exists and names what is missing. The
study calls ``write_report(name)`` as its last stage. Set ``MLFLOW_TRACKING_URI`` to read another store.

The flow, one module each: records.py (``collect``: MLflow -> ``StudyRecords``), tables.py (the
comparison table and the parent run's summary metrics), notes.py (the headline and the plain-words
notes), fanova.py + figures.py (the figures), page.py (the page as blocks), render.py (markdown, HTML),
build.py (``write_report``), cli.py.
"""

from harness.report.build import reports_root, write_report
from harness.report.notes import headline
from harness.report.records import ModelRecord, ReportError, StudyRecords, collect
from harness.report.render import render_html, render_markdown
from harness.report.tables import comparison_table

__all__ = [
    "ModelRecord",
    "ReportError",
    "StudyRecords",
    "collect",
    "comparison_table",
    "headline",
    "render_html",
    "render_markdown",
    "reports_root",
    "write_report",
]
