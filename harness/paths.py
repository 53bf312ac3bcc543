"""Where the project's own folders are: the default homes of data, runs, studies, reports and the store."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
STUDIES_DIR = PROJECT_ROOT / "studies"
