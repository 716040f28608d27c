"""`predict`: a logged or registered model applied to a file; dims checked, labels optional, every URI form."""

import contextlib
import os
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from msa.metrics import eval_mosi_regression
from msa.synthetic import write_pickle
from pipelines import tracking
from pipelines.run import main

EXPERIMENT = "unit-predict"


def _raw(data, *, splits=("train", "valid", "test"), labels=True, dims=None):
    """A MultiBench-layout dict of `data`'s splits; `dims` (modality -> D) pads or cuts features."""
    raw = {}
    for name in splits:
        s = data[name]
        split = {}
        for m, t in s.features.items():
            x = t.numpy()
            d = (dims or {}).get(m, x.shape[-1])
            split[m] = np.concatenate([x, np.zeros((*x.shape[:2], d - x.shape[-1]), np.float32)], -1)[..., :d]
        if labels:
            split["labels"] = s.labels.numpy().reshape(-1, 1, 1)
        split["id"] = np.array(s.ids)
        raw[name] = split
    return raw


@pytest.fixture(scope="module")
def made(tmp_path_factory, suite_recorder, tiny_data):
    tmp = tmp_path_factory.mktemp("predict")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}")
        mp.setenv("MSA_CACHE", str(tmp / "cache"))
        mp.chdir(tmp)
        client, exp_id = tracking.setup(EXPERIMENT)
        recorder = suite_recorder(client, exp_id)
        pid = recorder.parent(["text_audio"], [1])
        labels = tiny_data["test"].labels.numpy()
        row = recorder.child(pid, "text_audio", 1, labels, labels)
        model_id = recorder.model(row.run_id, "text_audio", 1, tiny_data, model={"modalities": ["text", "audio"]})
        client.create_registered_model(EXPERIMENT)
        version = client.create_model_version(EXPERIMENT, f"models:/{model_id}", run_id=row.run_id,
                                              tags={"ablation": "text_audio", "seed": "1"}, model_id=model_id)
        client.set_registered_model_alias(EXPERIMENT, "champion", version.version)

        # A run logged before models were named: its model is called `model`.
        legacy = client.create_run(exp_id, run_name="baseline/seed-1").info.run_id
        old = mlflow.initialize_logged_model(name="model", source_run_id=legacy, experiment_id=exp_id)
        mlflow.pytorch.log_model(_model(tiny_data), name="model", run_id=legacy, model_id=old.model_id,
                                 serialization_format="pickle",
                                 signature=mlflow.models.get_model_info(f"models:/{model_id}").signature,
                                 pip_requirements=["torch"])

        files = {"labelled": _raw(tiny_data), "unlabelled": _raw(tiny_data, splits=("test",), labels=False),
                 "wide": _raw(tiny_data, dims={"text": 768})}
        for name, raw in files.items():
            write_pickle(raw, tmp / f"{name}.pkl")
        yield {"tmp": tmp, "client": client, "run_id": row.run_id, "legacy": legacy, "model_id": model_id,
               "data": tiny_data, "uri": tracking.tracking_uri()}


def _model(data):
    from msa.config import RunConfig
    from msa.models import build_model

    config = RunConfig.from_dict({"model": {"hidden": 8, "ff_dim": 16, "modalities": ["text", "audio"]}})
    return build_model(config.model, data.dims).eval()


