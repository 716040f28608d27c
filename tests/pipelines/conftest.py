"""Pipeline tests run against a temporary tracking store and data cache, never the user's."""

import json

import pytest


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

