"""The tested topology (docker/compose.yaml, without Docker): a PostgreSQL-backed `mlflow server` that
serves artifacts, a Dask scheduler and two worker processes, each with its own working directory and
HOME, and suites that reach them only through their addresses. Every server binds to 127.0.0.1.

Needs PostgreSQL on 127.0.0.1:5432 (user postgres, trust auth); each module run creates its own
databases and drops them. `.ci/run` runs these as their own step: `pytest -m cluster`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]       # the code under test, for every process started here
POSTGRES = "postgresql://postgres@127.0.0.1:5432"
STARTUP_S = 180
SPEC = """\
experiment: {experiment}
seeds: {seeds}
base:
  model: {{hidden: 8, ff_dim: 16}}
ablations:
  baseline: {{}}
  text_only: {{model: {{modalities: [text]}}}}
  audio_only: {{model: {{modalities: [audio]}}}}
{extra}quick: {{epochs: 1, seeds: {seeds}}}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """The servers this module starts, each in a process group of its own, stopped at the end."""

    def __init__(self, logs: Path):
        self.logs, self.procs = logs, {}
        logs.mkdir(parents=True)

    def start(self, name: str, cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        cwd.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "w") as log:
            self.procs[name] = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)
        return self.procs[name]

    def check(self, name: str) -> None:
        if self.procs[name].poll() is not None:
            pytest.fail(f"{name} exited with {self.procs[name].returncode}: "
                        f"{(self.logs / f'{name}.log').read_text()[-3000:]}")

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=20)


