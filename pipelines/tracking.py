"""MLflow (and TensorBoard) in one place: where the store is, how runs are named, tagged and found.

The default store is `./mlruns/mlflow.db` (SQLite) with artifacts in `./mlruns/artifacts`;
`MLFLOW_TRACKING_URI` is honoured, so a tracking server works unchanged.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import mlflow
from mlflow.data.code_dataset_source import CodeDatasetSource
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag, Metric, Param
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from msa.config import stable_hash
from msa.data import MOSIData
from pipelines.cache import seed_sqlite_store
from pipelines.errors import StoreError
from pipelines.status import RunStatus

MLRUNS = Path("mlruns")


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(MLRUNS / 'mlflow.db').resolve()}"


def local_root() -> Path:
    """The folder beside a local SQLite store where artifacts and TensorBoard logs go."""
    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).parent
    return MLRUNS.resolve()


def study_journal() -> Path:
    """The default Optuna study storage: a journal file beside the tracking store. Asking whether it
    exists needs no Optuna, so `ablations` imports Optuna only when a study may join its suite."""
    return local_root() / "optuna" / "journal.log"


def is_local_store() -> bool:
    """A SQLite file on this machine (the default), as opposed to a tracking server others can reach."""
    return tracking_uri().startswith("sqlite:")


def tensorboard_dir(experiment: str) -> Path:
    """TensorBoard logs of an experiment: `tensorboard --logdir <this>` shows every run."""
    return local_root() / "tensorboard" / experiment


def ui_hint(experiment_id: str | None = None) -> str:
    """How to see an experiment's runs list: the server's page, or the command that serves a local store.
    (MLflow 3's bare address opens a GenAI overview, not the runs.)"""
    page = f"/#/experiments/{experiment_id}/runs" if experiment_id else ""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}{page} in a browser"
    return (f"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {uri} --workers 1  "
            f"(then open http://127.0.0.1:5000{page})")


# A tracking server that does not answer must not hold a command for minutes (MLflow's own default
# retries with backoff for about four): a few quick retries, unless the user chose otherwise.
for _key, _value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                     ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")):
    os.environ.setdefault(_key, _value)
SQLITE_HEADER = b"SQLite format 3\x00"
SCORED_METRICS = ("test_MAE", "test_Corr")  # a run's result: without finite ones it is none to reuse


def without_password(uri: str) -> str:
    """A store's URL as people may see it: user and password dropped."""
    if "://" not in uri:
        return uri
    scheme, rest = uri.split("://", 1)
    return f"{scheme}://{rest.split('@')[-1]}"


@contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise the first use of a local SQLite store across processes: two commands creating its
    schema or the same experiment at once would otherwise race (MLflow migrates on first open)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    try:
        import fcntl
    except ImportError:  # not on POSIX: no lock, as before
        yield
        return
    lock_path = Path(uri.removeprefix("sqlite:///")).with_suffix(".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def setup(experiment: str) -> tuple[MlflowClient, str]:
    """Point MLflow at the store and return a client and the experiment's id (created if new)."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            seed_sqlite_store(uri)
            client = MlflowClient(uri)
            exp = client.get_experiment_by_name(experiment)
            if exp is not None:
                return client, exp.experiment_id
            artifacts = None
            if uri.startswith("sqlite:///"):
                artifacts = (local_root() / "artifacts").resolve().as_uri()
            try:
                return client, client.create_experiment(experiment, artifact_location=artifacts)
            except mlflow.exceptions.MlflowException:  # created meanwhile by a process without the lock
                return client, client.get_experiment_by_name(experiment).experiment_id
    except (mlflow.exceptions.MlflowException, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StoreError(f"tracking store {without_password(uri)}: {first}") from None


def hardware_tags(device: str, threads: int | None) -> dict[str, str]:
    """What a run's numbers depend on beyond its config, data and seed, so that it can be reproduced
    to the last digit: the CPU model or GPU name, and torch's thread count (the default when None),
    which changes reduction order and so the last digits."""
    import torch

    from msa.training import device_name

    return {"device_name": device_name(torch.device(device)),
            "torch_threads": str(threads if threads is not None else torch.get_num_threads())}


@lru_cache(maxsize=1)
def code_version() -> str:
    """The git commit the code ran from (with -dirty for local changes), else the package version."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version
        try:
            return f"msa-{version('msa')}"
        except PackageNotFoundError:
            return "unknown"


def start_run(client: MlflowClient, experiment_id: str, name: str, *, tags: Mapping[str, str],
              params: Mapping[str, Any] | None = None, parent_run_id: str | None = None) -> str:
    """Create a RUNNING run (nested under `parent_run_id` when given) with MLflow's usual context tags
    (user, source, git commit) plus `tags` and `params`; returns its id. Every run of the pipelines
    (suite parents, ablation runs, tuning sessions and trials) starts here."""
    all_tags = {**resolve_tags(), **tags, MLFLOW_RUN_NAME: name}
    if parent_run_id:
        all_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
    run_id = client.create_run(experiment_id, run_name=name, tags=all_tags).info.run_id
    if params:
        try:
            log_params(client, run_id, params)
        except Exception as e:  # never leave a RUNNING run (with a claim, maybe) that nobody will end
            with contextlib.suppress(Exception):
                end_failed(client, run_id, e)
            raise
    return run_id


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    client.log_batch(run_id, params=[Param(k, v) for k, v in flat_params(params).items()])


@dataclass
class RunHandle:
    """The run inside `recorded_run`; set `status` to end it otherwise than FINISHED without raising."""

    run_id: str
    status: RunStatus = RunStatus.FINISHED


@contextmanager
def recorded_run(client: MlflowClient, run_id: str, *, finished_on: tuple[type[BaseException], ...] = ()
                 ) -> Iterator[RunHandle]:
    """The one run lifecycle: the run ends when the block does, FINISHED (or `handle.status`) when it
    completes or raises one of `finished_on` (a pruned trial, say), KILLED on KeyboardInterrupt (Ctrl-C,
    and SIGTERM through the executor's handler), FAILED on any other exception, with the error as a
    tag and its traceback in error.txt. The exception always propagates."""
    handle = RunHandle(run_id)
    try:
        yield handle
    except finished_on:
        client.set_terminated(run_id, RunStatus.FINISHED)
        raise
    except KeyboardInterrupt:
        _quietly(client.set_tag, run_id, "error", "interrupted")
        client.set_terminated(run_id, RunStatus.KILLED)
        raise
    except BaseException as e:
        end_failed(client, run_id, e)
        raise
    else:
        client.set_terminated(run_id, handle.status)


def end_failed(client: MlflowClient, run_id: str, error: BaseException) -> None:
    """End a run FAILED, with the error as a tag and the traceback being handled in error.txt."""
    _quietly(client.set_tag, run_id, "error", f"{type(error).__name__}: {error}"[:5000])
    _quietly(client.log_text, run_id, traceback.format_exc(), "error.txt")
    client.set_terminated(run_id, RunStatus.FAILED)


def _quietly(call, *args) -> None:
    # Recording the error must not replace the error itself (the store may be what failed).
    try:
        call(*args)
    except Exception:
        pass


def log_metrics(client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0, *,
                model_id: str | None = None, data: MOSIData | None = None) -> None:
    """The finite ones of `metrics` in one call (NaN, e.g. an undefined Corr, is left out); linked to a
    logged model and to the data set (name and digest) when given, as the Models view shows them."""
    now = int(time.time() * 1000)
    linked = {"model_id": model_id}
    if data is not None:
        linked |= {"dataset_name": dataset_name(data), "dataset_digest": data.digest}
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step, **linked)
                                      for k, v in metrics.items() if math.isfinite(v)])


