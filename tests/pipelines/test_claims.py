"""Claims: a run is trained by one suite at a time, and none stays RUNNING after its process died."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.entities import Run, RunData, RunInfo, RunTag
from mlflow.tracking import MlflowClient

from msa.config import RunConfig
from pipelines import claims, parent, tracking
from pipelines.run import main
from pipelines.stages.train import RunTask, execute
from pipelines.status import RunStatus

KEY = "k" * 16

def _claim(client, exp_id, key: str, *, age: float = 0.0) -> str:
    tags = {**claims.claim_tags(grace=60), "run_key": key, claims.HEARTBEAT: f"{time.time() - age:.3f}"}
    return client.create_run(exp_id, tags=tags).info.run_id


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One SQLite store for this module's small tests (creating one takes seconds); each test has its own
    experiment."""
    tmp = tmp_path_factory.mktemp("claims")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlflow.db'}")
        mp.setenv("MSA_CACHE", str(tmp / "cache"))
        yield


@pytest.fixture
def exp(shared_store, request):
    return tracking.setup(request.node.name)


def test_of_two_claims_made_at_once_exactly_one_holds_and_the_other_is_deleted(exp):
    client, exp_id = exp
    first, second = _claim(client, exp_id, KEY), _claim(client, exp_id, KEY)
    outcomes = {run_id: claims.settle(client, exp_id, KEY, run_id, grace=60) for run_id in (second, first)}
    holders = [run_id for run_id, taken in outcomes.items() if taken is None]
    assert len(holders) == 1
    loser = (set(outcomes) - set(holders)).pop()
    assert outcomes[loser].run.info.run_id == holders[0] and not outcomes[loser].finished
    assert client.get_run(loser).info.lifecycle_stage == "deleted"
    assert "running elsewhere: claimed by" in outcomes[loser].describe()


def test_a_live_claim_is_left_alone_and_a_stale_one_is_killed_with_the_reason(exp):
    client, exp_id = exp
    live = _claim(client, exp_id, KEY, age=1)
    assert claims.find_taken(client, exp_id, KEY, grace=60).run.info.run_id == live
    client.set_tag(live, claims.HEARTBEAT, f"{time.time() - 600:.3f}")   # its process stopped beating
    assert claims.find_taken(client, exp_id, KEY, grace=60) is None
    dead = client.get_run(live)
    assert dead.info.status == RunStatus.KILLED
    assert "no heartbeat for 600 s (grace 60 s)" in dead.data.tags[claims.KILLED_REASON]


def test_a_claim_whose_process_ended_on_this_machine_is_stale_at_once_whatever_its_heartbeat(exp):
    client, exp_id = exp
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    tags = {**claims.claim_tags(grace=60), "run_key": KEY}
    tags[claims.CLAIM_PROCESS] = claims.process_identity(child.pid)
    tags[claims.CLAIMED_BY] = f"here:{child.pid}"
    if not tags[claims.CLAIM_PROCESS]:
        child.kill()
        pytest.skip("no /proc here: a claim's process cannot be looked up, only its heartbeat tells")
    run_id = client.create_run(exp_id, tags=tags).info.run_id
    assert claims.find_taken(client, exp_id, KEY, grace=60).run.info.run_id == run_id   # it runs: live
    child.kill()
    child.wait()
    assert claims.process_gone(client.get_run(run_id))
    assert claims.find_taken(client, exp_id, KEY, grace=60) is None                    # beat 0 s ago, yet dead
    dead = client.get_run(run_id)
    assert dead.info.status == RunStatus.KILLED
    assert dead.data.tags[claims.KILLED_REASON] == f"its process (here:{child.pid}) has ended without recording the run"


def _claimed_by(identity: str):
    return Run(RunInfo("r", "0", "u", RunStatus.RUNNING, 0, None, "active"),
               RunData(tags=[RunTag(claims.CLAIM_PROCESS, identity)]))


