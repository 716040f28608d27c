"""Pipeline tests run against a temporary tracking store and data cache, never the user's."""

import pytest


@pytest.fixture
def store(tmp_path, monkeypatch):
    """An empty SQLite tracking store in tmp_path; returns its URI."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MSA_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return uri
