"""The worker pool: jobs in, outcomes and events out, the same in one process and in several."""

import os

import pytest

from pipelines.executor import describe, run_jobs


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
