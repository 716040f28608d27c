"""Dask distributed behind `executor.run_jobs`: a LocalCluster on 127.0.0.1, or a running scheduler.

Each job is one Dask task, keyed `msa-<call>-<i>` (the same key on a retry). Its events travel back
as Dask worker events on a topic of the call's own, so calls sharing a cluster never see each
other's. A worker that dies has its task run again on another worker, up to the scheduler's
`distributed.scheduler.allowed-failures` (3 by default); past that, the job is `lost` and the others
go on. A stop (Ctrl-C, SIGTERM in the caller) marks the call stopped on every worker, so that its
queued jobs return at once and its running jobs raise `Interrupted` at their next
`executor.interrupt_point` (the end of an epoch), recording themselves KILLED as they unwind; a job
that finishes meanwhile is reported done. The wait says so on stderr; a second interrupt ends it at
once (LeftRunning: those runs stay RUNNING until the next command). A job the cluster cancels (its
scheduler restarted, or this client lost it) ends the call with ClusterLost: nothing is silently
left out.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from functools import cache, partial
from typing import Any, NamedTuple

from pipelines.executor import Emit, Engine, EngineError, LeftRunning, Work, set_job_key

STOP_WAIT_S = 60          # how long a stop waits for running jobs to record themselves KILLED
WORKERS_WAIT_S = 60       # how long a call on a running cluster waits for its first worker
POLL_S = 0.2
# Dask's nanny starts each worker process with MALLOC_TRIM_THRESHOLD_=65536. Setting any of glibc's
# malloc thresholds turns off its adaptive mmap threshold, so every tensor over 128 KiB is then
# mmapped and unmapped afresh (page faults, zeroing): measured, one 'improved' fit took 27.0 s with it
# against 15.8 s without (11.8 s of it in the kernel), and two workers trained at 0.63x the rate of
# one. Our LocalCluster's workers start without it; on any other worker `adaptive_malloc` undoes it.
GLIBC_TRIM = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


class ClusterLost(ConnectionError):
    """The cluster dropped this call's jobs (its scheduler restarted, the connection to it was lost): the
    machine's fault, so `main` ends it like any OSError, exit 1, finished runs kept."""


class _Signal:
    """What a task returns instead of an outcome when its job did not run to its end."""

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return (_signal, (self.name,))


def _signal(name: str) -> _Signal:
    return NOT_STARTED if name == "not-started" else INTERRUPTED


NOT_STARTED, INTERRUPTED = _Signal("not-started"), _Signal("interrupted")


def run_on_dask(jobs: Sequence[Any], work: Work, *, setup: Callable[[], Any], workers: int,
                threads: Callable[[], int] | None,
                on_event: Emit, on_done: Callable[[Any], None], lost: Callable[[Any, str], Any] | None,
                engine: Engine, start_together: bool = False) -> list[Any]:
    with connect(engine, workers, start_together=start_together) as client:
        token = f"msa-{uuid.uuid4().hex[:12]}"
        events: queue.Queue = queue.Queue()
        client.subscribe_topic(token, lambda event: events.put(event[1]))  # (scheduler time, message)
        resources = {"GPU": 1} if engine.uses_gpu else None
        futures = {client.submit(_run_job, work, job, setup, threads, token, key=f"{token}-{i}", pure=False,
                                 resources=resources): job for i, job in enumerate(jobs)}
        pending, outcomes = set(futures), []
        try:
            while pending:
                _drain(events, on_event, block=POLL_S)
                for future in [f for f in pending if f.done()]:
                    _drain(events, on_event)
                    outcome = _outcome(future, futures[future], lost)
                    if not isinstance(outcome, _Signal):
                        outcomes.append(outcome)
                        on_done(outcome)
                    pending.discard(future)  # after on_done: a stop in between still reports it
            return outcomes
        except BaseException as stopping:
            left = _stop_call(client, token, pending, events, on_event, on_done)
            if left and isinstance(stopping, KeyboardInterrupt):
                raise LeftRunning("runs in flight did not stop in time") from None
            raise
        finally:
            with contextlib.suppress(Exception):
                client.unsubscribe_topic(token)


