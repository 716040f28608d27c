"""The worker pool: jobs in, outcomes and events out, the same in one process and in several."""

import os
import signal
import sys
import threading
import time

import dask
import distributed
import pytest

from pipelines import cluster
from pipelines.executor import (
    Engine,
    EngineError,
    Interrupted,
    LeftRunning,
    current_job_key,
    describe,
    interrupt_point,
    run_jobs,
    set_job_key,
)


class Setup:
    """Picklable: what a worker loads once."""

    def __call__(self):
        return {"base": 100, "pid": os.getpid()}


def work(job, resources, threads, emit):
    emit({"event": "started", "job": job})
    if job == "boom":
        raise ValueError("boom")
    return (job, resources["base"] + job, threads, resources["pid"])


@pytest.mark.parametrize("workers", [1, 2])
def test_every_job_runs_once_with_its_worker_resources_and_events(workers):
    events, done = [], []
    outcomes = run_jobs([1, 2, 3, 4], work, setup=Setup(), workers=workers, on_event=events.append,
                        on_done=done.append)
    assert sorted(o[:2] for o in outcomes) == [(1, 101), (2, 102), (3, 103), (4, 104)]
    assert done == outcomes
    assert sorted(e["job"] for e in events) == [1, 2, 3, 4]
    pids = {o[3] for o in outcomes}
    assert (pids == {os.getpid()}) if workers == 1 else (os.getpid() not in pids)


def test_one_worker_uses_the_resources_it_is_given():
    outcomes = run_jobs([1], work, setup=Setup(), workers=1, on_event=lambda e: None,
                        local_resources={"base": 0, "pid": -1})
    assert outcomes[0][1] == 1 and outcomes[0][3] == -1


def test_start_together_runs_every_job():
    outcomes = run_jobs([1, 2], work, setup=Setup(), workers=2, on_event=lambda e: None, start_together=True)
    assert sorted(o[0] for o in outcomes) == [1, 2]


def test_an_error_in_a_job_reaches_the_caller():
    with pytest.raises(ValueError, match="boom"):
        run_jobs(["boom"], work, setup=Setup(), workers=1, on_event=lambda e: None)


def test_describe():
    assert describe(2, 13).startswith("13 runs on 2 worker(s) x ")


def test_no_more_workers_start_than_there_are_jobs():
    """--workers 8 for one run: it trains in this process, not in one of 8 that each import torch."""
    outcomes = run_jobs([1], work, setup=Setup(), workers=8, on_event=lambda e: None)
    assert outcomes[0][3] == os.getpid()


class KillsItsWorker:
    """Picklable: a job that kills its worker process (as the kernel's OOM killer would), every time
    or only on its first attempt."""

    def __init__(self, marker: str, always: bool):
        self.marker, self.always = marker, always

    def __call__(self, job, resources, threads, emit):
        if job == "victim" and (self.always or not os.path.exists(self.marker)):
            open(self.marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return job


def test_a_job_whose_worker_dies_runs_again_and_one_that_always_kills_it_is_lost(tmp_path):
    once = run_jobs(["victim", 1, 2], KillsItsWorker(str(tmp_path / "once"), always=False), setup=Setup(), workers=2,
                    on_event=lambda e: None)
    assert sorted(map(str, once)) == ["1", "2", "victim"]               # redone; the others went on

    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        outcomes = run_jobs(["victim", 3], KillsItsWorker(str(tmp_path / "always"), always=True), setup=Setup(),
                            workers=2, on_event=lambda e: None, lost=lambda job, reason: ("lost", job, reason))
    lost = [o for o in outcomes if isinstance(o, tuple)]
    assert 3 in outcomes and len(lost) == 1 and lost[0][1] == "victim"
    assert lost[0][2].startswith("its worker died on every attempt")


def malloc_settings(job, resources, threads, emit):
    return os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("OMP_NUM_THREADS")


def test_local_workers_keep_glibcs_adaptive_malloc():
    # Dask's nanny sets MALLOC_TRIM_THRESHOLD_ (it made every large tensor an mmap: 1.7x slower fits);
    # its other pre-spawn settings still apply, so these are the nanny's processes.
    outcomes = run_jobs([1, 2], malloc_settings, setup=Setup(), workers=2, on_event=lambda e: None)
    assert outcomes == [(None, "1"), (None, "1")]


FAULTS = """
import resource, sys
import numpy as np
from pipelines.cluster import adaptive_malloc

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(300):
        np.ones(1 << 18, dtype=np.float32)   # 1 MiB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

trimmed = faults()
undone = adaptive_malloc()
print(trimmed, undone, faults())
"""


def test_a_worker_started_with_malloc_trim_threshold_gets_large_blocks_reused_again():
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_TRIM_THRESHOLD_": "65536"}
    trimmed, undone, after = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True,
                                            check=True).stdout.split()
    assert undone == "True"
    assert int(trimmed) > 300 * 200 and int(after) < int(trimmed) / 20   # each block mmapped anew, then not
    env.pop("MALLOC_TRIM_THRESHOLD_")
    plain = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True)
    assert plain.stdout.split()[1] == "False"                                # nothing to undo