def test_only_a_claim_made_on_this_machine_is_looked_up_and_a_reused_pid_is_not_its_process():
    mine = claims.process_identity(os.getpid())
    if not mine:
        pytest.skip("no /proc here: a claim's process cannot be looked up, only its heartbeat tells")
    boot, namespace, pid, started = mine.split("/")
    assert not claims.process_gone(_claimed_by(mine))                                    # this process runs
    assert claims.process_gone(_claimed_by(f"{boot}/{namespace}/{pid}/{int(started) + 1}"))   # a later one
    assert not claims.process_gone(_claimed_by(f"another-boot/{namespace}/999999999/1"))      # elsewhere
    assert not claims.process_gone(_claimed_by(f"{boot}/another-namespace/999999999/1"))      # a container
    assert not claims.process_gone(_claimed_by(""))                                      # an older claim
    assert not claims.process_gone(_claimed_by("garbage"))


def test_a_finished_run_is_taken(exp):
    client, exp_id = exp
    run_id = _claim(client, exp_id, KEY)
    client.set_terminated(run_id, RunStatus.FINISHED)
    taken = claims.find_taken(client, exp_id, KEY)
    assert taken.finished and taken.run.info.run_id == run_id
    assert taken.describe() == f"finished elsewhere (run {run_id})"
    client.set_tag(run_id, "ablation", "a")                 # another ablation of the same config, say
    client.set_tag(run_id, "seed", "7")
    assert claims.find_taken(client, exp_id, KEY).describe() == (
        f"finished already as a/seed-7 (run {run_id}: the same config, data and seed)")


def test_the_grace_period_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv(claims.GRACE_ENV, "7.5")
    assert claims.grace_seconds() == 7.5
    monkeypatch.setenv(claims.GRACE_ENV, "-1")
    with pytest.raises(ValueError, match="MSA_CLAIM_GRACE_S must be a number of seconds > 0; got '-1'"):
        claims.grace_seconds()
    monkeypatch.delenv(claims.GRACE_ENV)
    assert claims.grace_seconds() == claims.DEFAULT_GRACE_S


def test_a_heartbeat_notices_its_claim_was_taken_away(exp):
    client, exp_id = exp
    mine = _claim(client, exp_id, KEY)
    with claims.Heartbeat(client, mine, experiment_id=exp_id, run_key=KEY, grace=0.6) as beat:
        claims.mark_killed(client, mine, "judged dead by a test")
        deadline = time.monotonic() + 10
        while beat.lost is None and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(claims.ClaimLost, match="marked KILLED by another process: judged dead by a test"):
            beat.check()
    assert float(client.get_run(mine).data.tags[claims.HEARTBEAT]) > time.time() - 5


def _task(exp_id, digest: str = "") -> RunTask:
    config = RunConfig.from_dict({"model": {"hidden": 8, "ff_dim": 16, "modalities": ["text"]}, "train": {"epochs": 1}})
    return RunTask("text_only", 7, config, KEY, exp_id, None, "", data_digest=digest)


def test_a_run_claimed_elsewhere_is_not_trained_and_a_dead_claim_is_redone(exp, tiny_data):
    client, exp_id = exp
    other = _claim(client, exp_id, KEY)
    outcome = execute(_task(exp_id), tiny_data, threads=1)
    assert outcome.status == RunStatus.RUNNING and outcome.run_id == other and "running elsewhere" in outcome.error
    assert len(client.search_runs([exp_id])) == 1                     # nothing new was created

    client.set_tag(other, claims.HEARTBEAT, f"{time.time() - 600:.3f}")
    outcome = execute(_task(exp_id), tiny_data, threads=1)
    assert outcome.status == RunStatus.FINISHED and outcome.run_id != other
    assert client.get_run(other).info.status == RunStatus.KILLED
    again = execute(_task(exp_id), tiny_data, threads=1)            # finished meanwhile: not trained again
    assert again.status == RunStatus.CACHED and again.run_id == outcome.run_id


