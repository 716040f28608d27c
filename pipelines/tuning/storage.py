"""Where a study lives, and every contact with Optuna's private API (pinned by tests/pipelines/tuning/test_storage.py).

A journal file (the default, shared safely by local processes) or an RDB URL (postgresql://... for
several machines); both fail the trials of a dead worker after a grace period and re-queue them.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages._heartbeat import BaseHeartbeat  # private: the heartbeat protocol JournalStorage lacks
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from pipelines import claims, tracking
from pipelines.errors import StoreError, UserError, check_writable_dir
from pipelines.status import RunStatus

HEARTBEAT_KEY = "heartbeat"          # trial system attr: time.time() of the last heartbeat (journal storage)


@dataclass(frozen=True)
class StorageSettings:
    heartbeat_interval: int = 60
    grace_period: int = 180
    max_retry: int = 1


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal file storage with Optuna's heartbeat protocol, which its RDBStorage has and (as of
    Optuna 5) its JournalStorage lacks. While a trial runs, Optuna's heartbeat thread stamps it every
    `heartbeat_interval` s; before each new trial, any process on the study fails the RUNNING trials
    that have neither a stamp nor a start within `grace_period` s, or whose worker process ran on this
    machine and has ended (`claims.process_ended`: no wait), then calls the stale-trial callback
    (which re-queues their parameters). The start time counts so that a re-queued trial,
    which inherits its predecessor's old stamp, is not failed before its own thread has stamped it."""

    def __init__(self, backend: JournalFileBackend, settings: StorageSettings,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None) -> None:
        super().__init__(backend)
        self.heartbeat_interval = settings.heartbeat_interval
        self.grace_period = settings.grace_period
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_KEY, time.time())
        except UpdateFinishedTrialError:  # another process judged it dead; its tell will say so
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:  # Optuna's private hook, and private _trial_id
        now = time.time()
        stale = []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = t.datetime_start.timestamp() if t.datetime_start else 0.0
            if (now - max(float(t.system_attrs.get(HEARTBEAT_KEY, 0.0)), started) > self.grace_period
                    or _process_ended(t)):
                stale.append(trial_id(t))
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.stale_trial_callback

    get_failed_trial_callback = get_heartbeat_stale_trial_callback  # the name Optuna < 4.9 asks for


def _process_ended(trial: FrozenTrial) -> bool:
    """The trial's worker process ran on this machine and has ended (see `claims.process_ended`)."""
    return claims.process_ended(trial.user_attrs.get(claims.CLAIM_PROCESS, ""))


class OnDeadTrial:
    """Called on a trial failed for want of heartbeats: mark its MLflow run FAILED (its worker cannot)
    and its session's run KILLED if that is still RUNNING without a live claim (the session died with
    it), then re-queue its parameters with Optuna's retry callback, up to `max_retry` times."""

    def __init__(self, max_retry: int, grace_period: int):
        self.max_retry, self.grace_period = max_retry, grace_period

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id:
            try:
                client = MlflowClient(tracking.tracking_uri())
                run = client.get_run(run_id)
                reason = (f"worker died: its process ({trial.user_attrs.get('worker')}) has ended"
                          if _process_ended(trial)
                          else f"worker died: no heartbeat for over {self.grace_period} s")
                if run.info.status == RunStatus.RUNNING:
                    client.set_tag(run_id, "optuna_state", TrialState.FAIL.name)
                    client.set_tag(run_id, "error", reason)
                    client.set_terminated(run_id, RunStatus.FAILED)
                parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
                session = client.get_run(parent) if parent else None
                # A worker of a live session (tune --workers N) can die alone: its session goes on.
                if (session is not None and session.info.status == RunStatus.RUNNING
                        and not claims.is_live(session)):
                    client.set_tag(parent, "error", f"session died: trial {trial.number}'s {reason}")
                    client.set_terminated(parent, RunStatus.KILLED)
            except Exception as e:  # another tracking store, or none reachable: the study is still right
                print(f"trial {trial.number}: could not mark its MLflow run failed: {e}", file=sys.stderr)
        if self.max_retry:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                retry_cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) \
                    or optuna.storages.RetryFailedTrialCallback  # Optuna < 4.9
                retry_cls(max_retry=self.max_retry)(study, trial)