def test_a_cluster_is_bf16_native_only_where_every_worker_says_so():
    from pipelines.cluster import _all_or_none

    assert _all_or_none([True, True]) is True and _all_or_none([False]) is False
    assert _all_or_none([True, False]) is None and _all_or_none([]) is None   # mixed, or nobody to ask
    assert Engine(scheduler="tcp://h:1", cluster_bf16=False).bf16_native() is False


def test_a_suite_too_small_to_repay_starting_workers_runs_in_one_with_every_core():
    from pipelines.executor import PARALLEL_WORK, default_workers

    cores = os.cpu_count()
    assert default_workers(13) == min(cores, 13)                        # nothing known of the work: as before
    assert default_workers(13, work=PARALLEL_WORK - 1) == 1
    assert default_workers(13, work=PARALLEL_WORK) == min(cores, 13)


class _Worker:
    """What `cluster._run_job` asks of the Dask worker it runs in."""

    def get_current_task(self):
        return "msa-test-0"

    def log_event(self, topic, event):
        pass


def test_a_stopped_job_ends_at_its_next_interrupt_point_and_no_other_thread_is_hit(monkeypatch):
    """A stop reaches a job running in a worker thread (which no signal reaches) at its next
    interrupt point. Nothing is injected into threads: on Python 3.11 an exception aimed at the job's
    thread could land in a thread the job was just starting (its heartbeat) and kill that one."""
    monkeypatch.setattr(distributed, "get_worker", lambda: _Worker())
    hit = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: hit.append(u.exc_type))
    monkeypatch.setattr(threading, "excepthook", lambda a: hit.append(a.exc_type))
    points = []

    def work(token, resources, threads, emit):
        while True:  # like a run: threads started as it goes, an interrupt point after each "epoch"
            helper = threading.Thread(target=lambda: None, daemon=True)
            helper.start()
            helper.join()
            points.append(current_job_key())
            interrupt_point()

    for i in range(30):
        token, outcome = f"msa-stop-{i}", []
        job = threading.Thread(target=lambda t=token, o=outcome: o.append(cluster._run_job(work, t, dict, None, t)),
                               daemon=True)
        job.start()
        time.sleep(0.002 * (i % 5))
        cluster._stop(token)
        job.join(timeout=10)
        assert not job.is_alive() and outcome == [cluster.INTERRUPTED]
    assert hit == [] and set(points) == {"msa-test-0"} and current_job_key() is None
    # A queued job of a stopped call never starts.
    assert cluster._run_job(work, "late", dict, None, "msa-stop-0") is cluster.NOT_STARTED


def test_interrupt_point_is_a_no_op_outside_a_stopped_job():
    interrupt_point()  # no job in this thread
    set_job_key("k", stopped=lambda: False)
    try:
        interrupt_point()
        set_job_key("k", stopped=lambda: True)
        with pytest.raises(Interrupted):
            interrupt_point()
    finally:
        set_job_key(None)
    interrupt_point()


