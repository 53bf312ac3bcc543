"""A study's folder on this machine (``runs/studies/NAME/``): the resolved study file (study.toml), the
stage markers and results (state.json), the log (study.log), and the lock that lets one runner work in it.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from harness.config import load_toml
from harness.errors import CapsbenchError
from harness.paths import PROJECT_ROOT
from harness.study.config import (
    StudyConfig,
    fingerprint,
    model_family,
    study_from_dict,
    study_seeds,
    study_toml,
)

DEFAULT_ROOT = PROJECT_ROOT / "runs" / "studies"
# "module:function" that trials and final runs call; tests inject a fake with run_study(fit_target=...)
FIT_TARGET = "harness.train:fit"


class StudyError(CapsbenchError, RuntimeError):
    """A study that cannot go on; the message says what to do."""

    exit_code = 1


@dataclass
class Study:
    """A study's folder, and how its trials run: where they are stored, how many local workers, what they
    call."""

    cfg: StudyConfig
    folder: Path
    storage_url: str | None = None  # None = the journal file in the folder
    workers: int = 1
    fit_target: str = FIT_TARGET

    @property
    def state_file(self) -> Path:
        return self.folder / "state.json"

    def state(self) -> dict[str, Any]:
        if self.state_file.is_file():
            state = json.loads(self.state_file.read_text())
            first = str(study_seeds(self.cfg)[0])  # a folder from before seeds: its runs are the first seed's
            state.setdefault("seed_runs", {m: {first: r} for m, r in state.get("final_runs", {}).items()})
            state.setdefault(
                "seed_history", {m: {first: h} for m, h in state.get("final_history", {}).items()}
            )
            state.setdefault("attacked_runs", [])
            return state
        return {
            "name": self.cfg.name,
            "experiment": self.cfg.experiment,
            "parent_run_id": None,
            "stages": {},
            "best_params": {},
            "final_runs": {},
            "final_history": {},
            "seed_runs": {},
            "seed_history": {},
            "attacked": [],
            "attacked_runs": [],
        }

    def update_state(self, **changes: Any) -> dict[str, Any]:
        state = self.state()
        state.update(changes)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
        os.replace(tmp, self.state_file)  # atomic: a kill never leaves half a state file
        return state

    def done(self, stage: str) -> bool:
        return bool(self.state()["stages"].get(stage, {}).get("done"))

    def log(self, message: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
        tqdm.write(f"[{self.cfg.name}] {message}")
        with open(self.folder / "study.log", "a") as f:
            f.write(f"{stamp} {message}\n")

    def fit_function(self) -> Callable:
        """The function ``fit_target`` names (harness.train.fit's signature)."""
        module, _, attr = self.fit_target.partition(":")
        return getattr(importlib.import_module(module), attr)

    def optuna_name(self, model: str) -> str:
        """The Optuna study of ``model``'s trials (shared by every machine of the study)."""
        return f"{self.cfg.name}.{model}"

    def run_tags(self, model: str, *, kind: str, role: str) -> dict[str, str]:
        """The MLflow tags every run of ``model`` in this study carries (trials and final runs)."""
        return {
            "capsbench.kind": kind,
            "capsbench.role": role,
            "capsbench.study": self.cfg.name,
            "capsbench.model": model,
            "capsbench.family": model_family(model),
        }


def saved_config(folder: Path) -> StudyConfig:
    """The resolved study file a study folder was started with."""
    return study_from_dict(load_toml(folder / "study.toml"))


def open_study(
    cfg: StudyConfig,
    root: Path,
    *,
    storage: str | None,
    workers: int,
    fresh: bool,
    fit_target: str = FIT_TARGET,
) -> Study:
    """Create or reopen the study folder; a rerun must not change settings that finished work used."""
    folder = Path(root) / cfg.name
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "study.toml").is_file():
        old = fingerprint(saved_config(folder))
        new = fingerprint(cfg)
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            k = changed[0]
            raise StudyError(
                f"study {cfg.name!r} in {folder} was started with {k}={old.get(k)!r}, now {new.get(k)!r} "
                f"({len(changed)} setting(s) differ); rerun with the original settings, "
                "or pass --fresh to start over"
            )
    (folder / "study.toml").write_text(study_toml(cfg))
    return Study(cfg, folder, storage_url=storage, workers=workers, fit_target=fit_target)


# ---------------------------------------------------------------------------------------------
# one runner per study folder
# ---------------------------------------------------------------------------------------------


def lock_file(root: Path, name: str) -> Path:
    """Beside the folder, not in it, so that --fresh can delete the folder."""
    return Path(root) / f".{name}.lock"


@contextmanager
def single_runner(root: Path, name: str) -> Iterator[None]:
    """One `python -m harness.study NAME` per study folder at a time (its workers are its children)."""
    lock = lock_file(root, name)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyError(
                f"study {name} is already running on this machine ({lock}); wait for it, "
                "or add workers from another machine with --storage"
            ) from None
        yield


def runner_active(root: Path, name: str) -> bool:
    """Whether a `python -m harness.study NAME` process holds the study's lock (see single_runner)."""
    lock = lock_file(root, name)
    if not lock.is_file():
        return False
    with open(lock) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False
