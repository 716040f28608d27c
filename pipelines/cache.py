"""What is kept between commands only to save time: generated data sets, and an empty MLflow SQLite
store that a new local store starts as a copy of. Deleting the folder loses nothing but that time.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

CACHE_ENV = "MSA_CACHE"


def cache_dir() -> Path:
    """Where the cache lives ($MSA_CACHE, else ~/.cache/msa)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "msa")


def seed_sqlite_store(uri: str) -> bool:
    """Start a local SQLite store that does not exist yet as a copy of an empty one of this MLflow's
    schema; True when it did. MLflow builds a new store by running its 60-odd schema migrations one by
    one (5-7 s on a 2-core machine, paid by every first command on a new store); the copy takes
    milliseconds. Anything in the way (another kind of store, an existing file, an unwritable cache)
    leaves the store to MLflow, as before. Call it under the store's lock."""
    if not uri.startswith("sqlite:///"):
        return False
    path = Path(uri.removeprefix("sqlite:///"))
    if path.exists():
        return False
    try:
        template = _empty_store()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, tmp)
        os.replace(tmp, path)
        return True
    except (OSError, sqlite3.Error):
        return False


def _empty_store() -> Path:
    """An SQLite file migrated to this MLflow's schema and holding no experiment (MLflow creates its
    Default experiment, with this store's artifact folder, when the copy is first opened). Made once
    per MLflow version and kept in the cache."""
    import mlflow
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    template = cache_dir() / f"mlflow-{mlflow.__version__}-empty-store.db"
    if template.exists():
        return template
    template.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("mlflow.store.db.utils")  # "Creating initial MLflow database tables..." mid-output
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(dir=template.parent) as tmp:
        db = Path(tmp) / "store.db"
        try:
            store = SqlAlchemyStore(f"sqlite:///{db}", Path(tmp).as_uri())
        finally:
            quiet.setLevel(level)
        store.engine.dispose()
        with sqlite3.connect(db) as con:
            con.execute("DELETE FROM experiment_tags")
            con.execute("DELETE FROM experiments")
        con.close()
        os.replace(db, template)  # atomic: a concurrent maker's file is as good as this one
    return template
