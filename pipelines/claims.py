"""Claims: no (ablation, seed) trained twice at once, no run left RUNNING by a process that died.

A run claims itself: before training, a worker creates its RUNNING run carrying the `run_key` and a
`heartbeat` tag (unix time), which a thread refreshes while the run works. Another suite that finds
a live claim on the key does not train it. A claim whose heartbeat is older than the grace period
(`MSA_CLAIM_GRACE_S`, default 120 s, and never under three of its writer's beats) is stale: its process
died; it is marked KILLED with the reason in `killed_reason`, and the run is redone. A claim made on
this very machine (same boot, same PID namespace: the `claim_process` tag) is judged at once instead:
stale as soon as its process is gone (killed with SIGKILL, out of memory), whatever its last beat.
Two claims made at once are settled by their order (start time, then run id): the later one is
deleted, having trained nothing. Suite parents and tune sessions beat too, so that the next command on their
experiment marks a dead one KILLED. Clocks of the machines must agree to well within the grace period.
"""

from __future__ import annotations

import math
import os
import socket
import threading
import time
from dataclasses import dataclass

from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from pipelines import tracking
from pipelines.executor import current_job_key, interrupt_point
from pipelines.status import RunStatus

GRACE_ENV = "MSA_CLAIM_GRACE_S"
DEFAULT_GRACE_S = 120.0
HEARTBEAT = "heartbeat"            # tag: unix time of the claim's last beat
BEAT_EVERY = "heartbeat_every_s"   # tag: its writer's interval between beats
CLAIMED_BY = "claimed_by"          # tag: host:pid of the process that holds the claim
CLAIM_JOB = "claim_job"            # tag: the executor's job key (the same for a retry of the job)
KILLED_REASON = "killed_reason"    # tag: why a claim was marked KILLED by another process
CLAIM_PROCESS = "claim_process"    # tag: <boot id>/<pid namespace>/<pid>/<start time>: which process,
                                   # where a process on the same machine can tell whether it still runs


def grace_seconds() -> float:
    text = os.environ.get(GRACE_ENV, "").strip()
    if not text:
        return DEFAULT_GRACE_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{GRACE_ENV} must be a number of seconds > 0; got {text!r}")
    return value


def beat_every(grace: float) -> float:
    return min(20.0, max(0.2, grace / 6))


def claim_tags(grace: float | None = None) -> dict[str, str]:
    """The tags that make a new RUNNING run a claim (or a beating parent run)."""
    return {HEARTBEAT: f"{time.time():.3f}", BEAT_EVERY: f"{beat_every(grace or grace_seconds()):g}",
            CLAIMED_BY: f"{socket.gethostname()}:{os.getpid()}", CLAIM_JOB: current_job_key() or "",
            CLAIM_PROCESS: process_identity()}