def cancels_the_other_job(job, resources, threads, emit):
    """'canceller' cancels job 0 on the scheduler for every client, as a scheduler restart or a lost
    connection does; 'slow' is that job."""
    if job == "canceller":
        from distributed import Future, get_client

        key = current_job_key()
        Future(key.rsplit("-", 1)[0] + "-0", get_client()).cancel(force=True)
        return job
    time.sleep(5)
    return job


def test_a_job_the_cluster_cancels_ends_the_call_with_one_line_not_as_a_silent_skip():
    # A ConnectionError: the machine's fault, which `main` ends in one line, exit 1, finished runs kept.
    with pytest.raises(ConnectionError, match="the Dask cluster cancelled a job") as raised:
        run_jobs(["slow", "canceller"], cancels_the_other_job, setup=Setup(), workers=2, on_event=lambda e: None)
    assert "\n" not in str(raised.value) and "scheduler restarted" in str(raised.value)


def finishes_after_the_stop(job, resources, threads, emit):
    """'late' is past its last interrupt point when the stop comes and finishes anyway; 'looping'
    stops at its next interrupt point."""
    emit({"event": "started", "job": job})
    while job == "looping":
        time.sleep(0.05)
        interrupt_point()
    time.sleep(2)
    return job


def test_a_job_that_finishes_while_a_stop_waits_is_reported_done():
    started, done = set(), []

    def on_event(event):
        started.add(event["job"])
        if started == {"late", "looping"}:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as raised:
        run_jobs(["late", "looping"], finishes_after_the_stop, setup=Setup(), workers=2, on_event=on_event,
                 on_done=done.append, start_together=True)
    assert done == ["late"]
    assert type(raised.value) is KeyboardInterrupt                       # all stopped in time: not LeftRunning


class _FakeClient:
    def __init__(self, workers):
        self.workers = workers

    def wait_for_workers(self, n, timeout):
        pass

    def scheduler_info(self):
        return {"workers": self.workers}


def test_a_cluster_whose_workers_run_several_threads_is_refused_saying_how_to_start_them():
    engine = Engine(scheduler="tcp://10.0.0.1:8786")
    one = {"tcp://10.0.0.2:1": {"nthreads": 1}, "tcp://10.0.0.2:2": {"nthreads": 1}}
    cluster._check_cluster(_FakeClient(one), engine)
    with pytest.raises(EngineError) as refused:
        cluster._check_cluster(_FakeClient({**one, "tcp://10.0.0.3:1": {"nthreads": 4}}), engine)
    said = str(refused.value)
    assert "1 worker(s)" in said and "tcp://10.0.0.3:1" in said and "not be reproducible" in said
    assert "--nthreads 1" in said and "\n" not in said


def never_stops(job, resources, threads, emit):
    emit({"event": "started", "job": job})
    time.sleep(30)  # no interrupt point: a stop must wait for it
    return job


def test_a_second_interrupt_while_a_stop_waits_leaves_at_once_saying_the_runs_stay_running(capsys):
    import _thread

    first = []

    def on_event(event):
        if not first:
            first.append(event)
            threading.Timer(1.0, _thread.interrupt_main).start()  # the second Ctrl-C, while the stop waits
            raise KeyboardInterrupt

    start = time.monotonic()
    with pytest.raises(LeftRunning):
        run_jobs(["a", "b"], never_stops, setup=Setup(), workers=2, on_event=on_event, start_together=True)
    assert time.monotonic() - start < cluster.STOP_WAIT_S / 2


def test_a_stop_whose_wait_runs_out_says_the_runs_were_left_running(capsys, monkeypatch):
    monkeypatch.setattr(cluster, "STOP_WAIT_S", 1)
    seen = []

    def on_event(event):
        seen.append(event)
        if len(seen) == 1:
            raise KeyboardInterrupt

    with pytest.raises(LeftRunning):
        run_jobs(["a", "b"], never_stops, setup=Setup(), workers=2, on_event=on_event, start_together=True)
    assert "stopping: each run in flight ends at its next epoch" in capsys.readouterr().err