class EpochLogger:
    """The one per-epoch logging path, for ablation runs and tuning trials alike: each epoch's finite
    metrics go to MLflow in one batch, and to TensorBoard (train/validation loss, the selection
    metric) when a folder is given. Call it as the trainer's callback body: `logger(step, metrics)`."""

    def __init__(self, client: MlflowClient, run_id: str, *, tensorboard_dir: Path | None = None,
                 select_key: str | None = None):
        self.client, self.run_id, self.select_key = client, run_id, select_key
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(tensorboard_dir))

    def __call__(self, step: int, metrics: Mapping[str, float]) -> None:
        log_metrics(self.client, self.run_id, {k: v for k, v in metrics.items() if k != "epoch"}, step)
        if self.tb is not None:
            self.tb.add_scalars("loss", {"train": metrics["train_loss"], "valid": metrics["val_loss"]}, step)
            if self.select_key is not None:
                self.tb.add_scalar(f"valid/{self.select_key.removeprefix('val_')}", metrics[self.select_key], step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def run_key(config: dict[str, Any], data_digest: str, seed: int) -> str:
    """A run's identity: (resolved config, data digest, seed). A FINISHED run with it is never redone."""
    return stable_hash({"config": config, "data": data_digest, "seed": seed})


def run_name(ablation: str, seed: int) -> str:
    return f"{ablation}/seed-{seed}"


def reusable(run: Any) -> bool:
    """A FINISHED run that is a result to reuse for its run key: not one whose test scores came out
    NaN (it trained to NaN, recorded FINISHED before such runs were failed), nor a bf16 run that
    trained in fp32 (bf16 falls back where it is not native; its `precision_used` tag says so)."""
    used = run.data.tags.get("precision_used")
    return (run.info.status == RunStatus.FINISHED
            and (used is None or used == run.data.params.get("train.precision", "fp32"))
            and all(math.isfinite(run.data.metrics[k]) for k in SCORED_METRICS if k in run.data.metrics))


def finished_runs(client: MlflowClient, experiment_id: str, keys: Iterable[str]) -> dict[str, Any]:
    """run_key -> the newest FINISHED run carrying it that holds its test scores and is `reusable`.
    (MLflow's filter has no IN for tags, so the experiment's FINISHED runs are listed page by page and
    matched here.)"""
    wanted = set(keys)
    found: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=f"attributes.status = '{RunStatus.FINISHED}'",
                                  order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        for r in page:
            key = r.data.tags.get("run_key")
            if key in wanted and reusable(r) and all(k in r.data.metrics for k in SCORED_METRICS):
                found.setdefault(key, r)
        token = page.token
        if not token:
            return found


def log_dataset(client: MlflowClient, run_id: str, data: MOSIData) -> None:
    """Link the data set to a run as an MLflow dataset input: name, source, digest, cleaning counts.

    The suite links it to its parent run first, so that parallel workers find the experiment's
    dataset row already there: two first inserts at once break SQLite's unique constraint."""
    if data.synthetic:
        source = CodeDatasetSource(tags={"generator": "msa.synthetic", "description": data.source})
    else:
        with warnings.catch_warnings():  # MLflow registers two equivalent local-file sources
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(Path(data.source).resolve()))
    dataset = MetaDataset(source=source, name=dataset_name(data), digest=data.digest)
    tags = {"mlflow.data.context": "train/valid/test", "synthetic": str(data.synthetic).lower(),
            "layout": data.layout, "sizes": "/".join(str(v) for v in data.sizes.values()),
            **{f"cleaned.{split}.{m}": str(n) for split, c in data.cleaned.items() for m, n in c.items()}}
    inputs = [DatasetInput(dataset._to_mlflow_entity(), [InputTag(k, v) for k, v in tags.items()])]
    try:
        client.log_inputs(run_id, datasets=inputs)
    except mlflow.exceptions.MlflowException as e:
        # Two first links of one dataset at once: the loser finds the winner's row on a second try.
        if "UNIQUE constraint" not in str(e) and "unique constraint" not in str(e).lower():
            raise
        client.log_inputs(run_id, datasets=inputs)


def dataset_name(data: MOSIData) -> str:
    """The data set's name in MLflow: `synthetic-mosi`, or the file's name."""
    return "synthetic-mosi" if data.synthetic else Path(data.source).name


def model_name(ablation: str, seed: int) -> str:
    """A logged model's name: what it is, as the experiment's Models view lists it."""
    return f"{ablation}-seed-{seed}"


def flat_params(d: dict[str, Any]) -> dict[str, str]:
    """Params as MLflow stores them: strings, lists written like YAML flow lists."""
    return {k: "[" + ", ".join(map(str, v)) + "]" if isinstance(v, (list, tuple)) else str(v) for k, v in d.items()}
