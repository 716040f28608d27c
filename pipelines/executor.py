"""Jobs in, outcomes and events out: the one way the pipelines run independent work in parallel.

Engine-shaped, so that callers never ask where their jobs run. A job runs as
`work(job, resources, threads, emit)`: `resources` are what `setup()` returned in that worker (the
data, say), `threads` its share of the cores (None: the worker's own setting), `emit` sends an event
(a dict) to the caller's `on_event`. Workers record their results themselves (in a shared tracking
store), so an outcome only says how the job ended. Ctrl-C or SIGTERM stop every worker: jobs in
flight see a KeyboardInterrupt, queued ones never start.

The `Engine` says where: one worker runs in this process; several run on a Dask LocalCluster on
127.0.0.1 (one single-threaded process per core); with a scheduler address they run on that Dask
cluster, on any machine that joined it (`pipelines.cluster`).
"""

from __future__ import annotations

import os
import signal
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pipelines import cores
from pipelines.errors import UserError

Job = TypeVar("Job")
Outcome = TypeVar("Outcome")
Emit = Callable[[dict[str, Any]], None]
Work = Callable[[Job, Any, "int | None", Emit], Outcome]

SCHEDULER_ENV = "MSA_SCHEDULER"  # tcp://HOST:PORT of a Dask scheduler, as --scheduler gives it


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler (and by `interrupt_point` in a job asked to stop), so that a
    terminated job unwinds (and records itself) as on Ctrl-C."""


class LeftRunning(KeyboardInterrupt):
    """A second interrupt while a stop waited for the jobs in flight: they were left as they were, so their
    runs stay RUNNING until the next command marks them KILLED."""


class EngineError(UserError):
    """The engine cannot run anything (no scheduler there, no worker with a GPU); the message says why."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def install_sigterm_handler() -> None:
    """SIGTERM interrupts like Ctrl-C does (only the main thread may set a handler)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)


# Below this much training in all, counted in epochs of the lab's baseline on MOSI-sized data, one
# worker with every core finishes first: starting worker processes (each imports torch and MLflow)
# costs more than they win. Measured on 2 cores: `ablations --quick` (3.5 such epochs) 42.6 s on one
# worker against 54.0 s on two; 6 ablations x 2 seeds x 2 MOSI-sized epochs (37) 1.06x faster on two.
PARALLEL_WORK = 30.0


def default_workers(n_jobs: int, work: float | None = None) -> int:
    """One single-threaded worker per core (these small models train faster side by side than with
    several threads each; benchmarks/suite_throughput.py), unless the jobs hold less `work` than
    PARALLEL_WORK: then one worker, in this process, with every core."""
    if work is not None and work < PARALLEL_WORK:
        return 1
    return max(1, min(cores.available(), n_jobs))


def threads_per_worker(workers: int) -> int:
    """Each worker's share of the cores, with what other commands on this machine run counted."""
    return cores.share(workers)


@dataclass(frozen=True)
class Engine:
    """Where jobs run. Chosen once, by the composition root (`pipelines.run`); callers pass it on."""

    scheduler: str | None = None   # a running Dask scheduler (tcp://HOST:PORT); None: this machine
    device: str = "cpu"            # what every job trains on, resolved: cpu, cuda or cuda:N
    gpu_slots: int = 1             # this machine, on CUDA: worker processes sharing the GPU, one run each
    cluster_bf16: bool | None = None  # a cluster: every worker has native bf16 on `device` (True), none
                                      # has (False), some have or not known (None)

    @classmethod
    def from_env(cls) -> Engine:
        return cls(scheduler=os.environ.get(SCHEDULER_ENV) or None)

    @property
    def uses_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def local_workers(self, workers: int) -> int:
        """Worker processes on this machine: one per GPU slot on CUDA, else as asked."""
        return self.gpu_slots if self.uses_gpu else max(1, workers)

    def bf16_native(self) -> bool | None:
        """Whether runs train bf16 natively where they go: this machine's `device`, or the cluster's
        workers (`cluster_bf16`). None: some workers may and some not, each run records what it used."""
        if self.scheduler:
            return self.cluster_bf16
        import torch

        from msa import training

        return training.bf16_supported(torch.device(self.device))

    def threads(self, workers: int) -> cores.Share | None:
        """Torch threads per job, taken as it starts: the cores split between this command's local
        workers and those of other commands here; None on a cluster (its workers' own setting)."""
        return None if self.scheduler else cores.Share(self.local_workers(workers), os.getpid())

    def describe(self, workers: int, n_jobs: int, what: str = "runs") -> str:
        where = f" on {self.device}" if self.uses_gpu else ""
        if self.scheduler:
            return f"{n_jobs} {what} on the Dask cluster at {self.scheduler}{where}"
        n = self.local_workers(min(workers, max(1, n_jobs)))  # as run_jobs caps it
        return f"{n_jobs} {what} on {n} worker(s) x {threads_per_worker(n)} thread(s){where}"


