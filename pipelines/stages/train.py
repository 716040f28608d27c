"""Stage 2, train (then 3, evaluate): one (ablation, seed) run, recorded in MLflow as it happens.

This is the worker's whole job, so it runs the same in the main process, in a local worker
process, or on another machine pointed at a shared tracking server: everything it needs is in
the `RunTask` and the data; everything it makes goes to the tracking store.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # headless: curves are written to files, never shown
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlflow.models import ModelSignature  # noqa: E402
from mlflow.types import Schema, TensorSpec  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from msa.config import RunConfig  # noqa: E402
from msa.data import MOSIData  # noqa: E402
from msa.models import tracing_mode  # noqa: E402
from msa.training import fit  # noqa: E402
from pipelines import tracking  # noqa: E402
from pipelines.stages.evaluate import evaluate  # noqa: E402

# The pickle format's one-line safety warning would repeat for every run; the README says how to load.
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
    tensorboard_dir: str
    extra_tags: tuple[tuple[str, str], ...] = ()


@dataclass
class RunOutcome:
    ablation: str
    seed: int
    status: str                          # FINISHED | FAILED | KILLED
    run_id: str | None
    seconds: float
    test_metrics: dict[str, float] | None = None
    best_epoch: int | None = None
    error: str | None = None


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler so that a terminated run is recorded as KILLED, like Ctrl-C."""


def execute(task: RunTask, data: MOSIData, *, threads: int | None = None,
            progress: Progress | None = None) -> RunOutcome:
    """Train, select on validation, test once, record everything; never raises for a failed run."""
    start = time.monotonic()
    name = tracking.run_name(task.ablation, task.seed)
    tags = {
        "ablation": task.ablation, "seed": str(task.seed), "run_key": task.run_key,
        "config_hash": task.config.config_hash(), "data_digest": data.digest,
        "synthetic": str(data.synthetic).lower(), "code_version": tracking.code_version(),
        "data_source": data.source, **dict(task.extra_tags),
    }
    run = mlflow.start_run(experiment_id=task.experiment_id, run_name=name, tags=tags,
                           parent_run_id=task.parent_run_id)
    run_id = run.info.run_id
    try:
        # One folder per MLflow run: a retried or re-configured run never mixes its curves with another's.
        tb_dir = Path(task.tensorboard_dir) / task.ablation / f"seed-{task.seed}" / run_id[:8]
        outcome = _train_and_evaluate(task, data, threads, progress, start, tb_dir)
        outcome.run_id = run_id
        mlflow.end_run(tracking.FINISHED)
        return outcome
    except KeyboardInterrupt:
        mlflow.set_tag("error", "interrupted")
        mlflow.end_run(tracking.KILLED)
        raise
    except Exception as e:  # one failing run must not stop the suite; the error is recorded
        message = f"{type(e).__name__}: {e}"
        mlflow.set_tag("error", message[:5000])
        mlflow.log_text(traceback.format_exc(), "error.txt")
        mlflow.end_run(tracking.FAILED)
        return RunOutcome(task.ablation, task.seed, tracking.FAILED, run_id, time.monotonic() - start, error=message)


def _train_and_evaluate(task: RunTask, data: MOSIData, threads: int | None, progress: Progress | None,
                        start: float, tb_dir: Path) -> RunOutcome:
    cfg = task.config
    mlflow.log_params(tracking.flat_params({**cfg.flat(), "seed": task.seed,
                                            **{f"data.dim.{m}": d for m, d in data.dims.items()}}))
    tracking.log_dataset(mlflow.tracking.MlflowClient(), mlflow.active_run().info.run_id, data)
    tb = SummaryWriter(str(tb_dir))

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        logged = {k: v for k, v in metrics.items() if k != "epoch" and np.isfinite(v)}
        mlflow.log_metrics(logged, step=epoch)  # one batch per epoch, not one call per metric
        tb.add_scalars("loss", {"train": metrics["train_loss"], "valid": metrics["val_loss"]}, epoch)
        tb.add_scalar(f"valid/{cfg.train.select_metric}", metrics.get(f"val_{cfg.train.select_metric}", np.nan), epoch)
        if progress:
            progress({"event": "epoch", "ablation": task.ablation, "seed": task.seed, "epoch": epoch,
                      "epochs": cfg.train.epochs, "val_Corr": metrics.get("val_Corr"),
                      "seconds": metrics.get("epoch_seconds")})

    try:
        result = fit(cfg, data, seed=task.seed, callback=on_epoch, threads=threads, evaluate_test=False)
        model = result.model.cpu().eval()
        test_metrics, predictions = evaluate(model, data["test"], cfg.train.eval_batch_size)
        mlflow.log_metrics({f"test_{k}": v for k, v in test_metrics.items() if np.isfinite(v)}
                           | {"best_epoch": result.best_epoch, "n_params": result.n_params})
        mlflow.set_tag("stopped_early", str(result.stopped_early).lower())
        _add_graph(tb, model, data)
    finally:
        tb.close()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        predictions.to_csv(tmp / "test_predictions.csv", index=False)
        _plot_curves(result.history, tmp / "loss_curve.png", tracking.run_name(task.ablation, task.seed))
        mlflow.log_artifacts(str(tmp))
    mlflow.log_artifacts(str(tb_dir), "tensorboard")
    _log_model(model, data)
    return RunOutcome(task.ablation, task.seed, tracking.FINISHED, None, time.monotonic() - start,
                      test_metrics=test_metrics, best_epoch=result.best_epoch)


def _log_model(model: torch.nn.Module, data: MOSIData) -> None:
    # Pickle format, not MLflow's default pt2: torch.export specialises the LSTM on the example's
    # sequence length (and cannot export the padding mask), so a pt2 model rejects other lengths.
    # Loading needs MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true, and the msa package (shipped in code/).
    dims = data.dims
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, dims[m]), name=m) for m in model.modalities]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1,), name="sentiment")]))
    msa_dir = Path(__import__("msa").__file__).parent
    mlflow.pytorch.log_model(model, name="model", signature=signature, serialization_format="pickle",
                             pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                             code_paths=[str(msa_dir)])


def _add_graph(tb: SummaryWriter, model: torch.nn.Module, data: MOSIData) -> None:
    example = tuple(x[:2] for x in data["valid"].inputs(model.modalities))
    try:
        with tracing_mode(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape checks that are constant here
            tb.add_graph(model, example)
    except Exception as e:  # a graph is a nice-to-have; never lose a finished run over it
        mlflow.set_tag("tensorboard_graph_error", f"{type(e).__name__}: {e}"[:500])


def _plot_curves(history: list[dict[str, float]], path: Path, title: str) -> None:
    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss")
    ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