def _machine() -> str | None:
    """This kernel's boot and this PID namespace, where /proc tells them (Linux), else None. Two processes
    with the same answer see the same PIDs: one can ask whether the other still runs."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        namespace = os.readlink("/proc/self/ns/pid").removeprefix("pid:").strip("[]")
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot and "/" not in boot else None


def _stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of process `pid`, or None when there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()   # after the command name, which may hold spaces
    except (OSError, IndexError):
        return None
    return (fields[0], fields[19]) if len(fields) > 19 else None


def process_identity(pid: int | None = None) -> str:
    """`<boot id>/<pid namespace>/<pid>/<start time>` of process `pid` (default: this one), or "" where
    /proc cannot tell (not Linux)."""
    pid = os.getpid() if pid is None else pid
    machine, stat = _machine(), _stat(pid)
    return f"{machine}/{pid}/{stat[1]}" if machine and stat else ""


def process_ended(identity: str) -> bool:
    """True when the process of `identity` ran on this machine (same boot, same PID namespace) and has
    ended: no such PID, a PID reused by a later process, or a zombie. False when it runs or cannot be
    told from here (another machine or container, no /proc, an empty identity)."""
    boot, namespace, pid, started = ((identity or "").split("/") + [""] * 4)[:4]
    if not (pid.isdigit() and started) or f"{boot}/{namespace}" != _machine():
        return False
    stat = _stat(int(pid))
    return stat is None or stat[1] != started or stat[0] in ("Z", "X")


def process_gone(run: Run) -> bool:
    """`process_ended` for a claim (its `claim_process` tag; a claim made before that tag: False)."""
    return process_ended(run.data.tags.get(CLAIM_PROCESS, ""))


class ClaimLost(KeyboardInterrupt):
    """Raised in a run whose claim no longer holds: it unwinds as an interrupted run does (KILLED)."""


@dataclass
class Taken:
    """A key someone else has: FINISHED there, or being trained there (a live claim)."""

    run: Run
    finished: bool

    def describe(self) -> str:
        if self.finished:
            tags = self.run.data.tags  # the same run key: the same config, data and seed, under any name
            if "ablation" in tags and "seed" in tags:
                return (f"finished already as {tags['ablation']}/seed-{tags['seed']} (run {self.run.info.run_id}: "
                        "the same config, data and seed)")
            return f"finished elsewhere (run {self.run.info.run_id})"
        return (f"running elsewhere: claimed by {self.run.data.tags.get(CLAIMED_BY, '?')} "
                f"(run {self.run.info.run_id})")


def is_claim(run: Run) -> bool:
    return run.info.status == RunStatus.RUNNING and HEARTBEAT in run.data.tags


def staleness(run: Run, grace: float, now: float | None = None) -> float | None:
    """Seconds since a claim's last beat when that is past its grace period, else None (alive)."""
    try:
        age = (now or time.time()) - float(run.data.tags[HEARTBEAT])
        every = float(run.data.tags.get(BEAT_EVERY, 0))
    except (KeyError, ValueError):
        return None
    return age if age > max(grace, 3 * every) else None


def why_stale(run: Run, grace: float, now: float | None = None) -> str | None:
    """Why a claim's process is taken to be dead (the `killed_reason`), or None while it may be alive."""
    who = run.data.tags.get(CLAIMED_BY)
    if process_gone(run):
        return f"its process ({who}) has ended without recording the run"
    age = staleness(run, grace, now)
    return None if age is None else f"no heartbeat for {age:.0f} s (grace {grace:g} s): its process ({who}) died"


def is_live(run: Run, grace: float | None = None) -> bool:
    """A RUNNING claim whose process still beats: another command is working on it now."""
    return is_claim(run) and why_stale(run, grace or grace_seconds()) is None


def mark_killed(client: MlflowClient, run_id: str, reason: str) -> None:
    client.set_tag(run_id, KILLED_REASON, reason)
    client.set_terminated(run_id, RunStatus.KILLED)


def _with_key(client: MlflowClient, experiment_id: str, run_key: str) -> list[Run]:
    return client.search_runs([experiment_id], filter_string=f"tags.run_key = '{run_key}'", max_results=1000)


def _order(run: Run) -> tuple[int, str]:
    return run.info.start_time or 0, run.info.run_id


def _settle_stale(client: MlflowClient, runs: list[Run], grace: float, mine: str | None = None) -> list[Run]:
    """The live claims among `runs`; stale ones, and earlier attempts of this very job (the executor
    only runs a job again when its worker died), are marked KILLED on the way."""
    job, now, live = current_job_key(), time.time(), []
    for run in runs:
        if run.info.run_id == mine:
            live.append(run)
            continue
        if not is_claim(run):
            continue
        reason = why_stale(run, grace, now)
        if job and run.data.tags.get(CLAIM_JOB) == job:
            mark_killed(client, run.info.run_id, f"its worker ({run.data.tags.get(CLAIMED_BY)}) died; "
                                                 "the run was started again")
        elif reason is not None:
            mark_killed(client, run.info.run_id, reason)
        else:
            live.append(run)
    return live


def find_taken(client: MlflowClient, experiment_id: str, run_key: str, grace: float | None = None) -> Taken | None:
    """Before claiming `run_key`: a FINISHED run of it, or the first live claim on it, or None."""
    runs = _with_key(client, experiment_id, run_key)
    finished = list(filter(tracking.reusable, runs))
    if finished:
        return Taken(max(finished, key=_order), True)
    live = _settle_stale(client, runs, grace or grace_seconds())
    return Taken(min(live, key=_order), False) if live else None


