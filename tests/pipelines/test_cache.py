"""A new local store starts as a copy of an empty one: the same store MLflow would have made, at once."""

import sqlite3

from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.cache import cache_dir, seed_sqlite_store


def test_a_new_store_is_a_copy_that_mlflow_opens_as_its_own(store, tmp_path, capfd):
    client, exp_id = tracking.setup("seeded")
    assert "Creating initial MLflow database tables" not in capfd.readouterr().err   # the template, made quietly
    db = tmp_path / "mlruns" / "mlflow.db"
    assert db.exists() and list(cache_dir().glob("mlflow-*-empty-store.db"))
    default = client.get_experiment("0")  # MLflow's Default experiment, made for this store, not the template's
    assert default.name == "Default" and str(tmp_path / "mlruns") in default.artifact_location
    assert client.get_experiment(exp_id).name == "seeded"
    rid = tracking.start_run(client, exp_id, "r", tags={"k": "v"})
    with tracking.recorded_run(client, rid):
        tracking.log_metrics(client, rid, {"x": 1.0})
    assert MlflowClient(store).get_run(rid).data.metrics == {"x": 1.0}


def test_an_existing_store_or_a_server_is_left_alone(store, tmp_path):
    db = tmp_path / "mlruns" / "mlflow.db"
    db.parent.mkdir()
    sqlite3.connect(db).close()
    before = db.read_bytes()
    assert not seed_sqlite_store(store)
    assert db.read_bytes() == before
    assert not seed_sqlite_store("http://127.0.0.1:5000")


def test_an_unwritable_cache_leaves_the_store_to_mlflow(store, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("MSA_CACHE", str(blocker))
    assert not seed_sqlite_store(store)
    client, exp_id = tracking.setup("unseeded")  # MLflow makes the store itself, as before
    assert client.get_experiment(exp_id).name == "unseeded"
