"""The command line's engine options (`--scheduler`, `--device`, `--gpu-slots`): where runs train,
decided and checked before anything is written."""

from __future__ import annotations

import argparse
import os

from pipelines import devices
from pipelines.arguments import positive_int
from pipelines.executor import SCHEDULER_ENV, Engine, EngineError


def add_engine_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help=f"run on the Dask cluster of this scheduler (default: ${SCHEDULER_ENV}, else on this "
                        "machine); needs a tracking server every worker can reach (MLFLOW_TRACKING_URI)")
    p.add_argument("--device", default="auto", metavar="auto|cpu|cuda|cuda:N",
                   help="what runs train on (default auto: CUDA where there is some, else the CPU)")
    p.add_argument("--gpu-slots", type=positive_int, default=1, metavar="K",
                   help="on this machine's GPU: K runs share it at once, each in a worker process of its own "
                        "(default 1; on a cluster, each GPU worker declares its own: --resources GPU=1)")


def engine_from_args(args: argparse.Namespace, *, optuna_storage: str | None = None,
                     uses_optuna: bool = False) -> Engine:
    """The engine the options ask for; EngineError (one line for the user) when it cannot be had:
    no CUDA for --device cuda, a local store or study file with a scheduler, a scheduler not there."""
    from pipelines import claims, tracking  # MLflow: imported when a command runs, not when it is parsed
    try:
        claims.grace_seconds()
    except ValueError as e:
        raise EngineError(str(e)) from None
    scheduler = args.scheduler or os.environ.get(SCHEDULER_ENV) or None
    try:
        if scheduler is None:
            return Engine(device=devices.resolve_here(args.device), gpu_slots=args.gpu_slots)
        devices.parse(args.device)
    except devices.DeviceError as e:
        raise EngineError(str(e)) from None
    origin = "--scheduler" if args.scheduler else SCHEDULER_ENV
    from distributed.comm import get_address_host_port

    try:
        get_address_host_port(scheduler)
    except ValueError as e:  # distributed's own words: an unknown scheme, no port
        raise EngineError(f"{origin} {scheduler}: not a scheduler address ({e}); expected tcp://HOST:PORT, as "
                          "`dask scheduler` prints it") from None
    if tracking.is_local_store():
        raise EngineError(f"{origin} {scheduler}: Dask workers cannot write to this machine's SQLite store "
                          f"({tracking.tracking_uri()}); set MLFLOW_TRACKING_URI to a tracking server they all "
                          "reach (e.g. http://HOST:5000; README: Scaling out)")
    if uses_optuna and (optuna_storage is None or "://" not in optuna_storage
                        or optuna_storage.startswith("sqlite:")):
        raise EngineError(f"{origin} {scheduler}: Dask workers cannot share this machine's study file; give "
                          "--storage postgresql://USER@HOST/DB (an Optuna RDB storage they all reach)")
    from pipelines.cluster import cluster_devices

    found = cluster_devices(scheduler, cuda=args.device != "cpu")
    try:
        device = devices.resolve_on_cluster(args.device, scheduler, gpu_workers=found.gpu_workers,
                                            cuda_workers=found.cuda_workers)
    except devices.DeviceError as e:
        raise EngineError(str(e)) from None
    return Engine(scheduler=scheduler, device=device, cluster_bf16=found.bf16[device.partition(":")[0]])


__all__ = ["add_engine_options", "engine_from_args"]
