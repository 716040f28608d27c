"""The ablations pipeline end to end: every run recorded, nothing trained twice, nothing lost."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pipelines.run import main
from pipelines.spec import load_spec, parse_spec, resolve_spec

NAMES = ["baseline", "transformer", "no_layernorm", "text_only", "vision_only", "audio_only", "text_vision",
         "text_audio", "vision_audio", "loss_mae", "loss_huber", "attention_fusion", "improved"]


def _children(client, experiment="msa-ablations"):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return [r for r in runs if "ablation" in r.data.tags]


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    """The default spec's quick profile, run once on 2 workers, then re-run (which must train nothing)."""
    tmp = tmp_path_factory.mktemp("suite")
    uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MSA_CACHE", str(tmp / "cache"))
        mp.chdir(tmp)
        first_rc = main(["ablations", "--quick", "--workers", "2"])
        start = time.monotonic()
        said = io.StringIO()
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            second_rc = main(["ablations", "--quick", "--workers", "2"])
        yield {"client": MlflowClient(uri), "rcs": (first_rc, second_rc), "rerun_seconds": time.monotonic() - start,
               "tmp": tmp, "rerun_said": said.getvalue()}


def test_default_spec_has_the_lab_names():
    assert load_spec().names == NAMES
    assert len(load_spec().seeds) == 3


def test_the_quick_suite_is_small_work_and_the_full_one_is_not():
    """In epochs of the lab's baseline on MOSI-sized data: what decides whether workers are started."""
    from pipelines.executor import PARALLEL_WORK
    from pipelines.stages.train import RunTask
    from pipelines.suite import _work

    def work(quick: bool, train: int) -> float:
        spec = resolve_spec(None, only=None, seeds=None, epochs=None, quick=quick)
        tasks = [RunTask(a, s, c, "k", "1", None, "") for a, c in spec.ablations.items() for s in spec.seeds]
        return _work(tasks, _Sized({"text": 50, "vision": 50, "audio": 50}, train))

    quick, full = work(quick=True, train=160), work(quick=False, train=1284)
    assert quick == pytest.approx(28 * 160 / 1284) and quick < PARALLEL_WORK     # 13 ablations x 1 seed x 2
    assert full == pytest.approx(840) and full > PARALLEL_WORK                   # 13 x 3 seeds x 20 epochs


class _Sized:
    """What `_work` reads of a data set: the train split's length and the sequence lengths."""

    def __init__(self, seq_lens, n_train):
        self.seq_lens, self._n = seq_lens, n_train

    def __getitem__(self, split):
        return range(self._n)


def test_a_repeated_seed_runs_once():
    assert resolve_spec(None, only=["baseline"], seeds=[7, 3, 7], epochs=None, quick=False).seeds == (7, 3)
    assert parse_spec({"experiment": "e", "seeds": [5, 5, 1], "ablations": {"baseline": {}}}, "s.yaml").seeds == (5, 1)


def test_quick_suite_finishes_every_name_nested_under_a_suite_run(quick_suite):
    client = quick_suite["client"]
    assert quick_suite["rcs"] == (0, 0)
    children = _children(client)
    assert sorted(r.data.tags["ablation"] for r in children) == sorted(NAMES)   # one seed, once each
    assert {r.info.status for r in children} == {"FINISHED"}
    parents = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.data.tags["suite"] == "ablations" and parent.data.tags["synthetic"] == "true"
    assert "oracle_test_Corr" in parent.data.metrics
    run = next(r for r in children if r.data.tags["ablation"] == "baseline")
    assert run.info.run_name == "baseline/seed-1111"
    for tag in ("seed", "config_hash", "data_digest", "code_version", "run_key"):
        assert run.data.tags[tag]
    assert run.data.tags["synthetic"] == "true"
    assert run.data.params["model.encoder"] == "lstm" and run.data.params["train.epochs"] == "2"
    assert run.data.metrics["n_params"] == 582067


