"""A careless user and a flaky machine: every mistake is one line on stderr, exit 2, and nothing is
written to any store. Each case: what the user did, the words the line must hold."""

import json
import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest

from pipelines.run import main

SPEC = "experiment: unit\nseeds: [7]\nablations:\n  baseline: {}\n"


def _spec(tmp: Path, text: str) -> str:
    path = tmp / "spec.yaml"
    path.write_text(text)
    return str(path)


def _data_with(tmp: Path, **change) -> str:
    """A small MultiBench-layout pickle with one array of the train split replaced."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", 8), ("valid", 4), ("test", 4)):
        splits[split] = {"vision": rng.normal(size=(n, 5, 35)).astype(np.float32),
                         "text": rng.normal(size=(n, 5, 300)).astype(np.float32),
                         "audio": rng.normal(size=(n, 5, 74)).astype(np.float32),
                         "labels": rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32),
                         "id": np.array([f"v{i}" for i in range(n)])}
    splits["train"].update(change)
    path = tmp / "mosi.pkl"
    path.write_bytes(pickle.dumps(splits))
    return str(path)


def _garbage(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(4096))
    return str(path)


def _older_store(tmp: Path) -> dict[str, str]:
    """A tracking store whose schema an older MLflow wrote (its first revision)."""
    import sqlite3

    from pipelines.cache import seed_sqlite_store

    uri = f"sqlite:///{tmp / 'old' / 'mlflow.db'}"
    (tmp / "old").mkdir()
    seed_sqlite_store(uri)
    with sqlite3.connect(tmp / "old" / "mlflow.db") as db:
        db.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")
    return {"MLFLOW_TRACKING_URI": uri}


# (name, setup(tmp) -> (argv, env), words expected in the one line)
CASES = [
    ("ablation written as a list",
     lambda t: (["ablations", "--spec", _spec(t, SPEC.replace("baseline: {}", "baseline: [1, 2]"))], {}),
     "'ablations.baseline' must be a mapping"),
    ("model section not a mapping",
     lambda t: (["ablations", "--spec", _spec(t, SPEC.replace("baseline: {}", "baseline: {model: 3}"))], {}),
     "'model' must be a mapping"),
    ("base model section not a mapping",
     lambda t: (["ablations", "--spec", _spec(t, SPEC + "base: {model: lstm}\n")], {}),
     "base: 'model' must be a mapping of field -> value, got 'lstm'"),
    ("base as empty text", lambda t: (["ablations", "--spec", _spec(t, SPEC + "base: ''\n")], {}),
     "'base' must be a mapping"),
    ("a number YAML reads as text",
     lambda t: (["ablations", "--spec", _spec(t, SPEC.replace("baseline: {}", "baseline: {train: {lr: 1e-4}}"))], {}),
     "YAML reads 1e-4 as text"),
    ("an ablation named as the tuned model",
     lambda t: (["ablations", "--spec", _spec(t, SPEC + "  improved_tuned: {}\n")], {}), "the tuned model's"),
    ("spec is a pickle", lambda t: (["ablations", "--spec", _data_with(t)], {}), "not a YAML text file"),
    ("a bundled spec named from another folder",
     lambda t: (["ablations", "--spec", "pipelines/specs/fusions.yaml", "--quick"], {}),
     "no such spec file (the bundled one is "),
    ("spec given empty", lambda t: (["ablations", "--spec", ""], {}), "must be a file path, got an empty one"),
    ("quick seeds not a list", lambda t: (["ablations", "--spec", _spec(t, SPEC + "quick: {seeds: foo}\n")], {}),
     "'quick.seeds' must be a non-empty list of integers"),
    ("quick seeds as text", lambda t: (["ablations", "--spec", _spec(t, SPEC + "quick: {seeds: '12'}\n")], {}),
     "'quick.seeds' must be a non-empty list of integers"),
    ("quick seeds empty", lambda t: (["ablations", "--spec", _spec(t, SPEC + "quick: {seeds: []}\n")], {}),
     "'quick.seeds' must be a non-empty list"),
    ("quick epochs zero", lambda t: (["ablations", "--spec", _spec(t, SPEC + "quick: {epochs: 0}\n")], {}),
     "'quick.epochs' must be a positive integer"),
    ("a seed out of range in the spec",
     lambda t: (["ablations", "--spec", _spec(t, SPEC.replace("[7]", "[-1]"))], {}), "in [0, 2**32)"),
    ("experiment null", lambda t: (["ablations", "--spec", _spec(t, SPEC.replace("unit", "null"))], {}),
     "'experiment' must be a name"),
    ("ablation name with a slash",
     lambda t: (["ablations", "--spec", _spec(t, SPEC + "  a/b: {}\n")], {}), "'ablations' must be an ablation name"),
    ("negative seed", lambda t: (["ablations", "--quick", "--seeds", "-5"], {}), "must be in [0, 2**32), got -5"),
    ("seed not a number", lambda t: (["ablations", "--quick", "--seeds", "foo"], {}), "must be a whole number"),
    ("zero workers", lambda t: (["ablations", "--quick", "--workers", "0"], {}), "must be at least 1"),
    ("zero epochs", lambda t: (["ablations", "--quick", "--epochs", "0"], {}), "must be at least 1"),
    ("negative timeout", lambda t: (["tune", "--quick", "--timeout", "-5"], {}), "positive number of seconds"),
    ("study name that is a path", lambda t: (["tune", "--quick", "--study", "../elsewhere"], {}),
     "argument --study: must be a name of letters, digits"),
    ("study storage is a folder", lambda t: (["tune", "--quick", "--storage", str(t)], {}), "is a folder"),
    ("study storage is not a journal",
     lambda t: (["tune", "--quick", "--storage", _garbage(t / "junk.log")], {}), "is not an Optuna journal file"),
    ("study storage is a garbage SQLite file",
     lambda t: (["tune", "--quick", "--storage", f"sqlite:///{_garbage(t / 'optuna.db')}"], {}),
     "is not an SQLite database"),
    ("study storage without its driver",
     lambda t: (["tune", "--quick", "--storage", "mysql://u@127.0.0.1/db"], {}), "cannot be opened"),
    ("tracking store is random bytes",
     lambda t: (["ablations", "--quick"], {"MLFLOW_TRACKING_URI": f"sqlite:///{_garbage(t / 'db' / 'mlflow.db')}"}),
     "is not an SQLite database"),
    ("tracking store is random bytes, tune",
     lambda t: (["tune", "--quick"], {"MLFLOW_TRACKING_URI": f"sqlite:///{_garbage(t / 'db' / 'mlflow.db')}"}),
     "is not an SQLite database"),
    ("tracking store is random bytes, compare",
     lambda t: (["compare"], {"MLFLOW_TRACKING_URI": f"sqlite:///{_garbage(t / 'db' / 'mlflow.db')}"}),
     "is not an SQLite database"),
    ("tracking store is a folder",
     lambda t: (["ablations", "--quick"], {"MLFLOW_TRACKING_URI": f"sqlite:///{t}"}), "is a folder"),
    ("report folder is a file",
     lambda t: ((t / "work" / "reports").write_text("x") and ["ablations", "--quick"], {}), "is a file, not a folder"),
    ("tracking server unreachable",
     lambda t: (["ablations", "--quick"], {"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}), "does not answer"),
    ("data: ids are ints",
     lambda t: (["ablations", "--quick", "--data", _data_with(t, id=np.int64(3))], {}), "'id'"),
    ("data: sequences of 0 steps",
     lambda t: (["ablations", "--quick", "--data", _data_with(t, audio=np.zeros((8, 0, 74), np.float32))], {}),
     "0 steps"),
    ("data: labels out of range",
     lambda t: (["ablations", "--quick", "--data", _data_with(t, labels=np.full((8, 1, 1), 9.0, np.float32))], {}),
     "[-3, 3]"),
    ("predict to an empty --out", lambda t: (["predict", "--model", "models:/m@champion", "--out", ""], {}),
     "--out is empty: give the CSV file to write"),
    ("compare on a store of an older MLflow", lambda t: (["compare"], _older_store(t)),
     "cannot be read (Detected out-of-date database schema"),
    ("predict from a store of an older MLflow",
     lambda t: (["predict", "--model", "models:/msa-ablations@champion"], _older_store(t)),
     "cannot be read (Detected out-of-date database schema"),
    ("predict from a store that is not there",
     lambda t: (["predict", "--model", "models:/msa-ablations@champion"], {}), "no tracking store at"),
    ("study storage URL with a port that is not a number",
     lambda t: (["tune", "--quick", "--storage", "postgresql://USER@127.0.0.1:PORT/DB"], {}), "cannot be opened"),
    ("data file missing", lambda t: (["ablations", "--quick", "--data", str(t / "nope.pkl")], {}), "no such file"),
]


@pytest.mark.parametrize("name, make, words", CASES, ids=[c[0] for c in CASES])
def test_a_mistake_is_one_line_exit_2_and_nothing_is_written(name, make, words, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("MSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    argv, env = make(tmp_path)
    capsys.readouterr()                                             # what making the case printed
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts}
    start = time.monotonic()
    rc = main(argv)
    seconds = time.monotonic() - start
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert words in err, err
    assert "Traceback" not in err
    assert seconds < 15, f"took {seconds:.1f} s"
    assert not (work / "mlruns").exists(), "a store was created"     # no store, study or parent run written
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file() and "cache" not in p.parts}
    assert after == before, "a file was created or modified"


def test_a_web_server_that_is_not_mlflow_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """A wrong port in MLFLOW_TRACKING_URI that some other web server answers: told before any data is
    loaded, not a traceback with the other server's HTML page after it."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the server's request log would land in the stderr checked below
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.chdir(tmp_path)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{server.server_port}")
        for argv in (["compare"], ["ablations", "--quick"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "answers, but not as an MLflow server (HTTP 404" in err, err
            assert "synthetic" not in err
    finally:
        server.shutdown()
        server.server_close()


def test_help_still_exits_0(capsys):
    assert main(["ablations", "--help"]) == 0
    assert "--seeds" in capsys.readouterr().out


def test_help_and_a_mistyped_option_answer_without_importing_torch_or_mlflow(tmp_path):
    """Parsing the command line imports no heavy library: `--help` and a typo answer at once, not after
    the seconds that torch and MLflow take to import on a small machine. A mistake in a spec is found
    before MLflow is imported (validating a config reads the model registry, so torch is)."""
    import subprocess
    import sys

    script = """
import contextlib, io, json, sys
from pipelines.run import main
seen = []
for argv in json.loads(sys.argv[1]):
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(argv)
    seen.append([argv, code, sorted(m for m in ("torch", "mlflow", "optuna", "dask", "pandas") if m in sys.modules)])
print(json.dumps(seen))
"""
    argvs = [["--help"], ["ablations", "--help"], ["tune", "--help"], ["compare", "--help"], ["predict", "--help"],
             ["prepare", "--help"], ["ablations", "--seeds", "foo"], ["tune", "--timeout", "-5"], ["nonsense"]]
    typo = SPEC.replace("baseline: {}", "baseline: {model: {hiden: 3}}")
    bad_spec = ["ablations", "--quick", "--spec", _spec(tmp_path, typo)]
    done = subprocess.run([sys.executable, "-c", script, json.dumps([*argvs, bad_spec])], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [[argv, 0 if "--help" in argv else 2, []] for argv in argvs] + [
        [bad_spec, 2, ["torch"]]]


def test_a_server_that_refuses_the_host_name_says_which_option_lets_it_in(monkeypatch, capsys):
    """MLflow >= 3.5 answers 403 'Invalid Host header' to a name it was not given (`http://mlflow:5000`
    in a compose network): the line says which server option lets it in."""
    import http.server
    import threading

    class RefusesHost(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"Invalid Host header - possible DNS rebinding attack detected"
            self.send_response(403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusesHost)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://localhost:{server.server_port}")
        assert main(["compare"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"--allowed-hosts localhost:{server.server_port}" in err, err
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("text, said", [
    # an ablation pasted twice under one name: plain YAML keeps the second silently
    ("experiment: unit\nablations:\n  baseline: {}\n  text_only:\n    model: {modalities: [text]}\n"
     "  text_only:\n    model: {hidden: 128}\n", "line 6, column 3: not valid YAML ('text_only' is given twice"),
    # a brace left off: where it is, not only that it is
    ("experiment: unit\nablations:\n  baseline: {}\n  loss_mae:\n    train: {loss: l1\n",
     "line 6, column 1: not valid YAML (expected ',' or '}'"),
])
def test_a_spec_that_is_not_valid_yaml_says_where(tmp_path, capsys, text, said):
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    assert main(["ablations", "--spec", str(spec), "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {spec} {said}") and err.count("\n") == 1, err
