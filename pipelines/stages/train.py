"""Stage 2, train (then 3, evaluate): one (ablation, seed) run, recorded in MLflow as it happens.

This is the worker's whole job, so it runs the same in the main process, in a local worker
process, or on another machine pointed at a shared tracking server: everything it needs is in
the `RunTask` and the data; everything it makes goes to the tracking store.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from matplotlib.figure import Figure
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

from msa.config import RunConfig
from msa.data import MOSIData
from msa.models import tracing_mode
from msa.training import fit
from pipelines import claims, tracking
from pipelines.executor import interrupt_point
from pipelines.stages.evaluate import evaluate
from pipelines.stages.prepare import prepare
from pipelines.status import RunStatus

# The pickle format's one-line safety warning would repeat for every run; `predict` loads them.
logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
logging.getLogger("mlflow.utils.requirements_utils").setLevel(logging.ERROR)

Progress = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class RunTask:
    """Everything a worker needs to do one run, picklable."""

    ablation: str
    seed: int
    config: RunConfig
    run_key: str
    experiment_id: str
    parent_run_id: str | None
    tensorboard_dir: str                 # "" for a tracking server: the events travel as artifacts only
    extra_tags: tuple[tuple[str, str], ...] = ()
    data_digest: str = ""                # the suite's data; a worker that loaded other data fails the run
    device: str = "cpu"                  # cpu, cuda or cuda:N


@dataclass
class RunOutcome:
    ablation: str
    seed: int
    status: RunStatus                    # FINISHED | FAILED | KILLED; CACHED or RUNNING: done or claimed elsewhere
    run_id: str | None
    seconds: float
    test_metrics: dict[str, float] | None = None
    best_epoch: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker does before its runs: reach the same tracking store, and load the data as the
    main process did (once per worker: a long-lived cluster worker keeps the last few data sets)."""

    source: str
    quick: bool
    tracking_uri: str
    digest: str = ""  # the suite's data digest: what the worker loads must have it

    def __call__(self) -> MOSIData:
        os.environ["MLFLOW_TRACKING_URI"] = self.tracking_uri
        key = (self.source, self.quick, self.digest)
        if key not in _LOADED:
            data = prepare(self.source, quick=self.quick)
            if self.digest and data.digest != self.digest:
                return data  # not kept: the file may be fixed by the next run; execute says what is wrong
            _LOADED[key] = data
            while len(_LOADED) > 2:
                _LOADED.pop(next(iter(_LOADED)))
        return _LOADED[key]


_LOADED: dict[tuple[str, bool, str], MOSIData] = {}


def execute(task: RunTask, data: MOSIData, threads: int | None = None, progress: Progress | None = None
            ) -> RunOutcome:
    """Claim the run, train, select on validation, test once, record everything; never raises for a
    failed run (only an interrupt propagates, with the run recorded KILLED). A run FINISHED or claimed
    elsewhere meanwhile is not trained: its outcome is CACHED or RUNNING, saying where."""
    start = time.monotonic()
    if task.data_digest and data.digest != task.data_digest:
        return RunOutcome(task.ablation, task.seed, RunStatus.FAILED, None, time.monotonic() - start,
                          error=f"DataError: worker {socket.gethostname()} loaded '{data.source}' with digest "
                                f"{data.digest}, the suite's data has digest {task.data_digest}: every machine "
                                "must see the same data file (same path, same content)")
    client = MlflowClient(tracking.tracking_uri())
    run_id = None
    try:
        taken = claims.find_taken(client, task.experiment_id, task.run_key)
        tags = {
            "ablation": task.ablation, "seed": str(task.seed), "run_key": task.run_key,
            "config_hash": task.config.config_hash(), "data_digest": data.digest,
            "synthetic": str(data.synthetic).lower(), "code_version": tracking.code_version(),
            "data_source": data.source, "device": task.device, **tracking.hardware_tags(task.device, threads),
            **dict(task.extra_tags), **claims.claim_tags(),
        }
        params = {**task.config.flat(), "seed": task.seed, **{f"data.dim.{m}": d for m, d in data.dims.items()}}
        if taken is None:
            run_id = tracking.start_run(client, task.experiment_id, tracking.run_name(task.ablation, task.seed),
                                        tags=tags, params=params, parent_run_id=task.parent_run_id)
            taken = claims.settle(client, task.experiment_id, task.run_key, run_id)
    except Exception as e:  # the store or the device failed before training: this run fails, not the suite
        if run_id is not None:  # started, then its claim could not be settled
            with contextlib.suppress(Exception):
                tracking.end_failed(client, run_id, e)
        return RunOutcome(task.ablation, task.seed, RunStatus.FAILED, run_id, time.monotonic() - start,
                          error=f"{type(e).__name__}: {e}")
    if taken is not None:
        return _done_elsewhere(task, taken, time.monotonic() - start)
    try:
        with claims.Heartbeat(client, run_id, experiment_id=task.experiment_id, run_key=task.run_key) as beat, \
                tracking.recorded_run(client, run_id):
            outcome = _train_and_evaluate(client, run_id, task, data, threads, progress, params, beat.check)
    except claims.ClaimLost as e:  # recorded KILLED; whoever holds the key now finishes it
        client.set_tag(run_id, "error", str(e))
        return RunOutcome(task.ablation, task.seed, RunStatus.RUNNING, run_id, time.monotonic() - start, error=str(e))
    except Exception as e:  # one failing run must not stop the suite; recorded_run has recorded the error
        return RunOutcome(task.ablation, task.seed, RunStatus.FAILED, run_id, time.monotonic() - start,
                          error=f"{type(e).__name__}: {e}")
    outcome.seconds = time.monotonic() - start
    return outcome