def _stop_call(client, token: str, pending: set, events: queue.Queue, on_event: Emit,
               on_done: Callable[[Any], None]) -> bool:
    """Stop a call: its queued jobs never start, its running ones unwind at their next interrupt point
    (recording themselves KILLED); wait up to STOP_WAIT_S for them, saying so. A job that finished
    meanwhile is reported done. True when jobs may have been left running: the wait ran out, or a
    second interrupt cut it short."""
    try:
        with contextlib.suppress(Exception):
            client.run(_stop, token)
        if not all(f.done() for f in pending):
            print(f"stopping: each run in flight ends at its next epoch and is recorded KILLED (waiting up to "
                  f"{STOP_WAIT_S} s; interrupt again to leave now)", file=sys.stderr, flush=True)
        deadline = time.monotonic() + STOP_WAIT_S  # polled: distributed.wait() wants a default client
        while time.monotonic() < deadline and not all(f.done() for f in pending):
            time.sleep(POLL_S)
        _drain(events, on_event)
        for future in [f for f in pending if f.status == "finished"]:
            with contextlib.suppress(Exception):
                outcome = future.result()
                if not isinstance(outcome, _Signal):
                    on_done(outcome)
        return not all(f.done() for f in pending)
    except KeyboardInterrupt:
        return True
    finally:
        with contextlib.suppress(Exception):
            client.cancel(list(pending))


@contextlib.contextmanager
def connect(engine: Engine, workers: int, *, start_together: bool = False) -> Iterator[Any]:
    """A client on the engine's cluster: the scheduler at `engine.scheduler`, else a LocalCluster of
    `workers` single-threaded processes on 127.0.0.1 (one GPU slot each on CUDA), closed afterwards."""
    import dask
    from distributed import Client, LocalCluster

    if engine.scheduler:
        try:
            client = Client(engine.scheduler, timeout=15, set_as_default=False)
        except (OSError, TimeoutError) as e:
            raise EngineError(f"no Dask scheduler answers at {engine.scheduler} ({type(e).__name__}); start one with "
                              "`dask scheduler`, or leave --scheduler and MSA_SCHEDULER unset to run here") from None
        try:
            _check_cluster(client, engine)
            yield client
        finally:
            client.close()
        return
    with dask.config.set({GLIBC_TRIM: None}):
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR,
                               resources={"GPU": 1} if engine.uses_gpu else None, preload=[__name__])
    client = Client(cluster, set_as_default=False)
    try:
        if start_together:
            client.wait_for_workers(workers, timeout=WORKERS_WAIT_S)
        yield client
    finally:
        client.close()
        cluster.close()


def _check_cluster(client, engine: Engine) -> None:
    try:
        client.wait_for_workers(1, timeout=WORKERS_WAIT_S)
    except TimeoutError:
        raise EngineError(f"no Dask worker joined the scheduler at {engine.scheduler} within {WORKERS_WAIT_S} s; "
                          f"start workers with `dask worker {engine.scheduler} --nthreads 1`") from None
    info = client.scheduler_info()["workers"]
    threaded = sorted(address for address, w in info.items() if w.get("nthreads", 1) > 1)
    if threaded:  # torch's seeds and thread settings belong to a process: runs in threads would not reproduce
        raise EngineError(f"{len(threaded)} worker(s) of the Dask cluster at {engine.scheduler} run several threads "
                          f"(e.g. {threaded[0]}), so their runs would not be reproducible; start workers with "
                          f"`dask worker {engine.scheduler} --nthreads 1 --nworkers K` (one process per run)")
    if engine.uses_gpu:
        workers = info.values()
        if not any(w.get("resources", {}).get("GPU") for w in workers):
            raise EngineError(f"--device {engine.device}: no worker of the Dask cluster at {engine.scheduler} "
                              "declares a GPU; start GPU workers with `dask worker ... --nthreads 1 --resources GPU=1`")


class ClusterDevices(NamedTuple):
    """What the workers of a cluster have, each answering for its own machine."""

    gpu_workers: int                  # workers that declare a GPU resource
    cuda_workers: int                 # workers with a CUDA device (asked only when CUDA may be used)
    bf16: dict[str, bool | None]      # device type -> every worker has native bf16 on it (True), none
                                      # (False), some (None); on cuda, among the workers with CUDA