def test_runs_hold_metric_histories_test_metrics_and_artifacts(quick_suite):
    client = quick_suite["client"]
    run = next(r for r in _children(client) if r.data.tags["ablation"] == "improved")
    for key in ("train_loss", "val_loss", "val_Corr", "val_MAE", "val_Mult_acc_7"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [1, 2], key
    for key in ("test_Corr", "test_MAE", "test_Has0_acc_2", "test_Non0_F1_score", "test_Mult_acc_7", "best_epoch"):
        assert key in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"test_predictions.csv", "loss_curve.png", "tensorboard"} <= names
    tb_files = client.list_artifacts(run.info.run_id, "tensorboard")
    assert any("events.out.tfevents" in a.path for a in tb_files)
    assert "tensorboard_graph_error" not in run.data.tags
    events = EventAccumulator(client.download_artifacts(run.info.run_id, "tensorboard"))
    events.Reload()
    assert events.Tags()["graph"] and len(events.Graph().node) > 10  # the model's graph, as TensorBoard shows it
    assert run.inputs.dataset_inputs and run.inputs.dataset_inputs[0].dataset.digest == run.data.tags["data_digest"]
    local = Path(client.download_artifacts(run.info.run_id, "test_predictions.csv"))
    header = local.read_text().splitlines()[0]
    assert header == "id,label,prediction,oracle" and len(local.read_text().splitlines()) == 97