def _done_elsewhere(task: RunTask, taken: claims.Taken, seconds: float) -> RunOutcome:
    run = taken.run
    if taken.finished:
        return RunOutcome(task.ablation, task.seed, RunStatus.CACHED, run.info.run_id, seconds,
                          test_metrics={k.removeprefix("test_"): v for k, v in run.data.metrics.items()
                                        if k.startswith("test_")}, error=taken.describe())
    return RunOutcome(task.ablation, task.seed, RunStatus.RUNNING, run.info.run_id, seconds, error=taken.describe())


def _train_and_evaluate(client: MlflowClient, run_id: str, task: RunTask, data: MOSIData, threads: int | None,
                        progress: Progress | None, params: dict[str, Any], check_claim: Callable[[], None]
                        ) -> RunOutcome:
    # A tracking server: the event files are written to a scratch folder and travel as artifacts.
    tb_root = task.tensorboard_dir or tempfile.mkdtemp(prefix="msa-tensorboard-")
    try:
        return _train_evaluate_log(client, run_id, task, data, threads, progress, params, check_claim, Path(tb_root))
    finally:
        if not task.tensorboard_dir:
            shutil.rmtree(tb_root, ignore_errors=True)


def _train_evaluate_log(client: MlflowClient, run_id: str, task: RunTask, data: MOSIData, threads: int | None,
                        progress: Progress | None, params: dict[str, Any], check_claim: Callable[[], None],
                        tb_root: Path) -> RunOutcome:
    cfg = task.config
    tracking.log_dataset(client, run_id, data)
    # One folder per MLflow run: a retried or re-configured run never mixes its curves with another's.
    tb_dir = tb_root / task.ablation / f"seed-{task.seed}" / run_id[:8]
    log_epoch = tracking.EpochLogger(client, run_id, tensorboard_dir=tb_dir, select_key=cfg.train.select_key)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        interrupt_point()
        check_claim()
        log_epoch(epoch, metrics)
        if progress:
            progress({"event": "epoch", "ablation": task.ablation, "seed": task.seed, "epoch": epoch,
                      "epochs": cfg.train.epochs, "val_Corr": metrics.get("val_Corr"),
                      "seconds": metrics.get("epoch_seconds")})

    try:
        with warnings.catch_warnings():
            # The command said it once; each run records it as precision_used.
            warnings.filterwarnings("ignore", message="bf16 was asked for", category=RuntimeWarning)
            # A diverged model's constant predictions: `non_finite` below fails the run saying so.
            warnings.filterwarnings("ignore", message="Corr is undefined", category=RuntimeWarning)
            result = fit(cfg, data, seed=task.seed, callback=on_epoch, threads=threads, evaluate_test=False,
                         device=task.device)
            model = result.model.cpu().eval()
            test_metrics, predictions = evaluate(model, data["test"], cfg.train.eval_batch_size)
        problem = non_finite(result, test_metrics, cfg.train.select_key)
        if problem:  # FAILED with the reason: never counted as trained, reused as cached, nor compared
            raise NonFiniteRun(problem)
        tracking.log_metrics(client, run_id, {"best_epoch": result.best_epoch, "n_params": result.n_params})
        client.set_tag(run_id, "stopped_early", str(result.stopped_early).lower())
        client.set_tag(run_id, "precision_used", result.precision)  # bf16 falls back to fp32 where not native
        _add_graph(client, run_id, log_epoch.tb, model, data)
    finally:
        log_epoch.close()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        predictions.to_csv(tmp / "test_predictions.csv", index=False)
        _plot_curves(result.history, tmp / "loss_curve.png", tracking.run_name(task.ablation, task.seed))
        client.log_artifacts(run_id, str(tmp))
    client.log_artifacts(run_id, str(tb_dir), "tensorboard")
    model_id = _log_model(run_id, task, model, data, params)
    # After the model: log_model copies the run's step-0 metrics onto it, without their data set.
    tracking.log_metrics(client, run_id, {f"test_{k}": v for k, v in test_metrics.items()}, model_id=model_id,
                         data=data)
    check_claim()
    return RunOutcome(task.ablation, task.seed, RunStatus.FINISHED, run_id, 0.0,
                      test_metrics=test_metrics, best_epoch=result.best_epoch)


