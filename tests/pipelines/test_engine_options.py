"""Where runs train is checked before anything is written: devices, schedulers, stores."""

import pytest
import torch

from pipelines import devices
from pipelines.executor import Engine
from pipelines.run import main


def _nothing_written(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: --device cuda is valid here")
@pytest.mark.parametrize("pipeline", ["ablations", "tune"])
def test_cuda_without_cuda_is_one_line_and_exit_2_with_nothing_written(tmp_path, store, capsys, pipeline):
    assert main([pipeline, "--quick", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --device cuda: this machine has no CUDA device")
    assert "use --device cpu or auto" in err
    assert _nothing_written(tmp_path)


def test_a_device_of_another_form_is_refused(tmp_path, store, capsys):
    assert main(["ablations", "--quick", "--device", "gpu0"]) == 2
    assert capsys.readouterr().err == "error: --device must be auto, cpu, cuda or cuda:N; got 'gpu0'\n"
    assert _nothing_written(tmp_path)


def test_auto_is_cpu_without_cuda_and_cuda_where_a_cluster_declares_gpus():
    assert devices.resolve_here("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert devices.resolve_here("cpu") == "cpu"
    assert devices.resolve_on_cluster("auto", "tcp://h:1", gpu_workers=0, cuda_workers=0) == "cpu"
    assert devices.resolve_on_cluster("auto", "tcp://h:1", gpu_workers=2, cuda_workers=2) == "cuda"
    assert devices.resolve_on_cluster("cuda:1", "tcp://h:1", gpu_workers=1, cuda_workers=1) == "cuda:1"
    with pytest.raises(devices.DeviceError, match="no worker of the Dask cluster at tcp://h:1 declares a GPU"):
        devices.resolve_on_cluster("cuda", "tcp://h:1", gpu_workers=0, cuda_workers=0)


@pytest.mark.parametrize("pipeline", ["ablations", "tune"])
def test_a_scheduler_with_the_local_sqlite_store_is_refused_saying_what_to_set(tmp_path, store, capsys, pipeline):
    assert main([pipeline, "--quick", "--scheduler", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("error: --scheduler tcp://127.0.0.1:9: Dask workers cannot write to this machine's SQLite")
    assert "set MLFLOW_TRACKING_URI to a tracking server" in err
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("address, words", [
    ("http://127.0.0.1:8787", "unknown address scheme 'http'"),      # the dashboard's address
    ("127.0.0.1", "missing port number"),
    ("tcp://127.0.0.1:PORT", "invalid literal for int()"),
])
def test_a_scheduler_address_that_is_not_one_is_one_line(tmp_path, store, capsys, address, words):
    assert main(["ablations", "--quick", "--scheduler", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --scheduler {address}: not a scheduler address (") and words in err
    assert err.count("\n") == 1 and "expected tcp://HOST:PORT" in err
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("storage", [[], ["--storage", "study.log"], ["--storage", "sqlite:///study.db"]])
def test_a_scheduler_with_a_local_study_file_is_refused(tmp_path, store, capsys, monkeypatch, storage):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")   # never reached: refused before
    monkeypatch.setenv("MSA_SCHEDULER", "tcp://127.0.0.1:9")
    assert main(["tune", "--quick", *storage]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: MSA_SCHEDULER tcp://127.0.0.1:9: Dask workers cannot share this machine's study file")
    assert "--storage postgresql://" in err and err.count("\n") == 1


def test_the_engine_says_where_runs_go(monkeypatch):
    monkeypatch.setenv("MSA_SCHEDULER", "tcp://10.0.0.1:8786")
    assert Engine.from_env() == Engine(scheduler="tcp://10.0.0.1:8786")
    assert Engine.from_env().describe(2, 13) == "13 runs on the Dask cluster at tcp://10.0.0.1:8786"
    assert Engine().describe(500, 13).startswith("13 runs on 13 worker(s) x 1 thread(s)")   # no idle processes
    gpu = Engine(device="cuda", gpu_slots=4)
    assert gpu.local_workers(2) == 4 and gpu.describe(2, 13).endswith("on cuda")