def default_storage_path() -> Path:
    """The default study storage: a journal file beside the tracking store."""
    return tracking.study_journal()


def storage_label(storage: str | None) -> str:
    if storage is None:
        return str(default_storage_path())
    return tracking.without_password(storage)


def open_storage(storage: str | None, settings: StorageSettings = StorageSettings()) -> BaseStorage:
    """`None`: the default journal file; a URL (postgresql://, mysql://, sqlite:///): an RDB storage;
    anything else: a journal file at that path. Both kinds fail and re-queue trials whose worker died."""
    on_dead = OnDeadTrial(settings.max_retry, settings.grace_period)
    if storage is not None and "://" in storage:
        callback_arg = ("heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
                        else "failed_trial_callback")  # Optuna < 4.9
        with warnings.catch_warnings():  # the heartbeat arguments are marked experimental
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(storage, heartbeat_interval=settings.heartbeat_interval,
                              grace_period=settings.grace_period, **{callback_arg: on_dead})
    path = Path(storage) if storage is not None else default_storage_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:  # the journal is read whole here
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), settings, on_dead)
    except (ValueError, KeyError) as e:  # a line that is not JSON, or not one of Optuna's operations
        raise StoreError(f"study storage {path}: a line in it is not Optuna's ({type(e).__name__}: {e}); mend "
                         "or remove that line, or move the file away") from None


def check_storage(storage: str | None) -> None:
    """The study storage can be opened, before anything is created in it or elsewhere: else a
    StoreError naming it and what is wrong."""
    label = storage_label(storage)
    if storage is not None and storage.startswith("sqlite:///"):
        path = Path(storage.removeprefix("sqlite:///"))
        if path.is_file() and path.stat().st_size and path.read_bytes()[:16] != tracking.SQLITE_HEADER:
            raise StoreError(f"study storage {path}: is not an SQLite database; give another path")
    if storage is not None and "://" in storage:
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(storage)
        except (ImportError, ValueError, sqlalchemy.exc.NoSuchModuleError, sqlalchemy.exc.ArgumentError) as e:
            hint = ' (pip install "psycopg[binary]")' if storage.startswith("postgres") else ""
            raise StoreError(f"study storage {label}: cannot be opened: {type(e).__name__}: {e}{hint}") from None
        try:
            with engine.connect():
                pass
        except sqlalchemy.exc.SQLAlchemyError as e:
            first = str(e.orig if getattr(e, "orig", None) else e).strip().splitlines()[0]
            raise StoreError(f"study storage {label}: cannot connect ({first})") from None
        finally:
            engine.dispose()
        return
    path = Path(storage) if storage is not None else default_storage_path()
    if path.is_dir():
        raise StoreError(f"study storage {path}: is a folder; give a journal file path (or a database URL)")
    if path.exists():
        try:
            with open(path, "rb") as f:
                first = f.readline(1 << 20)
        except OSError as e:
            raise StoreError(f"study storage {path}: cannot be read ({e.strerror})") from None
        if first and not _journal_line(first):
            raise StoreError(f"study storage {path}: is not an Optuna journal file; give another path")
        if not os.access(path, os.W_OK):
            raise StoreError(f"study storage {path}: is read-only")
    else:
        try:
            check_writable_dir(path.parent, "study storage folder")
        except UserError as e:
            raise StoreError(str(e)) from None


def _journal_line(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def trial_id(trial: optuna.Trial | FrozenTrial) -> int:
    """The storage's id of a trial (not its number): Optuna keeps it private."""
    return trial._trial_id