class NonFiniteRun(RuntimeError):
    """The run trained, but what it selected or scored is not a number."""


def non_finite(result, test_metrics: dict[str, float], select_key: str) -> str | None:
    """Why a run's result is no result (its selected epoch's losses or selection metric, or its test
    MAE or Corr, are not finite), or None when it is one."""
    best = result.history[result.best_epoch - 1]
    for key in dict.fromkeys(("train_loss", "val_loss", select_key)):
        if not math.isfinite(best.get(key, math.nan)):
            first = next((h["epoch"] for h in result.history if not math.isfinite(h.get(key, math.nan))), None)
            return (f"{key} is {best.get(key)} at the selected epoch {result.best_epoch} (not finite from epoch "
                    f"{first}: the model diverged or its predictions are constant)")
    for m in ("MAE", "Corr"):
        if not math.isfinite(test_metrics.get(m, math.nan)):
            return f"test {m} is {test_metrics.get(m)} (NaN predictions, or constant ones)"
    return None


def _log_model(run_id: str, task: RunTask, model: torch.nn.Module, data: MOSIData,
               params: dict[str, Any]) -> str:
    """Log the selected model as `<ablation>-seed-<n>` (`runs:/<run id>/<that name>`); returns its model id."""
    # Pickle format, not MLflow's default pt2: torch.export specialises the LSTM on the example's
    # sequence length (and cannot export the padding mask), so a pt2 model rejects other lengths.
    # Loading needs pickles allowed (MLflow's default; `predict` allows them unless the user said no) and the
    # msa package (in code/). The requirements pin what the model was trained with.
    dims = data.dims
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, dims[m]), name=m) for m in model.modalities]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,), name="sentiment")]))
    msa_dir = Path(__import__("msa").__file__).parent
    # Created first, in the run's experiment: left to itself, log_model would file a model of a run
    # that is not the active one under the default experiment, where `runs:/<id>/model` cannot find it.
    name = tracking.model_name(task.ablation, task.seed)
    logged = mlflow.initialize_logged_model(name=name, source_run_id=run_id, experiment_id=task.experiment_id,
                                            params=tracking.flat_params(params),
                                            tags={"ablation": task.ablation, "seed": str(task.seed),
                                                  "data_digest": data.digest,
                                                  "synthetic": str(data.synthetic).lower()})
    mlflow.pytorch.log_model(model, name=name, run_id=run_id, model_id=logged.model_id, signature=signature,
                             serialization_format="pickle",
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"],
                             code_paths=[str(msa_dir)])
    return logged.model_id


def _add_graph(client: MlflowClient, run_id: str, tb, model: torch.nn.Module, data: MOSIData) -> None:
    example = tuple(x[:2] for x in data["valid"].inputs(model.modalities))
    try:
        with tracing_mode(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape checks that are constant here
            # Traced here without add_graph's check_trace, which traces and runs the model again to
            # compare the two: 1-5 s of a run on 2 cores, for nothing the graph shows. add_graph keeps
            # a traced module as it is, so the graph is the same one.
            traced = torch.jit.trace(model, example, check_trace=False)
            tb.add_graph(traced, example)
    except Exception as e:  # a graph is a nice-to-have; never lose a finished run over it
        client.set_tag(run_id, "tensorboard_graph_error", f"{type(e).__name__}: {e}"[:500])


def _plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(6, 3.5))
    ax = fig.subplots()
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)

