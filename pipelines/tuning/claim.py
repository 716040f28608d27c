"""The lock that makes "count the study's trials, then start one" a single step across workers.

Without it two workers that finish at the same moment can both see `target - 1` trials and both
start one, so the study overshoots `--trials` (seen on two Dask workers sharing PostgreSQL). A worker
takes the lock, counts, and starts its trial (Optuna creates it RUNNING, so every other worker's
count includes it); the trial's first act is to let the lock go. No one holds it while training.

The lock lives where the study does, so it covers every process that can reach the study:
- PostgreSQL: a session-level advisory lock keyed by the study name; MySQL: GET_LOCK of that name;
- a journal file or an SQLite file: an exclusive `flock` (on the journal itself; for SQLite on a
  `<db>.claim` file beside it, so SQLite's own byte-range locks are never in its way);
- an in-memory SQLite database (one process by nature): a lock inside this process.
"""

from __future__ import annotations

import fcntl
import hashlib
import threading
from pathlib import Path
from types import TracebackType

from pipelines.errors import StoreError
from pipelines.tuning.storage import default_storage_path, storage_label

_LOCAL: dict[str, threading.Lock] = {}


class TrialClaim:
    """A re-usable exclusive lock; `release()` may be called early, inside the `with` block."""

    def __init__(self, storage: str | None, study: str):
        self._storage, self._study = storage, study
        self._held = False
        self._file = None                     # the locked file (journal, SQLite)
        self._engine = self._conn = None      # the database connection holding the lock (PostgreSQL, MySQL)
        self._lock: str | None = None         # the statements that take and let go the database lock
        self._unlock: str | None = None
        self._key: int | str | None = None    # the database lock's key: from the study's name
        self._local: threading.Lock | None = None

    def __enter__(self) -> TrialClaim:
        url = self._storage or ""
        if url.startswith(("postgresql", "postgres://", "mysql")):
            self._db_lock(url)
        elif "://" in url:
            path = url.split(":///", 1)[1].split("?", 1)[0] if ":///" in url else ""
            if path and path != ":memory:":
                self._flock(Path(path).with_name(Path(path).name + ".claim"))
            else:
                self._local = _LOCAL.setdefault(url, threading.Lock())
                self._local.acquire()
        else:
            self._flock(Path(url) if url else default_storage_path())
        self._held = True
        return self

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        elif self._conn is not None:
            import sqlalchemy

            self._conn.execute(sqlalchemy.text(self._unlock), {"k": self._key})
        elif self._local is not None:
            self._local.release()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def close(self) -> None:
        """Let the lock go and close its database connection (kept open between trials otherwise)."""
        self.release()
        if self._conn is not None:
            self._conn.close()
            self._engine.dispose()
            self._conn = None

    def _flock(self, path: Path) -> None:
        self._file = open(path, "a+b")  # held open until release
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def _db_lock(self, url: str) -> None:
        import sqlalchemy

        if self._conn is None:  # once per worker: the connection, the key and the statements
            self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            digest = hashlib.sha256(f"msa-tune:{self._study}".encode()).digest()
            if url.startswith("postgres"):  # a signed 64-bit key
                self._key, self._lock, self._unlock = (int.from_bytes(digest[:8], "big", signed=True),
                                                       "SELECT pg_advisory_lock(:k)", "SELECT pg_advisory_unlock(:k)")
            else:  # MySQL: a name of at most 64 characters; wait up to a year (MariaDB refuses -1, "forever")
                self._key, self._lock, self._unlock = (f"msa-tune:{digest.hex()[:32]}",
                                                       "SELECT GET_LOCK(:k, 31536000)", "SELECT RELEASE_LOCK(:k)")
        lock = self._lock
        got = self._conn.execute(sqlalchemy.text(lock), {"k": self._key}).scalar()
        if "GET_LOCK" in lock and got != 1:  # pg_advisory_lock waits or fails; GET_LOCK says 1 once held
            raise StoreError(f"study storage {storage_label(self._storage)}: its trial lock {self._key!r} could not "
                             f"be taken ({lock} gave {got!r})")


__all__ = ["TrialClaim"]
