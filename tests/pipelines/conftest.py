"""Pipeline tests run against a temporary tracking store and data cache, never the user's."""

import base64
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time

import pytest


def _database_admin(kind: str):
    """An autocommit admin connection to the local PostgreSQL ("postgresql") or MySQL/MariaDB ("mysql")
    server of our machines, or a skip saying why there is none."""
    if kind == "mysql":
        pymysql = pytest.importorskip("pymysql", reason="pymysql is not installed: no MySQL driver")
        try:
            return pymysql.connect(host="127.0.0.1", port=3306, user="root", password="", connect_timeout=3,
                                   autocommit=True)
        except pymysql.err.MySQLError as e:
            pytest.skip(f"no MySQL/MariaDB on 127.0.0.1:3306 with user root and no password ({e})")
    psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed: no PostgreSQL driver")
    try:
        return psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432 with user postgres and trust auth ({str(e).strip()[:200]})")


@pytest.fixture(scope="session")
def database_admin():
    """`database_admin(kind)`: see _database_admin."""
    return _database_admin


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty SQLite tracking store in tmp_path; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return uri


class SuiteRecorder:
    """Records a suite as `pipelines.suite` does, without training: child runs with test metrics and
    predictions (and optionally curves and params), and the parent's suite.json from `SuiteRow.to_json`."""

    def __init__(self, client, experiment_id: str):
        self.client, self.experiment_id = client, experiment_id

    def parent(self, ablations, seeds, *, name: str = "ablations", tags: dict | None = None,
               oracle: dict | None = None) -> str:
        from mlflow.entities import Metric, Param

        pid = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={"suite": "ablations", **(tags or {})}).info.run_id
        self.client.log_batch(pid, params=[Param("ablations", ",".join(ablations)),
                                           Param("seeds", ",".join(map(str, seeds)))],
                              metrics=[Metric(f"oracle_test_{k}", v, 0, 0) for k, v in (oracle or {}).items()])
        return pid

    def child(self, parent_id: str, ablation: str, seed: int, labels, prediction, *, params: dict | None = None,
              curves: dict | None = None, ids=None, oracle=None, tags: dict | None = None):
        """A FINISHED run of (ablation, seed); `curves` maps a metric to its value at epoch 1 (epochs 1-3
        are logged, rising by 0.01 each). Returns its SuiteRow."""
        import pandas as pd
        from mlflow.entities import Metric, Param

        from msa.metrics import eval_mosi_regression
        from pipelines.status import RunStatus
        from pipelines.suite import SuiteRow

        key = f"{ablation}-{seed}"
        rid = self.client.create_run(self.experiment_id, run_name=f"{ablation}/seed-{seed}", tags={
            "mlflow.parentRunId": parent_id, "ablation": ablation, "seed": str(seed), "run_key": key,
            **(tags or {})}).info.run_id
        test = eval_mosi_regression(prediction, labels)
        history = [Metric(k, v + 0.01 * epoch, 0, epoch) for epoch in (1, 2, 3) for k, v in (curves or {}).items()]
        self.client.log_batch(rid, metrics=history + [Metric(f"test_{k}", v, 0, 0) for k, v in test.items()],
                              params=[Param(k, str(v)) for k, v in ({**(params or {}), "seed": seed}).items()])
        frame = pd.DataFrame({"id": ids if ids is not None else [str(i) for i in range(len(labels))],
                              "label": labels, "prediction": prediction})
        if oracle is not None:
            frame["oracle"] = oracle
        self.client.log_text(rid, frame.to_csv(index=False), "test_predictions.csv")
        self.client.set_terminated(rid, "FINISHED")
        return SuiteRow(ablation, seed, key, rid, RunStatus.FINISHED, test)

    def validated(self, run_id: str, key: str, by_epoch: dict[int, float], best_epoch: int) -> None:
        """Log a validation curve (epoch -> value) and the epoch whose checkpoint the run kept."""
        from mlflow.entities import Metric

        self.client.log_batch(run_id, metrics=[Metric(key, v, 0, e) for e, v in by_epoch.items()]
                              + [Metric("best_epoch", best_epoch, 0, 0)])

    def model(self, run_id: str, ablation: str, seed: int, data, *, model: dict | None = None) -> str:
        """Log a small untrained msa model on the run exactly as a suite's worker does; returns its model id."""
        from msa.config import RunConfig
        from msa.models import build_model
        from pipelines.stages.train import RunTask, _log_model

        config = RunConfig.from_dict({"model": {"hidden": 8, "ff_dim": 16, **(model or {})}})
        task = RunTask(ablation, seed, config, f"{ablation}-{seed}", self.experiment_id, None, "")
        return _log_model(run_id, task, build_model(config.model, data.dims).eval(), data, config.flat())

    @staticmethod
    def failed(ablation: str, seed: int, error: str = "RuntimeError: boom"):
        from pipelines.status import RunStatus
        from pipelines.suite import SuiteRow

        return SuiteRow(ablation, seed, f"{ablation}-{seed}", None, RunStatus.FAILED, {}, error)

    def finish(self, parent_id: str, rows) -> None:
        from pipelines.suite import SUITE_FILE

        self.client.log_text(parent_id, json.dumps([r.to_json() for r in rows]), SUITE_FILE)
        self.client.set_terminated(parent_id, "FINISHED")