def test_logged_model_loads_and_accepts_other_sequence_lengths(quick_suite, monkeypatch):
    import mlflow
    import torch

    client = quick_suite["client"]
    run = next(r for r in _children(client) if r.data.tags["ablation"] == "text_audio")
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "true")
    mlflow.set_tracking_uri(client.tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/text_audio-seed-1111")   # named for what it is
    out = model(torch.randn(3, 17, 300), torch.randn(3, 17, 74))
    assert out.shape == (3,) and (out.abs() < 3).all()


def test_models_are_named_with_test_metrics_linked_to_the_data(quick_suite):
    client = quick_suite["client"]
    exp_id = client.get_experiment_by_name("msa-ablations").experiment_id
    models = {m.name: m for m in client.search_logged_models([exp_id])}
    assert sorted(models) == sorted(f"{n}-seed-1111" for n in NAMES)
    model = models["text_only-seed-1111"]
    run = client.get_run(model.source_run_id)
    assert run.data.tags["ablation"] == "text_only" and model.params["model.modalities"] == "[text]"
    linked = {m.key: m for m in model.metrics if m.key.startswith("test_")}
    assert linked["test_Corr"].value == run.data.metrics["test_Corr"]
    assert {(m.dataset_name, m.dataset_digest) for m in linked.values()} == {("synthetic-mosi",
                                                                             run.data.tags["data_digest"])}


def test_the_best_ablation_on_validation_is_the_champion(quick_suite, monkeypatch):
    import mlflow
    import numpy as np

    from pipelines.registry import validation_score

    client = quick_suite["client"]
    version = client.get_model_version_by_alias("msa-ablations", "champion")
    run = client.get_run(version.run_id)
    assert version.tags["ablation"] == run.data.tags["ablation"] and version.tags["synthetic"] == "true"
    scores = {r.data.tags["ablation"]: validation_score(client, r, "val_Corr", True) for r in _children(client)}
    assert version.tags["ablation"] == max(scores, key=scores.get)      # one seed: the best run on validation
    assert "SYNTHETIC" in version.description
    # The command it prints runs as printed, on the data the suite ran on.
    assert ("Predict: python -m pipelines.run predict --model models:/msa-ablations@champion --data synthetic "
            "--quick  (or --data FILE: your own)") in quick_suite["rerun_said"]
    assert "Browse: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri" in quick_suite["rerun_said"]
    assert "trained by other code" not in quick_suite["rerun_said"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{quick_suite['tmp'] / 'mlruns' / 'mlflow.db'}")
    requirements = Path(mlflow.pyfunc.get_model_dependencies("models:/msa-ablations@champion")).read_text()
    assert f"numpy=={np.__version__}" in requirements.split() and "torch==" in requirements   # what it was trained with


def test_rerun_of_a_finished_suite_trains_nothing_and_resumes_its_parent(quick_suite):
    client = quick_suite["client"]
    assert quick_suite["rerun_seconds"] < 60
    assert len(_children(client)) == len(NAMES)       # no new child runs
    suites = [r for r in client.search_runs([client.get_experiment_by_name("msa-ablations").experiment_id])
              if r.data.tags.get("suite")]
    assert len(suites) == 1                           # the same suite again: the same parent, resumed
    import json
    parent = suites[0]
    assert parent.info.status == "FINISHED"
    rows = json.loads(Path(client.download_artifacts(parent.info.run_id, "suite.json")).read_text())
    assert {r["status"] for r in rows} == {"CACHED"}
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith(f"**Suite `{parent.data.tags['suite_label']}`**: 13 ablations x 1 seed (1111)")
    assert "SYNTHETIC" in note and "13 already done" in note and "**Champion:** models:/msa-ablations@champion" in note
    reports = quick_suite["tmp"] / "reports" / "msa-ablations"
    assert sorted(p.name for p in reports.iterdir()) == sorted([parent.data.tags["suite_label"], "latest"])
    assert (reports / "latest" / "report.html").read_bytes() == \
        (reports / parent.data.tags["suite_label"] / "report.html").read_bytes()


def _write_spec(tmp_path, ablations: str, name="spec.yaml", extra="") -> Path:
    path = tmp_path / name
    path.write_text(f"experiment: unit\nseeds: [7]\n{extra}ablations:\n{ablations}")
    return path


def test_a_cached_run_of_other_code_is_said_to_be_so(tmp_path, store, capsys):
    from pipelines import tracking

    argv = ["ablations", "--spec", str(_write_spec(tmp_path, "  baseline: {model: {hidden: 8, ff_dim: 16}}\n")),
            "--quick", "--workers", "1", "--epochs", "1"]
    assert main(argv) == 0
    assert "trained by other code" not in capsys.readouterr().err
    (run,) = _children(MlflowClient(store), "unit")
    MlflowClient(store).set_tag(run.info.run_id, "code_version", "0123456789ab")    # as after a commit
    assert main(argv) == 0
    assert (f"note: 1 of the 1 cached run(s) were trained by other code (0123456789ab; this is "
            f"{tracking.code_version()})") in capsys.readouterr().err


def test_a_section_left_empty_keeps_the_bases_settings(tmp_path):
    from pipelines.spec import load_spec

    spec = _write_spec(tmp_path, "  baseline: {}\n  short:\n    model:\n    train: {epochs: 3}\n",
                       extra="base:\n  model: {hidden: 64}\n")
    loaded = load_spec(spec)
    assert loaded.ablations["short"].model.hidden == loaded.ablations["baseline"].model.hidden == 64
    assert loaded.ablations["short"].train.epochs == 3


def test_spec_typos_name_the_key(tmp_path, store, capsys):
    bad_model = _write_spec(tmp_path, "  baseline:\n    model: {hiden: 64}\n")
    assert main(["ablations", "--spec", str(bad_model), "--quick"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {bad_model}: ablation 'baseline': Unknown parameter(s) ['hiden'] for ModelConfig")
    assert "'hidden'" in err

    bad_top = _write_spec(tmp_path, "  baseline: {}\n", "top.yaml", extra="seed: [1]\n")
    assert main(["ablations", "--spec", str(bad_top), "--quick"]) == 2
    assert "unknown key 'seed' in the spec; allowed: ['experiment', 'data', 'seeds'" in capsys.readouterr().err

    bad_value = _write_spec(tmp_path, "  baseline:\n    model: {dropout: 1.5}\n", "value.yaml")
    assert main(["ablations", "--spec", str(bad_value), "--quick"]) == 2
    assert ("The 'dropout' parameter of ModelConfig must be a float in the range [0, 1). Got 1.5 instead."
            in capsys.readouterr().err)

    assert main(["ablations", "--quick", "--only", "basline"]) == 2
    assert "unknown ablation(s) ['basline']" in capsys.readouterr().err


class _Crashes(torch.nn.Module):
    """An encoder whose forward fails: a run that breaks in training, as a user's plug-in might."""

    cost = 1.0
    uses_heads = False

    def __init__(self, cfg):
        super().__init__()
        self.proj = torch.nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x, real, prefix=None):
        raise RuntimeError("simulated crash")


def test_one_failing_run_does_not_stop_the_others(tmp_path, store, monkeypatch, capsys):
    from msa import models

    monkeypatch.setitem(models.ENCODERS, "flaky", _Crashes)   # registered for this test only
    spec = _write_spec(tmp_path, "  baseline: {}\n  audio_only:\n    model: {modalities: [audio], encoder: flaky}\n")
    rc = main(["ablations", "--spec", str(spec), "--quick", "--workers", "1", "--epochs", "1"])
    assert rc == 1
    out = capsys.readouterr().out
    assert "FAILED: audio_only/seed-7: RuntimeError: simulated crash" in out
    runs = {r.data.tags["ablation"]: r for r in _children(MlflowClient(store), "unit")}
    assert runs["baseline"].info.status == "FINISHED"
    assert runs["audio_only"].info.status == "FAILED"
    assert runs["audio_only"].data.tags["error"] == "RuntimeError: simulated crash"

    monkeypatch.setitem(models.ENCODERS, "flaky", models.LSTMEncoder)   # the fix: re-running trains only it
    assert main(["ablations", "--spec", str(spec), "--quick", "--workers", "1", "--epochs", "1"]) == 0
    runs = _children(MlflowClient(store), "unit")
    finished = sorted(r.data.tags["ablation"] for r in runs if r.info.status == "FINISHED")
    assert finished == ["audio_only", "baseline"]
    assert len({r.data.tags["mlflow.parentRunId"] for r in runs}) == 1       # the retry nests under the same suite
    assert f"#/experiments/{runs[0].info.experiment_id}/runs)" in capsys.readouterr().out  # the runs list's address

    # Another spec (here: epochs) is another suite, with a parent of its own; its reports do not replace the first's.
    assert main(["ablations", "--spec", str(spec), "--quick", "--workers", "1", "--epochs", "2",
                 "--only", "baseline"]) == 0
    client = MlflowClient(store)
    suites = [r for r in client.search_runs([runs[0].info.experiment_id]) if "suite" in r.data.tags]
    assert len(suites) == 2
    folders = {p.name for p in (tmp_path / "reports" / "unit").iterdir()}
    assert folders == {*(s.data.tags["suite_label"] for s in suites), "latest"}


def test_a_registered_encoder_runs_in_a_suite(tmp_path, store, monkeypatch):
    from msa import models

    class MeanEncoder(torch.nn.Module):
        """The smallest encoder: the mean over time of the projected features."""

        cost = 0.1

        def __init__(self, cfg):
            super().__init__()

        def forward(self, x, real, prefix=None):
            return x.mean(dim=1)  # (B, H)

    monkeypatch.setitem(models.ENCODERS, "mean", MeanEncoder)
    spec = _write_spec(tmp_path, "  baseline: {}\n  mean_encoder:\n    model: {encoder: mean}\n")
    assert main(["ablations", "--spec", str(spec), "--quick", "--workers", "1", "--epochs", "1"]) == 0
    runs = {r.data.tags["ablation"]: r for r in _children(MlflowClient(store), "unit")}
    assert runs["mean_encoder"].info.status == "FINISHED"
    assert runs["mean_encoder"].data.params["model.encoder"] == "mean"
    assert "test_Corr" in runs["mean_encoder"].data.metrics


# SIGTERM to the command alone (`kill PID`), and to its whole process group with its worker processes
# (`timeout`, `kill -- -PGID`, a batch scheduler's cancel).
@pytest.mark.parametrize("workers, seeds, group", [(1, ["7"], False), (2, ["7", "8", "9"], True)])
def test_interrupted_runs_are_killed_then_completed_without_duplicates(tmp_path, store, workers, seeds, group):
    spec = _write_spec(tmp_path, "  baseline: {}\n")
    cmd = [sys.executable, "-m", "pipelines.run", "ablations", "--spec", str(spec), "--quick",
           "--workers", str(workers), "--epochs", "12", "--seeds", *seeds]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=group)
    client = MlflowClient(store)
    deadline = time.monotonic() + 120
    running = None
    while time.monotonic() < deadline and running is None:
        time.sleep(0.3)
        exp = client.get_experiment_by_name("unit") if Path(store.removeprefix("sqlite:///")).exists() else None
        if exp:
            runs = [r for r in client.search_runs([exp.experiment_id]) if "ablation" in r.data.tags]
            if runs and client.get_metric_history(runs[0].info.run_id, "val_loss"):
                running = runs[0]
    assert running is not None, proc.communicate(timeout=60)
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert client.get_run(running.info.run_id).info.status == "KILLED"
    exp_id = client.get_experiment_by_name("unit").experiment_id
    assert "RUNNING" not in {r.info.status for r in client.search_runs([exp_id])}   # the suite run too

    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    children = [r for r in client.search_runs([exp_id]) if "ablation" in r.data.tags]
    finished = [r for r in children if r.info.status == "FINISHED"]
    assert sorted(r.data.tags["seed"] for r in finished) == seeds               # one each, no duplicate
    assert {r.info.status for r in children} == {"FINISHED", "KILLED"}
    assert all(len(client.get_metric_history(r.info.run_id, "val_loss")) == 12 for r in finished)
    # Resumed, not split: the killed runs and the ones that finished them nest under one suite run.
    suites = [r for r in client.search_runs([exp_id]) if "suite" in r.data.tags]
    assert len(suites) == 1 and suites[0].info.status == "FINISHED"
    assert "error" not in suites[0].data.tags                                  # 'interrupted' was the first try's
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {suites[0].info.run_id}


def test_precision_is_plumbed_into_every_run_and_its_fallback_recorded(tmp_path, store, capsys):
    import torch as _torch

    from msa.training import bf16_supported, device_name
    from pipelines.devices import resolve_here
    from pipelines.executor import threads_per_worker

    spec = _write_spec(tmp_path, "  baseline: {}\n", extra="base:\n  model: {hidden: 8, heads: 2, ff_dim: 16}\n")
    argv = ["ablations", "--spec", str(spec), "--quick", "--workers", "1", "--epochs", "1", "--precision", "bf16"]
    assert main(argv) == 0
    run = _children(MlflowClient(store), "unit")[0]
    device = _torch.device(resolve_here("auto"))   # the GPU where there is one, else this CPU
    native = bf16_supported(device)
    # What the run's last digits depend on beyond its identity: this CPU or GPU, and one worker's threads.
    assert run.data.tags["device_name"] == device_name(device) != ""
    assert run.data.tags["torch_threads"] == str(threads_per_worker(1))
    # Part of the run's identity: the precision it trains in (fp32, the default, is not written out).
    assert run.data.params.get("train.precision", "fp32") == run.data.tags["precision_used"] == (
        "bf16" if native else "fp32")
    if not native:
        assert run.data.tags["precision_requested"] == "bf16"
        err = capsys.readouterr().err
        assert err.count("no native bf16") == 1 and "warning: bf16 was asked for" in err


def test_bf16_where_it_is_not_native_is_an_fp32_run_never_reused_as_bf16(tmp_path, store, capsys, monkeypatch):
    from msa import training

    spec = _write_spec(tmp_path, "  baseline: {}\n", extra="base:\n  model: {hidden: 8, heads: 2, ff_dim: 16}\n")
    fp32 = ["ablations", "--spec", str(spec), "--quick", "--workers", "1", "--epochs", "1", "--device", "cpu"]
    bf16 = [*fp32, "--precision", "bf16"]
    runs = lambda: sorted((r.data.params.get("train.precision", "fp32"), r.data.tags["precision_used"],
                           r.data.tags.get("precision_requested", "-")) for r in _children(MlflowClient(store), "unit"))

    monkeypatch.setattr(training, "bf16_supported", lambda device: False)   # a CPU without native bf16
    assert main(bf16) == 0 and runs() == [("fp32", "fp32", "bf16")]
    assert "warning: bf16 was asked for, but this cpu has no native bf16" in capsys.readouterr().err
    assert main(fp32) == 0 and len(runs()) == 1                             # the same run as a plain fp32 one
    assert "1 cached" in capsys.readouterr().err

    monkeypatch.setattr(training, "bf16_supported", lambda device: True)    # a machine that has it
    assert main(bf16) == 0
    assert "no native bf16" not in capsys.readouterr().err
    assert runs() == [("bf16", "bf16", "-"), ("fp32", "fp32", "bf16")]      # trained in bf16, the fp32 run kept
    assert main(bf16) == 0 and len(runs()) == 2                              # and that one is reused


def test_a_run_whose_store_call_fails_before_training_fails_alone(tmp_path, store, monkeypatch, capsys):
    """A tracking call (or a device lookup) that raises before training starts fails that run, with its
    error recorded, and the suite goes on; it used to end the whole suite in a traceback."""
    from pipelines import tracking

    real = tracking.log_params

    def log_params(client, run_id, params):
        if params.get("train.lr") == 0.002:
            raise RuntimeError("the store refused the params")
        return real(client, run_id, params)

    monkeypatch.setattr(tracking, "log_params", log_params)
    spec = _write_spec(tmp_path, "  baseline: {}\n  broken:\n    train: {lr: 0.002}\n")
    assert main(["ablations", "--spec", str(spec), "--quick", "--workers", "1", "--epochs", "1"]) == 1
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "RuntimeError: the store refused the params" in out.out + out.err
    runs = {r.data.tags["ablation"]: r for r in _children(MlflowClient(store), "unit")}
    assert runs["baseline"].info.status == "FINISHED"
    assert runs["broken"].info.status == "FAILED"                           # created, then ended: never left RUNNING
    assert runs["broken"].data.tags["error"] == "RuntimeError: the store refused the params"