@pytest.fixture
def at(made, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", made["uri"])
    monkeypatch.setenv("MSA_CACHE", str(made["tmp"] / "cache"))
    monkeypatch.chdir(made["tmp"])
    monkeypatch.delenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", raising=False)
    return made


@contextlib.contextmanager
def _tagged(at, key, value):
    """The champion's run with one more tag, for the block only (the store is the module's)."""
    at["client"].set_tag(at["run_id"], key, value)
    try:
        yield
    finally:
        at["client"].delete_tag(at["run_id"], key)


def _expected(at, split="test"):
    """The registered model's predictions on `split`, computed directly."""
    from msa.training import predict

    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
    try:
        model = mlflow.pytorch.load_model(f"models:/{at['model_id']}")
    finally:
        del os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"]
    return predict(model, at["data"][split])


def test_the_champion_predicts_a_labelled_file_and_prints_its_metrics(at, capsys):
    out = at["tmp"] / "preds.csv"
    assert main(["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", "labelled.pkl",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION" not in os.environ      # allowed for the load only
    table = pd.read_csv(out, dtype={"id": str})
    assert list(table.columns) == ["id", "prediction", "label"]
    assert list(table["id"]) == at["data"]["test"].ids
    np.testing.assert_allclose(table["prediction"], _expected(at), rtol=1e-5, atol=1e-6)
    metrics = eval_mosi_regression(table["prediction"].to_numpy(), table["label"].to_numpy())
    assert "version 1 (ablation text_audio, seed 1)" in printed
    assert "test (24 samples): " in printed and f"Corr {metrics['Corr']:.4f}" in printed
    assert "SYNTHETIC" not in printed and f"Wrote 24 predictions (id, prediction, label) to {out}" in printed


def test_an_unlabelled_file_gets_predictions_only_through_a_runs_uri(at, capsys):
    out = at["tmp"] / "unlabelled.csv"
    # runs:/<id>/model names the run's one model, though it is logged as `text_audio-seed-1`.
    assert main(["predict", "--model", f"runs:/{at['run_id']}/model", "--data", "unlabelled.pkl",
                 "--split", "all", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    table = pd.read_csv(out, dtype={"id": str})
    assert list(table.columns) == ["id", "split", "prediction"] and set(table["split"]) == {"test"}
    np.testing.assert_allclose(table["prediction"], _expected(at), rtol=1e-5, atol=1e-6)
    assert "no labels in the file: predictions only" in printed and "Corr" not in printed

    assert main(["predict", "--model", f"runs:/{at['run_id']}/model", "--data", "unlabelled.pkl",
                 "--split", "train"]) == 2
    assert capsys.readouterr().err == ("error: unlabelled.pkl: no split 'train' in it (it has ['test']; "
                                       "use --split test|all)\n")


@pytest.mark.parametrize("uri", ["runs:/{run_id}/text_audio-seed-1", "models:/{model_id}",
                                 f"models:/{EXPERIMENT}/1", f"models:/{EXPERIMENT}/latest", "runs:/{legacy}/model"])
def test_every_uri_form_loads(at, uri, capsys):
    uri = uri.format(**at)
    out = at["tmp"] / "any.csv"
    assert main(["predict", "--model", uri, "--data", "labelled.pkl", "--split", "valid", "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == 24 and "valid (24 samples)" in capsys.readouterr().out


def test_a_downloaded_model_folder_predicts_anywhere_without_a_store(at, capsys, tmp_path, monkeypatch):
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{EXPERIMENT}@champion", dst_path=str(tmp_path / "m")))
    expected = _expected(at)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    out = elsewhere / "preds.csv"
    assert main(["predict", "--model", str(folder), "--data", str(at["tmp"] / "labelled.pkl"), "--out", str(out)]) == 0
    np.testing.assert_allclose(pd.read_csv(out)["prediction"], expected, rtol=1e-5, atol=1e-6)
    assert "(a model folder)" in capsys.readouterr().out
    assert sorted(p.name for p in elsewhere.iterdir()) == ["preds.csv"]          # no store made on the way


def test_a_model_of_other_code_is_said_and_a_user_who_refuses_pickles_is_heard(at, capsys, monkeypatch):
    with _tagged(at, "code_version", "0123456789ab"):
        assert main(["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", "labelled.pkl",
                     "--out", str(at["tmp"] / "p.csv")]) == 0
    assert ("note: the model's run recorded code 0123456789ab, this checkout is "
            f"{tracking.code_version()}: predict runs this checkout's msa code") in capsys.readouterr().out
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")    # the user's choice, kept
    assert main(["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", "labelled.pkl",
                 "--out", str(at["tmp"] / "p.csv")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --model models:/{EXPERIMENT}@champion: cannot load it (")
    assert os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] == "false"


def test_dims_that_do_not_fit_the_model_are_one_line(at, capsys):
    out = at["tmp"] / "never.csv"
    assert main(["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", "wide.pkl",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == ("error: wide.pkl: its features do not fit the model: features per step of "
                   "text 300 (model) vs 768 (file)\n")
    assert not out.exists()


def test_bad_model_references_are_one_line(at, capsys):
    for uri, words in [("models:/nope@champion", "--model models:/nope@champion: no such model"),
                       ("runs:/0123abcd/model", "no run '0123abcd'"),
                       ("models:/nope/latest", "--model models:/nope/latest: no such model"),
                       (f"runs:/{at['run_id']}/other", "has no logged model named 'other'"),
                       ("some/folder", "not a model URI or a folder with an MLmodel file")]:
        assert main(["predict", "--model", uri, "--data", "labelled.pkl"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


def test_synthetic_data_is_labelled_so_in_every_result(at, capsys):
    out = at["tmp"] / "synthetic.csv"
    assert main(["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", "synthetic", "--quick",
                 "--split", "valid", "--out", str(out)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("valid", "Wrote"))]
    assert len(lines) == 2 and all("SYNTHETIC" in line for line in lines)
    table = pd.read_csv(out)
    assert torch.isfinite(torch.tensor(table["prediction"].to_numpy())).all()
    assert set(table["data"]) == {"SYNTHETIC (not a MOSI result)"}     # the file says so too, row by row


def test_a_model_trained_on_synthetic_data_says_so_on_real_data(at, capsys):
    with _tagged(at, "synthetic", "true"):
        assert main(["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", "labelled.pkl",
                     "--out", str(at["tmp"] / "real.csv")]) == 0
    assert "note: the model was trained on SYNTHETIC data (not MOSI)" in capsys.readouterr().out


def test_labels_of_a_file_with_an_unlabelled_split_are_written_as_given(at, tmp_path):
    raw = _raw(at["data"], splits=("valid", "test"))
    del raw["valid"]["labels"]
    write_pickle(raw, tmp_path / "mixed.pkl")
    out = tmp_path / "mixed.csv"
    assert main(["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", str(tmp_path / "mixed.pkl"),
                 "--split", "all", "--out", str(out)]) == 0
    written = [row.split(",")[-1] for row in out.read_text().splitlines()[1:]]
    labels = at["data"]["test"].labels.numpy()
    assert written[:len(at["data"]["valid"])] == [""] * len(at["data"]["valid"])
    assert written[len(at["data"]["valid"]):] == [f"{v:.7g}" for v in labels]      # 2.4, not 2.4000000953674316


def test_constant_labels_give_a_note_not_a_python_warning(at, capsys):
    raw = _raw(at["data"], splits=("test",))
    raw["test"] = {k: v[:1] for k, v in raw["test"].items()}                 # one sample: Corr undefined
    write_pickle(raw, at["tmp"] / "one.pkl")
    with warnings.catch_warnings(record=True) as raised:
        warnings.simplefilter("always")
        assert main(["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", "one.pkl",
                     "--out", str(at["tmp"] / "one.csv")]) == 0
    out = capsys.readouterr().out
    assert "test (1 sample): " in out and "Corr nan" in out
    assert "note: Corr is undefined (nan) on test: its labels or the model's predictions are all the same" in out
    assert [str(w.message) for w in raised if "Corr" in str(w.message)] == []   # no Python warning line


def test_an_unwritable_out_folder_is_one_line_before_anything_is_loaded(at, capsys, monkeypatch):
    import pipelines.errors

    folder = at["tmp"] / "locked"
    folder.mkdir(exist_ok=True)
    real_access = os.access
    monkeypatch.setattr(pipelines.errors.os, "access",        # as for another user: root may write anywhere
                        lambda path, mode: False if Path(path) == folder else real_access(path, mode))
    monkeypatch.setattr("pipelines.stages.predict.predict_data",
                        lambda *a, **k: pytest.fail("predicted before the --out check"))
    assert main(["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", "labelled.pkl",
                 "--out", str(folder / "p.csv")]) == 2
    assert capsys.readouterr().err == f"error: --out {folder}: {folder} is not writable by this user\n"


def test_a_disk_that_fills_up_while_writing_is_one_line_exit_1(at, capsys, monkeypatch):
    import errno

    def full_disk(self, path, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full_disk)
    out = at["tmp"] / "full.csv"
    assert main(["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", "labelled.pkl",
                 "--out", str(out)]) == 1                                   # the machine's fault, as README says
    assert capsys.readouterr().err == f"error: --out {out}: cannot write it (No space left on device)\n"


def test_an_out_file_that_cannot_be_written_is_the_users_one_line_exit_2(at, capsys, monkeypatch):
    import errno

    locked = at["tmp"] / "locked.csv"
    locked.write_text("someone else's\n")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    from pipelines.stages.predict import predict_data
    monkeypatch.setattr("pipelines.stages.predict.predict_data",
                        lambda *a, **k: pytest.fail("predicted before the --out check"))
    argv = ["predict", "--model", f"models:/{EXPERIMENT}@champion", "--data", "labelled.pkl", "--out"]
    assert main([*argv, str(locked)]) == 2
    assert capsys.readouterr().err == f"error: --out {locked}: is not writable by this user\n"
    monkeypatch.setattr(os, "access", real_access)
    monkeypatch.setattr("pipelines.stages.predict.predict_data", predict_data)

    def too_long(self, path, **kwargs):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))

    monkeypatch.setattr(pd.DataFrame, "to_csv", too_long)
    out = at["tmp"] / "p.csv"
    assert main([*argv, str(out)]) == 2
    assert capsys.readouterr().err == f"error: --out {out}: cannot write it (File name too long)\n"
