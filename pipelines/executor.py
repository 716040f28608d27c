"""Runs independent `RunTask`s on local worker processes, splitting the cores between them.

Workers log straight to the tracking store (SQLite waits on its lock; a server needs nothing),
so the same task could be run by any engine that can call `stages.train.execute` elsewhere,
e.g. workers on several machines sharing one tracking server. Progress comes back over a queue.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable, Iterable

from pipelines.stages.train import Interrupted, RunOutcome, RunTask, execute


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def default_workers(n_tasks: int) -> int:
    """One single-threaded worker per core: these small models train faster side by side than
    with several threads each (see benchmarks/suite_throughput.py)."""
    return max(1, min(available_cores(), n_tasks))


def threads_per_worker(workers: int) -> int:
    return max(1, available_cores() // max(1, workers))


@dataclass(frozen=True)
class DataRef:
    """How a worker gets the data: the same call the main process made (cached, so it is fast)."""

    source: str
    quick: bool

    def load(self):
        from pipelines.stages.prepare import prepare
        return prepare(self.source, quick=self.quick)


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def install_sigterm_handler() -> None:
    """SIGTERM interrupts like Ctrl-C does, so runs in flight are recorded as KILLED."""
    signal.signal(signal.SIGTERM, _raise_interrupted)


_WORKER: dict = {}


def _init_worker(ref: DataRef, threads: int, events: "mp.Queue", stop: "mp.Event", uri: str) -> None:
    install_sigterm_handler()
    os.environ["MLFLOW_TRACKING_URI"] = uri
    import mlflow
    mlflow.set_tracking_uri(uri)
    _WORKER.update(data=ref.load(), threads=threads, events=events, stop=stop)


def _run_in_worker(task: RunTask) -> RunOutcome:
    if _WORKER["stop"].is_set():  # the suite was interrupted: tasks already queued here never start
        return RunOutcome(task.ablation, task.seed, "KILLED", None, 0.0, error="not started: interrupted")
    return execute(task, _WORKER["data"], threads=_WORKER["threads"], progress=_WORKER["events"].put)


def run_tasks(tasks: list[RunTask], ref: DataRef, data, *, workers: int, uri: str,
              on_event: Callable[[dict], None], on_done: Callable[[RunOutcome], None]) -> list[RunOutcome]:
    """Run every task; returns their outcomes in completion order. Ctrl-C/SIGTERM stop all workers."""
    if not tasks:
        return []
    threads = threads_per_worker(workers)
    if workers == 1:
        outcomes = []
        for task in tasks:
            outcomes.append(execute(task, data, threads=threads, progress=on_event))
            on_done(outcomes[-1])
        return outcomes

    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can deadlock
    events, stop = ctx.Queue(), ctx.Event()
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(ref, threads, events, stop, uri))
    outcomes: list[RunOutcome] = []
    pending: set[Future] = {pool.submit(_run_in_worker, t) for t in tasks}
    try:
        while pending:
            _drain(events, on_event)
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(events, on_event)
            for future in done:
                outcomes.append(future.result())
                on_done(outcomes[-1])
        return outcomes
    except BaseException:
        stop.set()  # before the signal: a worker whose run ends must not pick up a queued one
        running = {f for f in pending if not f.cancel()}
        stop_workers(pool, running)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        events.close()


def _drain(events, on_event: Callable[[dict], None]) -> None:
    while True:
        try:
            on_event(events.get_nowait())
        except queue.Empty:
            return
        except (EOFError, OSError, ValueError):  # the queue was closed during shutdown
            return


def stop_workers(pool: ProcessPoolExecutor, running: Iterable[Future], timeout: float = 30) -> None:
    """Pass SIGTERM on to a pool's workers and wait for their futures.

    Ctrl-C reaches the workers by itself (same process group); SIGTERM sent to us alone does
    not, so each worker gets it and records its run as KILLED, and its future completes."""
    for proc in list(getattr(pool, "_processes", {}).values()):
        if proc.is_alive():
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    wait(list(running), timeout=timeout)


def describe(workers: int, tasks: Iterable[RunTask]) -> str:
    return f"{len(list(tasks))} runs on {workers} worker(s) x {threads_per_worker(workers)} thread(s)"