def cluster_devices(address: str, *, cuda: bool = True) -> ClusterDevices:
    """What the workers of the cluster at `address` have (CUDA is asked about only when `cuda`)."""
    engine = Engine(scheduler=address)
    with connect(engine, 0) as client:
        workers = client.scheduler_info()["workers"].values()
        gpus = sum(bool(w.get("resources", {}).get("GPU")) for w in workers)
        answers = list(client.run(_devices_here, cuda and gpus > 0).values())
    with_cuda = [a for a in answers if a["cuda"]]
    return ClusterDevices(gpus, len(with_cuda), {"cpu": _all_or_none([a["cpu_bf16"] for a in answers]),
                                                 "cuda": _all_or_none([a["cuda_bf16"] for a in with_cuda])})


def _all_or_none(answers: list[bool]) -> bool | None:
    """True when every answer is, False when none is, None when they differ or there are none."""
    return answers[0] if answers and len(set(answers)) == 1 else None


def _devices_here(cuda: bool) -> dict[str, bool]:
    """On a worker: whether it has CUDA (asked only when `cuda`) and native bf16 on its CPU and GPU."""
    import torch

    from msa.training import bf16_supported

    has_cuda = cuda and torch.cuda.is_available()
    return {"cuda": has_cuda, "cpu_bf16": bf16_supported(torch.device("cpu")),
            "cuda_bf16": has_cuda and bf16_supported(torch.device("cuda"))}


def _outcome(future, job: Any, lost: Callable[[Any, str], Any] | None) -> Any:
    from distributed.scheduler import KilledWorker

    if future.status == "cancelled":  # never by this call, which cancels only after its loop: the cluster did
        reason = "no reason given"
        try:
            future.result()
        except Exception as e:
            reason = getattr(e, "reason", type(e).__name__)
        raise ClusterLost(f"the Dask cluster cancelled a job ({reason}): its scheduler restarted, or this command "
                          "lost it") from None
    if future.status == "error":
        error = future.exception()
        if isinstance(error, KilledWorker) and lost is not None:
            return lost(job, f"its worker died on every attempt ({error})")
        future.result()  # raises the job's error, with its traceback
    return future.result()


def _drain(events: queue.Queue, on_event: Emit, block: float = 0.0) -> None:
    try:
        event = events.get(timeout=block) if block else events.get_nowait()
    except queue.Empty:
        return
    while True:
        on_event(event)
        try:
            event = events.get_nowait()
        except queue.Empty:
            return


# --- inside a worker process ------------------------------------------------------------------------

_STOPPED: set[str] = set()  # calls that were stopped: their queued jobs never start, running ones unwind


def dask_setup(worker) -> None:
    """Preload of LocalCluster workers: Ctrl-C, and SIGTERM sent to the whole process group (`timeout`,
    `kill -- -PGID`, a batch scheduler's cancel), reach these workers too; the caller alone handles
    them and stops the jobs itself (a worker killed by one would leave its run RUNNING). The workers
    still end with the caller: their nanny stops them with SIGKILL, and they exit when it dies."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@cache
def adaptive_malloc() -> bool:
    """In a process started with MALLOC_TRIM_THRESHOLD_ (a `dask worker` of any cluster), give glibc
    back thresholds like those it adapts to on its own: 32 MiB before a block is mmapped (the most its
    adaptation reaches on 64 bits) and twice that before the heap is trimmed. Once per process; False
    where there is nothing to undo or no glibc."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 64 << 20))
    except (OSError, AttributeError):  # not glibc
        return False


def _run_job(work: Work, job: Any, setup: Callable[[], Any], threads: Callable[[], int] | None, token: str) -> Any:
    from distributed import get_worker

    adaptive_malloc()
    worker = get_worker()
    if token in _STOPPED:
        return NOT_STARTED
    try:
        set_job_key(str(worker.get_current_task()), stopped=lambda: token in _STOPPED)
        return work(job, setup(), threads() if threads else None, partial(_emit, worker, token))
    except KeyboardInterrupt:  # recorded KILLED by the job; raised on, it would end the worker process
        return INTERRUPTED
    finally:
        set_job_key(None)


def _emit(worker, token: str, event: dict[str, Any]) -> None:
    # Worker events are msgpack'd: numpy scalars become plain numbers.
    worker.log_event(token, {k: v.item() if hasattr(v, "item") else v for k, v in event.items()})


def _stop(token: str) -> None:
    _STOPPED.add(token)


__all__ = ["run_on_dask", "connect", "ClusterLost", "cluster_devices", "dask_setup", "NOT_STARTED", "INTERRUPTED"]