def test_a_worker_with_other_data_fails_the_run_saying_so(exp, tiny_data):
    client, exp_id = exp
    outcome = execute(_task(exp_id, digest="0123456789abcdef"), tiny_data, threads=1)
    assert outcome.status == RunStatus.FAILED
    assert f"with digest {tiny_data.digest}, the suite's data has digest 0123456789abcdef" in outcome.error
    assert client.search_runs([exp_id]) == []


def test_a_suite_killed_with_sigkill_is_marked_killed_and_redone_by_the_next(tmp_path, store, monkeypatch):
    """The suite process dies (SIGKILL: no handler runs); the next suite, on the same machine, sees at once
    that the claim's process has ended (no wait for the grace period), marks its run KILLED with the
    reason, and trains the run again."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("experiment: unit\nseeds: [7]\nbase:\n  model: {hidden: 8, ff_dim: 16, modalities: [text]}\n"
                    "ablations:\n  baseline: {}\n")
    args = ["ablations", "--spec", str(spec), "--quick", "--workers", "1", "--epochs", "4"]
    monkeypatch.delenv(claims.GRACE_ENV, raising=False)                            # 120 s
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.run", *args], env=os.environ, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(store)
    running, deadline = None, time.monotonic() + 120
    while running is None and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        exp = client.get_experiment_by_name("unit") if Path(store.removeprefix("sqlite:///")).exists() else None
        runs = [r for r in client.search_runs([exp.experiment_id]) if "ablation" in r.data.tags] if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "val_loss"):
            running = runs[0]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert running is not None
    assert client.get_run(running.info.run_id).info.status == RunStatus.RUNNING    # left behind

    start = time.monotonic()
    assert main(args) == 0
    assert time.monotonic() - start < 60                                           # no wait for its grace
    exp_id = client.get_experiment_by_name("unit").experiment_id
    runs = client.search_runs([exp_id])
    assert RunStatus.RUNNING not in {r.info.status for r in runs}
    dead = client.get_run(running.info.run_id)
    assert dead.info.status == RunStatus.KILLED
    assert dead.data.tags[claims.KILLED_REASON].endswith(f":{proc.pid}) has ended without recording the run")
    # The same suite again: it resumes the parent the dead one left RUNNING (marked KILLED on the way),
    # and leaves it FINISHED, without the reason of a kill that no longer describes it.
    parent = client.get_run(running.data.tags["mlflow.parentRunId"])
    assert parent.info.status == RunStatus.FINISHED and claims.KILLED_REASON not in parent.data.tags
    children = [r for r in runs if "ablation" in r.data.tags]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(r.info.status for r in children) == [RunStatus.FINISHED, RunStatus.KILLED]
    assert {r.data.tags["run_key"] for r in children} == {running.data.tags["run_key"]}   # the same run, redone


def test_a_suite_started_twice_at_once_gets_two_parents_and_a_dead_ones_parent_is_resumed(exp, monkeypatch):
    client, exp_id = exp
    monkeypatch.setenv(claims.GRACE_ENV, "60")
    first, resumed = parent.open_parent(client, exp_id, "ablations", "s" * 16, tags=claims.claim_tags(), params={})
    assert not resumed
    # The same suite while the first one beats: a parent of its own, not the first command's.
    second, resumed = parent.open_parent(client, exp_id, "ablations", "s" * 16, tags=claims.claim_tags(), params={})
    assert not resumed and second != first
    # Its process died (no beat for longer than the grace period), marked KILLED: the next one resumes it.
    client.set_tag(second, claims.HEARTBEAT, f"{time.time() - 3600:.3f}")
    assert claims.kill_stale(client, exp_id) == 1                       # the first one still beats
    again, resumed = parent.open_parent(client, exp_id, "ablations", "s" * 16, tags=claims.claim_tags(), params={})
    run = client.get_run(again)
    assert resumed and again == second and run.info.status == RunStatus.RUNNING
    assert claims.KILLED_REASON not in run.data.tags and claims.is_live(run)

