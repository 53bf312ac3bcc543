"""What a run's results depend on: the git commit of the checkout and the library versions."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess

from harness.paths import PROJECT_ROOT


def git_info() -> dict[str, str]:
    """``git.commit`` and ``git.dirty`` (tracked files changed) of the project checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(dirty).lower()}


def versions() -> dict[str, str]:
    """Python and the versions of the libraries results depend on."""
    out = {"python": platform.python_version()}
    for dist in ("capsbench", "torch", "torchvision", "numpy", "mlflow", "optuna", "torchattacks", "pandas"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
