"""Where a study's Optuna trials live, and how workers on many machines share them safely.

- ``check_storage(url)``: the URL's database driver is installed and the database answers; else a one-line
  StorageError naming the fix (``pip install -e '.[scale]'``), raised before a study creates anything.
- ``rdb_storage(url, ...)``: Optuna's RDBStorage (workers turn its heartbeat on); on PostgreSQL it is
  created under an advisory lock, so machines that start together on a fresh database do not race creating
  Optuna's tables.
- ``worker_host()`` / ``worker_id()``: who runs a trial (``host:pid``, stored as the trial's ``worker``
  attr); ``$CAPSBENCH_WORKER_HOST`` overrides the host (tests pose as another machine with it).
- ``dead_trials(ostudy)``: RUNNING trials whose worker is gone: on this host its pid no longer exists; on
  any host its Optuna heartbeat is older than the grace period. ``fail_dead_trials`` fails them (exactly one
  caller wins each trial) and hands each to a callback; ``enqueue_retry`` queues its parameters again.
"""

from __future__ import annotations

import os
import socket
import warnings
import zlib
from collections.abc import Callable
from contextlib import contextmanager

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.errors import CapsbenchError

MAX_RETRIES = 2  # a dead worker's trial is retried at most this often (its parameters may be what kills it)
SETUP_HINT = "install it with `pip install -e '.[scale]'` (or `make setup-scale`)"


class StorageError(CapsbenchError, RuntimeError):
    """An Optuna storage that cannot be used; the message names the fix."""

    exit_code = 1


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    import sqlalchemy

    try:
        return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        return url


def check_storage(url: str) -> None:
    """Raise StorageError unless ``url`` parses, its driver imports and its database accepts a connection."""
    import sqlalchemy

    _check_driver(url, "--storage")
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.SQLAlchemyError as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise StorageError(
            f"cannot open the Optuna database {redact(url)} ({reason}); check the host, port, user, "
            "password and that the database exists (createdb)"
        ) from None
    finally:
        engine.dispose()


def check_tracking_uri(uri: str) -> None:
    """An MLflow store given as a database URL (not http(s)://, not sqlite) needs its driver too."""
    scheme = uri.partition("://")[0]
    if (
        "://" in uri
        and scheme not in ("http", "https", "file", "databricks")
        and not scheme.startswith("sqlite")
    ):
        _check_driver(uri, "MLFLOW_TRACKING_URI")


def _check_driver(url: str, where: str) -> None:
    import sqlalchemy

    try:
        parsed = sqlalchemy.engine.make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise StorageError(
            f"{where} {url!r} is not a database URL; use e.g. postgresql+psycopg://user:pw@host/db"
        ) from None
    try:
        parsed.get_dialect().import_dbapi()
    except sqlalchemy.exc.NoSuchModuleError:
        raise StorageError(
            f"{where} {redact(url)}: SQLAlchemy knows no database {parsed.drivername!r}; "
            "use e.g. postgresql+psycopg://user:pw@host/db"
        ) from None
    except ImportError as e:
        fix = SETUP_HINT if parsed.get_backend_name() == "postgresql" else "install that driver"
        raise StorageError(
            f"{where} {redact(url)} needs a database driver that is missing ({e}); {fix}"
        ) from None


@contextmanager
def _schema_lock(url: str):
    """Hold a PostgreSQL advisory lock while Optuna creates (or checks) its tables; a no-op elsewhere."""
    import sqlalchemy

    if sqlalchemy.engine.make_url(url).get_backend_name() != "postgresql":
        yield
        return
    key = zlib.crc32(b"capsbench optuna schema")
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


def rdb_storage(
    url: str,
    *,
    heartbeat_interval: int | None = None,
    grace_period: int | None = None,
    on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None,
) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage; with a heartbeat, ``on_stale(study, trial)`` runs once for each trial it fails.

    Workers pass all three; a reader (``--status``, tests) may pass none.
    """
    with warnings.catch_warnings(), _schema_lock(url):
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=on_stale,
        )


def journal_storage(path: str) -> optuna.storages.JournalStorage:
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(path))


# ---------------------------------------------------------------------------------------------
# workers and dead trials
# ---------------------------------------------------------------------------------------------


def worker_host() -> str:
    return os.environ.get("CAPSBENCH_WORKER_HOST") or socket.gethostname()


def worker_id() -> str:
    return f"{worker_host()}:{os.getpid()}"


def process_gone(worker: str) -> bool | None:
    """For ``host:pid`` on this host: whether that process is gone (never this one); None on another host."""
    import psutil

    host, _, pid = worker.rpartition(":")
    if host != worker_host() or not pid.isdigit():
        return None
    return int(pid) != os.getpid() and not psutil.pid_exists(int(pid))


def _heartbeat_stale_ids(ostudy: optuna.Study) -> set[int]:
    """Storage ids of trials whose heartbeat is older than the storage's grace period (RDB only)."""
    storage = ostudy._storage  # Optuna's own fail_stale_trials reads the same private fields
    if not getattr(storage, "get_heartbeat_interval", lambda: None)():
        return set()  # a journal file: no heartbeat
    return set(storage._get_stale_trial_ids(ostudy._study_id))


def running_trials(ostudy: optuna.Study) -> list[FrozenTrial]:
    return ostudy.get_trials(deepcopy=False, states=(TrialState.RUNNING,))


def dead_trials(ostudy: optuna.Study) -> list[FrozenTrial]:
    """RUNNING trials whose worker is gone (see the module docstring); the others are alive."""
    stale = _heartbeat_stale_ids(ostudy)
    return [
        t
        for t in running_trials(ostudy)
        if t._trial_id in stale or process_gone(str(t.user_attrs.get("worker", "")))
    ]


def fail_dead_trials(
    ostudy: optuna.Study, on_failed: Callable[[optuna.Study, FrozenTrial], None]
) -> list[int]:
    """Fail every dead trial (see ``dead_trials``); ``on_failed`` runs for each one this call failed.

    Several workers may check at once: Optuna lets exactly one of them move a trial from RUNNING to FAIL,
    and only that one calls ``on_failed``.
    """
    failed = []
    for trial in dead_trials(ostudy):
        try:
            ostudy.tell(trial.number, state=TrialState.FAIL)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # another worker failed it (or it finished) meanwhile
        failed.append(trial.number)
        on_failed(ostudy, ostudy.get_trials(deepcopy=False)[trial.number])
    return failed


def enqueue_retry(ostudy: optuna.Study, trial: FrozenTrial) -> bool:
    """Queue ``trial``'s parameters as a WAITING trial (user attrs ``retry_of``, ``retries``); False when
    it has no parameters or was retried MAX_RETRIES times already."""
    retries = int(trial.user_attrs.get("retries", 0)) + 1
    if not trial.params or retries > MAX_RETRIES:
        return False
    origin = trial.user_attrs.get("retry_of", trial.number)
    ostudy.enqueue_trial(trial.params, user_attrs={"retry_of": origin, "retries": retries})
    return True