def describe(workers: int, n_jobs: int, what: str = "runs", engine: Engine | None = None) -> str:
    return (engine or Engine.from_env()).describe(workers, n_jobs, what)


_JOB = threading.local()


def current_job_key() -> str | None:
    """The executor's key of the job this thread runs: the same for every attempt at one job (a Dask
    retry after its worker died), different between jobs and between calls."""
    return getattr(_JOB, "key", None)


def set_job_key(key: str | None, stopped: Callable[[], bool] | None = None) -> None:
    """Name the job this thread runs (None when it ends); `stopped` says whether it was asked to stop."""
    _JOB.key, _JOB.stopped = key, stopped


def interrupt_point() -> None:
    """Raise Interrupted here when the job this thread runs was asked to stop. Jobs call it between
    epochs and while they wait: on a Dask worker they run in a thread that no signal reaches, and an
    exception injected into a thread (PyThreadState_SetAsyncExc) is not safe: on Python 3.11 it can
    land in a thread that one is just starting (its claim's heartbeat, say), killing that one instead."""
    stopped = getattr(_JOB, "stopped", None)
    if stopped is not None and stopped():
        raise Interrupted("stopped")


def run_jobs(jobs: Sequence[Job], work: Work, *, setup: Callable[[], Any], workers: int, on_event: Emit,
             on_done: Callable[[Outcome], None] = lambda outcome: None, local_resources: Any = None,
             start_together: bool = False, engine: Engine | None = None,
             lost: Callable[[Job, str], Outcome] | None = None) -> list[Outcome]:
    """Run `work` on every job; returns the outcomes in completion order (jobs that never started
    because of an interrupt have none).

    `work` and `setup` must be picklable (module-level functions, or instances of module-level
    classes). `setup()` runs in a worker before its jobs and should cache what is expensive (a
    long-lived cluster worker serves many calls). One local worker runs the jobs in this process
    on `local_resources` (or `setup()`). `start_together`: no job starts before the workers are up,
    so that the first one does not take all the early jobs. `lost(job, reason)`: the outcome of a
    job whose workers kept dying (without it, that ends the call with the error); a worker that
    dies once just has its job run again elsewhere. `engine`: where (default: `Engine.from_env()`).
    """
    install_sigterm_handler()
    engine = engine or Engine.from_env()
    if not jobs:
        return []
    workers = min(workers, len(jobs))  # --workers 500 for 13 runs: 13 processes, each holding torch, not 500
    threads = engine.threads(workers)
    if engine.scheduler is not None:
        return _on_dask(jobs, work, setup, workers, threads, on_event, on_done, lost, engine, start_together)
    with cores.claim(engine.local_workers(workers)):
        if engine.local_workers(workers) > 1:
            return _on_dask(jobs, work, setup, workers, threads, on_event, on_done, lost, engine, start_together)
        resources = local_resources if local_resources is not None else setup()
        token = uuid.uuid4().hex[:12]
        outcomes = []
        for i, job in enumerate(jobs):
            set_job_key(f"msa-{token}-{i}")
            try:
                outcomes.append(work(job, resources, threads(), on_event))
            finally:
                set_job_key(None)
            on_done(outcomes[-1])
        return outcomes


def _on_dask(jobs, work, setup, workers, threads, on_event, on_done, lost, engine, start_together) -> list:
    from pipelines.cluster import run_on_dask

    return run_on_dask(jobs, work, setup=setup, workers=engine.local_workers(workers), threads=threads,
                       on_event=on_event, on_done=on_done, lost=lost, engine=engine, start_together=start_together)


__all__ = ["run_jobs", "Engine", "EngineError", "Interrupted", "LeftRunning", "install_sigterm_handler",
           "default_workers", "PARALLEL_WORK", "threads_per_worker", "describe", "current_job_key", "set_job_key",
           "interrupt_point", "SCHEDULER_ENV"]
