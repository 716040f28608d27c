"""Whether the configured tracking store can be used, asked before a command works on it: the
up-front check every command makes, and a client for the commands that only read (compare, predict).
Nothing here creates or changes a store."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipelines.errors import StoreError, UserError, check_writable_dir
from pipelines.tracking import SQLITE_HEADER, tracking_uri, without_password


def check_store(*, write: bool = True, probe_seconds: float = 10.0) -> str:
    """The configured tracking store is usable (and writable, with `write`): else a StoreError naming
    it and what is wrong. Nothing is created or modified. Returns the store's URI."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if path.is_dir():
            raise StoreError(f"tracking store {path}: is a folder, not an SQLite file")
        if path.exists():
            try:
                with open(path, "rb") as f:
                    header = f.read(len(SQLITE_HEADER))
            except OSError as e:
                raise StoreError(f"tracking store {path}: cannot be read ({e.strerror})") from None
            if header and header != SQLITE_HEADER:
                raise StoreError(f"tracking store {path}: is not an SQLite database; move it away, or set "
                                 "MLFLOW_TRACKING_URI to another store")
            if write and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)):
                raise StoreError(f"tracking store {path}: is read-only (SQLite writes the file and a journal "
                                 "beside it); make both writable, or set MLFLOW_TRACKING_URI to another store")
        elif write:
            try:
                check_writable_dir(path.parent, "tracking store folder")
            except UserError as e:
                raise StoreError(str(e)) from None
        return uri
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.parse
        import urllib.request

        # MLflow's REST API answers this with JSON: the experiment, or an error code if there is no
        # 'Default'. Another web server (a wrong port) answers with a page; one that asks for
        # credentials (401/403) is left to MLflow's client, which sends the user's.
        probe = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
        try:
            with urllib.request.urlopen(probe, timeout=probe_seconds) as answer:
                status, body = answer.status, answer.read(65536)
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read(65536)
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise StoreError(f"tracking server {uri}: does not answer ({reason}); start it, or set "
                             "MLFLOW_TRACKING_URI to a reachable store") from None
        if status == 403 and b"Invalid Host header" in body:  # MLflow >= 3.5 answers only names it was given
            host = urllib.parse.urlsplit(uri).netloc
            raise StoreError(f"tracking server {uri}: refuses '{host}' as its host name (HTTP 403, Invalid Host "
                             f"header); start `mlflow server` with --allowed-hosts {host} (besides localhost and "
                             "private IPs, it accepts only the names it is given)") from None
        if status not in (401, 403) and not _is_mlflow_answer(body):
            raise StoreError(f"tracking server {uri}: answers, but not as an MLflow server (HTTP {status} to "
                             f"{probe.removeprefix(uri.rstrip('/'))}); check the address and port in "
                             "MLFLOW_TRACKING_URI") from None
        return uri
    try:  # a database URI (postgresql://, mysql://): MLflow opens it directly
        MlflowClient(uri).search_experiments(max_results=1)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"tracking store {without_password(uri)}: cannot be used ({first})") from None
    return uri


def read_client() -> MlflowClient:
    """A client on the configured store, for commands that only read it (compare, predict): a
    StoreError naming the store when there is none yet (nothing is created) or it cannot be read,
    e.g. a server that refuses the user's credentials or a database of another MLflow version."""
    uri = check_store(write=False)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise StoreError(f"no tracking store at {uri.removeprefix('sqlite:///')}; run `python -m pipelines.run "
                         "ablations` first, or set MLFLOW_TRACKING_URI")
    try:
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the store opens (and checks its schema) here
    except (mlflow.exceptions.MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"tracking store {without_password(uri)}: cannot be read ({first})") from None
    return client


def _is_mlflow_answer(body: bytes) -> bool:
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and ("experiment" in answer or "error_code" in answer)


__all__ = ["check_store", "read_client"]