@pytest.fixture(scope="session")
def suite_recorder():
    """`suite_recorder(client, experiment_id)`: a SuiteRecorder on that store (shared by every test
    that needs a recorded suite without training one)."""
    return SuiteRecorder


class Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`: JSON
    messages ended by NUL on fds 3 and 4), so no port is opened and nothing beyond the standard library
    is needed. `open(url)` loads a page and records its console errors, uncaught exceptions and failed
    loads; `evaluate` runs JavaScript in it; `screenshot` saves a PNG."""

    def __init__(self, exe: str, profile: str, width: int = 1400, height: int = 900):

        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def wire() -> None:  # in the child, before exec: the pipe ends become fds 3 and 4
            os.dup2(to_child, 3)
            os.dup2(from_child, 4)

        self.proc = subprocess.Popen(
            [exe, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--mute-audio", f"--user-data-dir={profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire, pass_fds=(3, 4), start_new_session=True)
        os.close(to_child)
        os.close(from_child)
        self._next, self._replies, self.events = 0, {}, queue.Queue()
        self._lock = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable", session=True)
        self.send("Emulation.setDeviceMetricsOverride", session=True, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def _read(self) -> None:

        buffer = b""
        while chunk := os.read(self._r, 1 << 16):
            buffer += chunk
            *messages, buffer = buffer.split(b"\0")
            for raw in messages:
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        self._replies[message["id"]] = message
                        self._lock.notify_all()
                else:
                    self.events.put(message)

    def send(self, method: str, *, session: bool = False, timeout: float = 30, **params):

        with self._lock:
            self._next += 1
            call = self._next
        message = {"id": call, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        with self._lock:
            if not self._lock.wait_for(lambda: call in self._replies, timeout):
                raise TimeoutError(f"Chromium did not answer {method} within {timeout} s")
            reply = self._replies.pop(call)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def open(self, url: str, timeout: float = 60) -> list[str]:
        """Load `url` and wait for its load event; returns the page's errors so far (console errors,
        uncaught exceptions, failed resource loads), one line each."""
        self.errors: list[str] = []
        if "loaderId" not in self.send("Page.navigate", session=True, url=url):
            return self.drain()  # a same-document navigation (another #route of a single-page app): no load event
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.events.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"{url} did not finish loading within {timeout} s") from None
            self._note(event)
            if event.get("method") == "Page.loadEventFired":
                return self.drain()

    def drain(self) -> list[str]:
        """The errors recorded so far, after taking in every event that has arrived."""
        while True:
            try:
                self._note(self.events.get_nowait())
            except queue.Empty:
                return list(self.errors)

    def _note(self, event: dict) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.errors.append("exception: " + details.get("exception", {}).get("description", details["text"]))
        elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
            args = (str(a.get("value", a.get("description"))) for a in params["args"])
            self.errors.append("console: " + " ".join(args))
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            self.errors.append(f"log: {params['entry']['text']} {params['entry'].get('url', '')}".strip())

    def evaluate(self, expression: str, timeout: float = 30):
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.send("Runtime.evaluate", session=True, timeout=timeout, expression=expression,
                           returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:60]}...: {result['exceptionDetails']['text']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60) -> None:
        """Poll until `expression` is truthy (a single-page app renders after its load event)."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression} still false after {timeout} s")
            time.sleep(0.25)

    def screenshot(self, path, full_page: bool = False) -> None:

        shot = self.send("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=full_page)
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:

        try:
            self.send("Browser.close", timeout=5)
        except (OSError, TimeoutError, RuntimeError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        os.close(self._w)


def chromium_executable() -> str | None:
    """Debian's `chromium` (what .ci/run installs), or another Chromium/Chrome on PATH; $MSA_CHROMIUM wins."""
    names = [os.environ.get("MSA_CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"]
    return next((found for name in names if name and (found := shutil.which(name))), None)


@pytest.fixture
def browser(tmp_path):
    """A headless Chromium for this test (skipped, saying why, where none can be had)."""
    exe = chromium_executable()
    if exe is None:
        pytest.skip("no Chromium on PATH (Debian: apt-get install chromium; or set MSA_CHROMIUM)")
    try:
        chrome = Chromium(exe, str(tmp_path / "chromium-profile"))
    except (OSError, TimeoutError, RuntimeError) as e:
        pytest.skip(f"{exe} cannot start headless here: {e}")
    try:
        yield chrome
    finally:
        chrome.close()