def settle(client: MlflowClient, experiment_id: str, run_key: str, run_id: str,
           grace: float | None = None, delete: bool = True) -> Taken | None:
    """After creating claim `run_id`: None when it holds, else who has the key (a FINISHED run, or an
    earlier live claim). A claim that does not hold is deleted when `delete` (it trained nothing)."""
    runs = _with_key(client, experiment_id, run_key)
    finished = [r for r in runs if tracking.reusable(r) and r.info.run_id != run_id]
    live = _settle_stale(client, runs, grace or grace_seconds(), mine=run_id)
    first = min(live, key=_order) if live else None
    taken = Taken(max(finished, key=_order), True) if finished else (
        Taken(first, False) if first is not None and first.info.run_id != run_id else None)
    if taken is not None and delete:
        client.delete_run(run_id)
    return taken


def kill_stale(client: MlflowClient, experiment_id: str, grace: float | None = None) -> int:
    """Mark every stale claim (runs, suite parents, tune sessions) of the experiment KILLED, and every
    RUNNING run without a claim of its own (a study's trial run) whose parent is no longer RUNNING:
    its process died with the parent's. How many."""
    grace = grace or grace_seconds()
    running = client.search_runs([experiment_id], filter_string=f"attributes.status = '{RunStatus.RUNNING}'",
                                 max_results=1000)
    now, alive = time.time(), set()
    for run in running:
        reason = why_stale(run, grace, now) if is_claim(run) else None
        if reason is None:
            alive.add(run.info.run_id)
        else:
            mark_killed(client, run.info.run_id, reason)
    n = len(running) - len(alive)
    for run in running:
        parent = run.data.tags.get(MLFLOW_PARENT_RUN_ID)
        if not is_claim(run) and parent and parent not in alive:
            mark_killed(client, run.info.run_id, f"its parent run {parent} ended while it ran: its process died")
            n += 1
    return n


def wait_for(client: MlflowClient, experiment_id: str, keys: list[str], *, poll: float = 2.0,
             grace: float | None = None) -> dict[str, Run | None]:
    """Wait until each key has a FINISHED run (key -> it) or no live claim any more (key -> None: the
    claim died or failed, so the key is to be redone)."""
    pending, done = list(dict.fromkeys(keys)), {}
    while pending:
        for key in list(pending):
            taken = find_taken(client, experiment_id, key, grace)
            if taken is None or taken.finished:
                done[key] = taken.run if taken else None
                pending.remove(key)
        if pending:
            interrupt_point()
            time.sleep(poll)
    return done


class Heartbeat:
    """Refreshes a run's heartbeat in a thread while the block runs. With `run_key` it also watches
    that the claim holds; `check()` raises ClaimLost when it does not (marked KILLED by a process that
    judged it dead, or an earlier claim on the key seen late, or the key FINISHED elsewhere)."""

    def __init__(self, client: MlflowClient, run_id: str, *, experiment_id: str | None = None,
                 run_key: str | None = None, grace: float | None = None):
        self.client, self.run_id, self.experiment_id, self.run_key = client, run_id, experiment_id, run_key
        self.grace = grace or grace_seconds()
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{run_id[:8]}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def check(self) -> None:
        if self.lost:
            raise ClaimLost(self.lost)

    def _beat(self) -> None:
        while not self._stop.wait(beat_every(self.grace)):
            try:
                self.client.set_tag(self.run_id, HEARTBEAT, f"{time.time():.3f}")
                if self.run_key and not self.lost:
                    self.lost = self._why_lost()
            except Exception:  # a store hiccup: the next beat tries again; a claim outlives `grace` unbeaten
                pass

    def _why_lost(self) -> str | None:
        me = self.client.get_run(self.run_id)
        if me.info.status != RunStatus.RUNNING:
            return f"the claim was marked {me.info.status} by another process: {me.data.tags.get(KILLED_REASON, '')}"
        taken = settle(self.client, self.experiment_id, self.run_key, self.run_id, self.grace, delete=False)
        return f"the run is {taken.describe()}" if taken else None


__all__ = ["GRACE_ENV", "DEFAULT_GRACE_S", "HEARTBEAT", "KILLED_REASON", "CLAIM_PROCESS", "ClaimLost", "Taken",
           "Heartbeat", "grace_seconds", "claim_tags", "is_live", "process_identity", "process_ended", "process_gone",
           "why_stale", "find_taken", "settle", "kill_stale", "wait_for", "mark_killed"]
