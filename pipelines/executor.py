"""The one worker pool: runs independent jobs on local worker processes and streams their events back.

Engine-shaped, so that another engine can stand behind the same call: jobs in, outcomes and events
out. A job runs as `work(job, resources, threads, emit)`: `resources` are what `setup()` returned once
in that worker (the data, say), `threads` its share of the cores, `emit` sends an event (a dict) to
the caller's `on_event`. Workers record their results themselves (e.g. in a shared tracking store),
so an outcome only needs to say how the job ended. Ctrl-C or SIGTERM stop every worker: jobs in
flight see a KeyboardInterrupt, queued ones never start.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any, TypeVar

from pipelines import cores

Job = TypeVar("Job")
Outcome = TypeVar("Outcome")
Emit = Callable[[dict[str, Any]], None]
Work = Callable[[Job, Any, int, Emit], Outcome]


class Interrupted(KeyboardInterrupt):
    """Raised by the SIGTERM handler, so that a terminated job unwinds (and records itself) as on Ctrl-C."""


def _raise_interrupted(signum, frame):
    raise Interrupted(f"signal {signum}")


def install_sigterm_handler() -> None:
    """SIGTERM interrupts like Ctrl-C does (only the main thread may set a handler)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupted)


def default_workers(n_jobs: int) -> int:
    """One single-threaded worker per core: these small models train faster side by side than
    with several threads each (see benchmarks/suite_throughput.py)."""
    return max(1, min(cores.available(), n_jobs))


def threads_per_worker(workers: int) -> int:
    """Each worker's share of the cores, with what other commands on this machine run counted."""
    return cores.share(workers)


def describe(workers: int, n_jobs: int, what: str = "runs") -> str:
    return f"{n_jobs} {what} on {workers} worker(s) x {threads_per_worker(workers)} thread(s)"


def run_jobs(jobs: Sequence[Job], work: Work, *, setup: Callable[[], Any], workers: int, on_event: Emit,
             on_done: Callable[[Outcome], None] = lambda outcome: None, local_resources: Any = None,
             start_together: bool = False) -> list[Outcome]:
    """Run `work` on every job over `workers` processes; returns the outcomes in completion order
    (jobs that never started because of an interrupt have none).

    `work` and `setup` must be picklable (module-level functions, or instances of module-level
    classes). With one worker, jobs run in this process on `local_resources` (or `setup()`).
    `start_together`: no job starts before every worker has finished `setup`, so that the first
    worker up does not take all the early jobs while the others are still importing.
    """
    install_sigterm_handler()
    if not jobs:
        return []
    with cores.claim(workers):
        if workers == 1:
            resources = local_resources if local_resources is not None else setup()
            outcomes = []
            for job in jobs:  # the share is taken per job: other commands may have started or ended
                outcomes.append(work(job, resources, cores.share(1), on_event))
                on_done(outcomes[-1])
            return outcomes
        return _run_in_pool(jobs, work, setup, workers, on_event, on_done, start_together)


def _run_in_pool(jobs, work, setup, workers, on_event, on_done, start_together) -> list:

    ctx = mp.get_context("spawn")  # fork after torch has started its thread pools can deadlock
    events, stop = ctx.Queue(), ctx.Event()
    barrier = ctx.Barrier(workers) if start_together else None
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(setup, workers, events, stop, barrier))
    outcomes: list[Outcome] = []
    pending: set[Future] = {pool.submit(_run_in_worker, work, job) for job in jobs}
    try:
        while pending:
            _drain(events, on_event)
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            _drain(events, on_event)
            for future in done:
                outcome = future.result()
                if outcome is not _NOT_STARTED:
                    outcomes.append(outcome)
                    on_done(outcome)
        return outcomes
    except BaseException:
        stop.set()  # before the signal: a worker whose job ends must not pick up a queued one
        running = {f for f in pending if not f.cancel()}
        stop_workers(pool, running)
        _drain(events, on_event)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        events.close()


# --- inside a worker process ------------------------------------------------------------------------

_NOT_STARTED = None  # what a queued job returns once the run was interrupted
_WORKER: dict[str, Any] = {}  # this worker process's resources, pool size and channels


def _init_worker(setup: Callable[[], Any], workers: int, events, stop, barrier) -> None:
    install_sigterm_handler()
    _WORKER.update(resources=setup(), workers=workers, events=events, stop=stop)
    if barrier is not None:
        try:
            barrier.wait(timeout=600)
        except threading.BrokenBarrierError:  # a worker died on the way up; the others go on without it
            pass


def _run_in_worker(work: Work, job: Job) -> Outcome | None:
    if _WORKER["stop"].is_set():  # interrupted: jobs already queued here never start
        return _NOT_STARTED
    threads = cores.share(_WORKER["workers"])  # per job: other commands may have started or ended
    return work(job, _WORKER["resources"], threads, _WORKER["events"].put)


# --- in the calling process -------------------------------------------------------------------------

def _drain(events, on_event: Emit) -> None:
    while True:
        try:
            on_event(events.get_nowait())
        except queue.Empty:
            return
        except (EOFError, OSError, ValueError):  # the queue was closed during shutdown
            return


def stop_workers(pool: ProcessPoolExecutor, running: Iterable[Future], timeout: float = 60) -> None:
    """Pass SIGTERM on to a pool's workers and wait for their futures.

    Ctrl-C reaches the workers by itself (same process group); SIGTERM sent to us alone does
    not, so each worker gets it and records its job as KILLED, and its future completes."""
    for proc in list(getattr(pool, "_processes", {}).values()):
        if proc.is_alive():
            try:
                os.kill(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    wait(list(running), timeout=timeout)


__all__ = ["run_jobs", "Interrupted", "install_sigterm_handler", "default_workers",
           "threads_per_worker", "describe", "stop_workers"]