@dataclass
class Topology:
    tmp: Path
    tracking_uri: str
    scheduler: str
    optuna_storage: str
    env: dict[str, str]                    # a client's environment: the tracking URI, nothing local shared
    workers: tuple[Path, ...]              # the workers' working directories (HOME inside)

    def worker_pids(self) -> set[int]:
        from distributed import Client

        with Client(self.scheduler, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(2, timeout=120)  # a killed worker is back (its nanny restarts it)
            return set(client.run(os.getpid).values())

    def spec(self, name: str, seeds: str = "[7]", extra: str = "") -> Path:
        path = self.tmp / f"{name}.yaml"
        path.write_text(SPEC.format(experiment=name, seeds=seeds, extra=extra))
        return path

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """`python -m pipelines.run <args> --scheduler <it>` from a working directory of its own."""
        cwd = self.tmp / f"client-{name}"
        cwd.mkdir(exist_ok=True)
        return subprocess.Popen([sys.executable, "-m", "pipelines.run", *args, "--scheduler", self.scheduler],
                                cwd=cwd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_healthy(url: str, procs: Processes, name: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        procs.check(name)
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.read().strip() == b"OK":
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{name} did not answer {url}/health within {STARTUP_S} s")


@pytest.fixture(scope="module")
def topology(tmp_path_factory, database_admin) -> Topology:
    admin = database_admin("postgresql")
    tmp = tmp_path_factory.mktemp("cluster")
    tag = uuid.uuid4().hex[:10]
    databases = {"mlflow": f"msa_test_{tag}_mlflow", "optuna": f"msa_test_{tag}_optuna"}
    for db in databases.values():
        admin.execute(f'CREATE DATABASE "{db}"')
    procs = Processes(tmp / "logs")
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MSA_SCHEDULER", "MSA_CACHE")}
    base |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
             "MSA_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    try:
        port = _free_port()
        tracking_uri = f"http://127.0.0.1:{port}"
        procs.start("mlflow", [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                               "--workers", "1", "--backend-store-uri", f"{POSTGRES}/{databases['mlflow']}",
                               "--artifacts-destination", str(tmp / "served-artifacts"), "--serve-artifacts"],
                    tmp / "server", {**base, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        scheduler_file = tmp / "scheduler.json"
        procs.start("scheduler", [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                  "--port", "0", "--dashboard-address", "127.0.0.1:0",
                                  "--scheduler-file", str(scheduler_file)], tmp / "scheduler", base)
        deadline = time.monotonic() + STARTUP_S
        while not scheduler_file.exists() and time.monotonic() < deadline:
            procs.check("scheduler")
            time.sleep(0.2)
        scheduler = json.loads(scheduler_file.read_text())["address"]
        workers = tuple(tmp / f"worker-{i}" for i in (1, 2))
        for w in workers:
            procs.start(w.name, [sys.executable, "-m", "distributed.cli.dask_worker", scheduler, "--host", "127.0.0.1",
                                 "--nworkers", "1", "--nthreads", "1", "--dashboard-address", "127.0.0.1:0",
                                 "--local-directory", str(w / "dask"), "--name", w.name],
                        w, {**base, "HOME": str(w / "home")})
        _wait_healthy(tracking_uri, procs, "mlflow")
        env = {**base, "MLFLOW_TRACKING_URI": tracking_uri, "MSA_CACHE": str(tmp / "client-cache")}
        topology = Topology(tmp, tracking_uri, scheduler, f"{POSTGRES}/{databases['optuna']}", env, workers)
        topology.worker_pids()
        yield topology
    finally:
        procs.stop_all()
        for db in databases.values():
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        admin.close()


def _finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}"
    return out + err


def _children(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id], max_results=1000) if "ablation" in r.data.tags]


def _suite_rows(client: MlflowClient, experiment: str) -> list[list[dict]]:
    exp = client.get_experiment_by_name(experiment)
    parents = [r for r in client.search_runs([exp.experiment_id]) if "suite" in r.data.tags]
    return [json.loads(Path(client.download_artifacts(p.info.run_id, "suite.json")).read_text()) for p in parents]


def test_the_quick_suite_runs_on_the_workers_and_everything_goes_through_the_server(topology, monkeypatch):
    import mlflow
    import torch

    out = _finish(topology.start("e2e", "ablations", "--spec", str(topology.spec("e2e")), "--quick"))
    client = MlflowClient(topology.tracking_uri)
    children = _children(client, "e2e")
    assert sorted(r.data.tags["ablation"] for r in children) == ["audio_only", "baseline", "text_only"]
    assert {r.info.status for r in children} == {"FINISHED"}
    pids = {int(r.data.tags["claimed_by"].rsplit(":", 1)[1]) for r in children}
    assert pids <= topology.worker_pids()                                   # trained on the workers

    run = next(r for r in children if r.data.tags["ablation"] == "text_only")
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"test_predictions.csv", "loss_curve.png", "tensorboard"} <= names
    assert any("events.out.tfevents" in a.path for a in client.list_artifacts(run.info.run_id, "tensorboard"))
    predictions = Path(client.download_artifacts(run.info.run_id, "test_predictions.csv")).read_text()
    assert predictions.splitlines()[0] == "id,label,prediction,oracle"
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    mlflow.set_tracking_uri(topology.tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/text_only-seed-{run.data.tags['seed']}")
    assert model(torch.randn(2, 9, 300)).shape == (2,)

    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["comparison"] == "comparison/report.html"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")} >= {"comparison/report.html"}
    assert "Curves: mlflow artifacts download -r " in out and "tensorboard --logdir" in out
    for place in (*topology.workers, topology.tmp / "client-e2e"):           # nothing written beside anyone
        assert not (place / "mlruns").exists(), place


def test_the_workers_say_what_devices_and_bf16_they_have(topology):
    import torch

    from msa.training import bf16_supported
    from pipelines.cluster import cluster_devices

    found = cluster_devices(topology.scheduler)
    # Both workers run on this machine: no GPU declared, this CPU's answer on bf16, none for CUDA.
    assert found == (0, 0, {"cpu": bf16_supported(torch.device("cpu")), "cuda": None})


def test_two_suites_started_at_once_train_each_run_exactly_once(topology):
    spec = str(topology.spec("twice", seeds="[7, 8]", extra="  vision_only: {model: {modalities: [vision]}}\n"))
    client = MlflowClient(topology.tracking_uri)
    client.create_experiment("twice")  # the suites race for the runs; the experiment's first use is not this test's
    # Started together, so that each opens its parent while the other's is live: one started after the
    # other had finished (seen on a loaded machine) would rightly resume the first's parent, all CACHED.
    first = topology.start("twice-1", "ablations", "--spec", spec, "--quick")
    second = topology.start("twice-2", "ablations", "--spec", spec, "--quick")
    _finish(first), _finish(second)

    children = _children(client, "twice")
    finished = sorted((r.data.tags["ablation"], r.data.tags["seed"]) for r in children if r.info.status == "FINISHED")
    assert finished == sorted((a, s) for a in ("audio_only", "baseline", "text_only", "vision_only")
                              for s in ("7", "8"))                           # each exactly once
    assert "RUNNING" not in {r.info.status for r in children}
    suites = _suite_rows(client, "twice")
    assert len(suites) == 2 and all(row["status"] in ("FINISHED", "CACHED") for rows in suites for row in rows)
    assert sum(row["status"] == "FINISHED" for rows in suites for row in rows) == 8   # trained once in all


def test_a_worker_killed_mid_run_has_its_run_killed_and_redone_while_the_suite_goes_on(topology):
    spec = str(topology.spec("kill"))
    suite = topology.start("kill", "ablations", "--spec", spec, "--quick", "--epochs", "15",
                           "--only", "baseline", "text_only")
    client = MlflowClient(topology.tracking_uri)
    victim, deadline = None, time.monotonic() + 180
    while victim is None and time.monotonic() < deadline and suite.poll() is None:
        time.sleep(0.3)
        if client.get_experiment_by_name("kill") is None:
            continue
        for run in _children(client, "kill"):
            if run.info.status == "RUNNING" and client.get_metric_history(run.info.run_id, "val_loss"):
                victim = run
                break
    assert victim is not None, suite.communicate(timeout=60)
    pid = int(victim.data.tags["claimed_by"].rsplit(":", 1)[1])
    assert pid in topology.worker_pids()                  # a worker process this module started
    os.kill(pid, signal.SIGKILL)
    _finish(suite)

    dead = client.get_run(victim.info.run_id)
    assert dead.info.status == "KILLED" and "died" in dead.data.tags["killed_reason"]
    children = _children(client, "kill")
    assert "RUNNING" not in {r.info.status for r in children}
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["ablation"] for r in finished) == ["baseline", "text_only"]
    assert victim.data.tags["run_key"] in {r.data.tags["run_key"] for r in finished}   # redone


TUNE = """\
study: cluster
ablations: {ablations}
base: baseline
seeds: [7]
trials: 4
sampler: {{seed: 1, n_startup_trials: 10}}
pruner: {{type: none}}
storage: {{heartbeat_interval: 5, grace_period: 60, max_retry: 1}}
compare_with: [baseline]
quick: {{trials: 4}}
space:
  model.hidden: {{choices: [8, 16]}}
  train.lr:     {{float: [1.0e-3, 1.0e-2], log: true}}
"""


def test_tune_on_two_dask_workers_and_postgresql_records_each_trial_once_in_both_stores(topology):
    import optuna

    ablations = topology.spec("tune-cluster")
    spec = topology.tmp / "tune.yaml"
    spec.write_text(TUNE.format(ablations=ablations))
    _finish(topology.start("tune", "tune", "--spec", str(spec), "--quick", "--workers", "2",
                           "--storage", topology.optuna_storage))
    study = optuna.load_study(study_name="cluster-quick", storage=topology.optuna_storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    client = MlflowClient(topology.tracking_uri)
    exp = client.get_experiment_by_name("tune-cluster")
    trials = [r for r in client.search_runs([exp.experiment_id]) if "optuna_trial" in r.data.tags]
    assert sorted(int(r.data.tags["optuna_trial"]) for r in trials) == [0, 1, 2, 3]
    workers = {t.user_attrs["worker"].split(":")[1] for t in study.trials}
    assert {int(w) for w in workers} <= topology.worker_pids()
    assert "RUNNING" not in {r.info.status for r in client.search_runs([exp.experiment_id])}
