"""The one run lifecycle and the one epoch logger, on a real (temporary) tracking store."""

import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipelines import tracking
from pipelines.status import RunStatus


class Pruned(Exception):
    pass


@pytest.fixture
def client(store):
    client, exp_id = tracking.setup("unit-tracking")
    client.experiment_id = exp_id
    return client


def _run(client, **kw):
    return tracking.start_run(client, client.experiment_id, "r", tags={"k": "v"}, **kw)


def test_a_run_that_completes_is_finished(client):
    rid = _run(client, params={"model.modalities": ("text", "audio"), "seed": 3})
    with tracking.recorded_run(client, rid):
        pass
    run = client.get_run(rid)
    assert run.info.status == "FINISHED" and run.data.tags["k"] == "v"
    assert run.data.params == {"model.modalities": "[text, audio]", "seed": "3"}
    assert "mlflow.user" in run.data.tags  # MLflow's context tags, as a fluent start_run would set


def test_an_error_fails_the_run_with_the_error_recorded_and_raised(client):
    rid = _run(client)
    with pytest.raises(ValueError, match="bad value"), tracking.recorded_run(client, rid):
        raise ValueError("bad value")
    run = client.get_run(rid)
    assert run.info.status == "FAILED" and run.data.tags["error"] == "ValueError: bad value"
    assert "error.txt" in {a.path for a in client.list_artifacts(rid)}


def test_an_interrupt_kills_the_run(client):
    rid = _run(client)
    with pytest.raises(KeyboardInterrupt), tracking.recorded_run(client, rid):
        raise KeyboardInterrupt
    assert client.get_run(rid).info.status == "KILLED"


def test_declared_exceptions_finish_the_run_and_a_handle_can_fail_it(client):
    pruned, nan = _run(client), _run(client)
    with pytest.raises(Pruned), tracking.recorded_run(client, pruned, finished_on=(Pruned,)):
        raise Pruned
    with tracking.recorded_run(client, nan) as handle:
        handle.status = RunStatus.FAILED
    assert client.get_run(pruned).info.status == "FINISHED" and "error" not in client.get_run(pruned).data.tags
    assert client.get_run(nan).info.status == "FAILED"


def test_a_nested_run_names_its_parent(client):
    parent = _run(client)
    child = _run(client, parent_run_id=parent)
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_epoch_logger_logs_finite_metrics_and_the_selection_metric_to_tensorboard(client, tmp_path):
    rid = _run(client)
    log = tracking.EpochLogger(client, rid, tensorboard_dir=tmp_path / "tb", select_key="val_loss")
    for epoch in (1, 2):
        log(epoch, {"epoch": epoch, "train_loss": 1.0 / epoch, "val_loss": 2.0 / epoch, "val_Corr": math.nan})
    log.close()
    run = client.get_run(rid)
    assert [m.value for m in client.get_metric_history(rid, "val_loss")] == [2.0, 1.0]
    assert "val_Corr" not in run.data.metrics and "epoch" not in run.data.metrics  # NaN and the step are left out
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    # Selecting on val_loss once looked up `val_val_loss` and wrote NaN here.
    assert [e.value for e in events.Scalars("valid/loss")] == [2.0, 1.0]
