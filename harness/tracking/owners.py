"""Run owners and run ids: a dead run is seen as dead, a run id may be a unique prefix.

Every run records the process that writes it (host, pid, start time); a RUNNING run whose process is gone
is marked KILLED, and one still owned is not resumed twice.
"""

from __future__ import annotations

import os
import re
import socket
import time

import mlflow

from harness.tracking.queries import find_runs, get_run
from harness.tracking.store import TrackingError, client, existing_run, tracking_uri

OWNER_HOST = "capsbench.owner.host"


OWNER_PID = "capsbench.owner.pid"


OWNER_STARTED = "capsbench.owner.started"  # the owner process's start time (epoch seconds): pids get reused


OWNER_GONE = "capsbench.owner_gone"  # set when a RUNNING run is found without its process


def resolve_run_id(run_id: str) -> str:
    """The full id of the run whose id is ``run_id`` or starts with it (e.g. the 8 characters logs print)."""
    text = run_id.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,32}", text):
        raise TrackingError(f"run id {run_id!r} is not a (prefix of a) 32-character hex MLflow run id")
    c = client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    found = [
        r.info.run_id for r in c.search_runs(experiments, f"attributes.run_id LIKE '{text}%'")
    ]  # hex only
    if len(found) == 1:
        return found[0]
    if not found:
        raise TrackingError(f"run {run_id!r} not found in {tracking_uri()}; check the id in mlflow ui")
    raise TrackingError(
        f"run id {run_id!r} is ambiguous: {len(found)} runs start with it ({', '.join(sorted(found)[:3])}"
        f"{', ...' if len(found) > 3 else ''}); give more characters"
    )


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the one writing a run: host, pid, process start time."""
    import psutil

    started = psutil.Process().create_time()
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid()), OWNER_STARTED: f"{started:.2f}"}


def owner_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process recorded as a run's owner still runs: True, False, or None when this machine
    cannot tell (no owner recorded, or the owner is on another host)."""
    import psutil

    host, pid, started = tags.get(OWNER_HOST), tags.get(OWNER_PID, ""), tags.get(OWNER_STARTED, "")
    if host != socket.gethostname() or not pid.isdigit():
        return None
    try:
        process = psutil.Process(int(pid))
        same = abs(process.create_time() - float(started)) < 1.0  # not a new process with a reused pid
        return same and process.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, ValueError):
        return False


def describe_owner(tags: dict[str, str]) -> str:
    return f"pid {tags.get(OWNER_PID, '?')} on {tags.get(OWNER_HOST, '?')}"


def mark_owner_gone(run_id: str, tags: dict[str, str]) -> None:
    """A RUNNING run whose process is gone: status KILLED, tag ``capsbench.owner_gone`` says when and who."""
    c = client()
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    c.set_tag(run_id, OWNER_GONE, f"{describe_owner(tags)} found gone at {stamp}")
    c.set_terminated(run_id, status="KILLED")


def claim_run(run_id: str, *, force: bool = False) -> str | None:
    """Check before resuming ``run_id``: a RUNNING run whose owner is alive (or cannot be checked from here)
    is refused unless ``force``; one whose owner is gone is marked so. Returns a note when it marked it."""
    run = existing_run(client(), run_id)
    if run.info.status != "RUNNING":
        return None
    tags = run.data.tags
    alive = owner_alive(tags)
    if alive is False:
        mark_owner_gone(run_id, tags)
        return f"run {run_id[:8]} was RUNNING but its process ({describe_owner(tags)}) is gone; marked KILLED"
    if force:
        return None
    if OWNER_PID not in tags:
        owner = "with no recorded owner (it predates owner records): nothing tells whether it is alive"
    else:
        why = "still alive" if alive else "cannot be checked from this machine"
        owner = f"owned by {describe_owner(tags)} ({why})"
    raise TrackingError(
        f"run {run_id[:8]} is RUNNING, {owner}; wait for it to end, "
        "or pass --force if no process is training it"
    )


def mark_dead_study_runs(study: str) -> list[str]:
    """Mark the RUNNING runs of a study whose owner process is gone (see ``mark_owner_gone``); their ids."""
    try:
        runs = find_runs({"capsbench.study": study}, statuses=("RUNNING",))
    except mlflow.exceptions.MlflowException as e:
        raise TrackingError(f"cannot read the runs of study {study!r} from {tracking_uri()} ({e})") from None
    marked = []
    for run in runs:
        if owner_alive(run.tags) is False:
            mark_owner_gone(run.run_id, run.tags)
            marked.append(run.run_id)
    return marked


def end_running_runs(experiment: str, tags: dict[str, str], status: str) -> list[dict[str, str]]:
    """End every RUNNING run of ``experiment`` carrying all ``tags`` with ``status``; -> the tags of each."""
    runs = find_runs(tags, experiment=experiment, statuses=("RUNNING",))
    c = client()
    for run in runs:
        c.set_terminated(run.run_id, status=status)
    return [run.tags for run in runs]


def running_run_tags(run_id: str) -> dict[str, str] | None:
    """The tags of run ``run_id`` while it is RUNNING; None when it ended or does not exist."""
    try:
        run = get_run(run_id)
    except TrackingError:
        return None
    return run.tags if run.status == "RUNNING" else None
