"""The real `mlflow server` on the project's store layout serves a suite's runs and its comparison."""

import csv
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines import tracking
from pipelines.stages.compare import compare

EXPERIMENT = "server-suite"
STARTUP_SECONDS = 60


def _suite(recorder):
    """A two-ablation, two-seed suite with predictions, as pipelines.suite records one."""
    rng = np.random.default_rng(0)
    labels = np.round(rng.uniform(-3, 3, 200) * 5) / 5
    pid = recorder.parent(["baseline", "text_only"], [1, 2], tags={"synthetic": "true"})
    # An MAE difference far beyond what two seeds a side leave room for (t at about 1 degree of freedom).
    rows = [recorder.child(pid, ablation, seed, labels, labels + np.random.default_rng(seed).normal(0, sd, 200))
            for ablation, sd in (("baseline", 1.0), ("text_only", 0.1)) for seed in (1, 2)]
    recorder.finish(pid, rows)
    return pid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, route: str, **query) -> bytes:
    url = f"{base}{route}" + ("?" + urllib.parse.urlencode(query) if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


def _post(base: str, route: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}{route}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def _wait_healthy(base: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if _get(base, "/health").strip() == b"OK":
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.3)
    pytest.fail(f"mlflow server did not answer /health within {STARTUP_SECONDS} s")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the workers it spawned (its own process group, started by this test)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)


def _compose_allowed_hosts() -> str:
    """The host names docker/compose.yaml's mlflow server accepts: tested here on a real server."""
    import yaml

    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker" / "compose.yaml").read_text())
    command = compose["services"]["mlflow"]["command"]
    return command[command.index("--allowed-hosts") + 1]


@pytest.fixture
def server(tmp_path, monkeypatch, suite_recorder):
    """A suite + comparison in a fresh default-layout store, served by `mlflow server` on loopback."""
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    client, exp_id = tracking.setup(EXPERIMENT)  # creates the schema before the server opens the file

    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}",
           "--default-artifact-root", str(store / "artifacts"), "--allowed-hosts", _compose_allowed_hosts()]
    # The server's job runner (GenAI jobs) would start seven more processes this test never uses.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pid = _suite(suite_recorder(client, exp_id))  # written while the server boots: it only reads the store
        compare(client, exp_id, n_boot=200)
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(base, proc)
        yield {"base": base, "parent": pid}
    finally:
        _stop(proc)


def test_server_lists_the_suite_runs_and_serves_the_comparison(server):
    base, pid = server["base"], server["parent"]
    exp = json.loads(_get(base, "/api/2.0/mlflow/experiments/get-by-name", experiment_name=EXPERIMENT))["experiment"]
    runs = _post(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})
    runs = runs["runs"]
    names = sorted(r["info"]["run_name"] for r in runs if r["info"]["run_id"] != pid)
    assert names == ["baseline/seed-1", "baseline/seed-2", "text_only/seed-1", "text_only/seed-2"]
    parent = next(r for r in runs if r["info"]["run_id"] == pid)
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert tags["suite"] == "ablations" and tags["comparison"] == "comparison/report.html"
    children = [r for r in runs if r["info"]["run_id"] != pid]
    assert all({t["key"]: t["value"] for t in r["data"]["tags"]}["mlflow.parentRunId"] == pid for r in children)

    listed = json.loads(_get(base, "/api/2.0/mlflow/artifacts/list", run_id=pid, path="comparison"))
    assert {f["path"] for f in listed["files"]} == {"comparison/comparison.csv", "comparison/comparison.md",
                                                    "comparison/report.html"}
    table = list(csv.DictReader(io.StringIO(
        _get(base, "/get-artifact", path="comparison/comparison.csv", run_uuid=pid).decode("utf-8"))))
    assert [row["ablation"] for row in table] == ["baseline", "text_only"]   # no oracle logged: no oracle row
    assert table[1]["MAE_mark"] == "▲" and table[1]["Corr_mark"] in ("▲", "~")   # two seeds a side: t is wide
    page = _get(base, "/get-artifact", path="comparison/report.html", run_uuid=pid).decode("utf-8")
    assert "data:image/png;base64," in page
    _compose_host_names_are_let_in_and_others_are_not(server)


def _compose_host_names_are_let_in_and_others_are_not(server):
    """docker/compose.yaml's clients reach the server as http://mlflow:5000: MLflow >= 3.5 answers 403 to
    a Host header it was not given, so the compose file must name it. (On the same server as the test
    above: starting one takes 10-25 s on 2 cores.)"""
    compose = yaml.safe_load((Path(__file__).resolve().parents[2] / "docker" / "compose.yaml").read_text())
    client_host = urllib.parse.urlsplit(compose["x-pipeline"]["environment"]["MLFLOW_TRACKING_URI"]).netloc

    def status(host: str) -> int:
        request = urllib.request.Request(f"{server['base']}/api/2.0/mlflow/experiments/get-by-name?"
                                         f"experiment_name={EXPERIMENT}", headers={"Host": host})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(client_host) == 200 and status("localhost:5000") == 200
    assert status("elsewhere.example:5000") == 403
