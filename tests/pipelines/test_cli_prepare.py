"""`python -m pipelines.run prepare`: a summary for good data, one clear line and exit 2 for bad data."""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from msa.synthetic import SyntheticSpec, generate_raw, write_pickle
from pipelines.run import main


def test_prepare_summarises_a_multibench_file(tmp_path, capsys):
    path = tmp_path / "mosi_raw.pkl"
    write_pickle(generate_raw(SyntheticSpec(sizes=(12, 6, 8), seq_len=10, inf_rate=0.05)), path)
    assert main(["prepare", "--data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "train 12, valid 6, test 8" in out
    assert "vision (T=10, D=35), text (T=10, D=300), audio (T=10, D=74)" in out
    assert "non-finite values set to 0 (audio" in out
    assert "[multibench layout, SYNTHETIC MOSI-like data (not a MOSI result)]" in out   # it holds 'oracle' labels


def test_prepare_bad_file_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "broken.pkl"
    rng = np.random.default_rng(0)
    split = {"vision": rng.normal(size=(3, 4, 35)), "text": rng.normal(size=(3, 4, 300)),
             "labels": np.zeros((3, 1, 1))}
    path.write_bytes(pickle.dumps({"train": split, "valid": split, "test": split}))
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "prepare", "--data", str(path)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: {path}: split 'train' has no key 'audio' (expected ['vision', 'text', "
                                   "'audio'] and one of ['labels', 'regression_labels'])")
    assert "Traceback" not in proc.stderr


def _mosi_like(n=3, steps=4):
    rng = np.random.default_rng(1)
    return {s: {"vision": rng.normal(size=(n, steps, 35)), "text": rng.normal(size=(n, steps, 300)),
                "audio": rng.normal(size=(n, steps, 74)), "labels": np.zeros((n, 1, 1)),
                "id": np.array([f"v{i}" for i in range(n)])} for s in ("train", "valid", "test")}


def _pickled(mutate):
    def make(path):
        raw = _mosi_like()
        mutate(raw)
        path.write_bytes(pickle.dumps(raw))
    return make


def _unreadable(path):
    path.write_bytes(pickle.dumps(_mosi_like()))
    path.chmod(0)


# A mistake, how it is made, and words the one line must hold.
MISTAKES = [
    ("missing file", lambda path: None, "no such file"),
    ("a directory", lambda path: path.mkdir(), "not a file but a directory"),
    ("not a pickle", lambda path: path.write_text("video,label\n1,2\n"), "not a readable pickle"),
    ("sequences of length 0", _pickled(lambda r: [r[s].update(text=r[s]["text"][:, :0]) for s in r]),
     "split 'train': 'text' has sequences of 0 steps"),
    ("complex features", _pickled(lambda r: r["valid"].update(audio=r["valid"]["audio"] * 1j)),
     "split 'valid': 'audio' must hold real numbers (a float or int array), got dtype complex128"),
    ("huge features", _pickled(lambda r: r["test"]["vision"].__setitem__((0, 0, 0), 1e30)),
     "split 'test': 'vision' holds 1 finite values beyond +-1e+18, the first 1e+30 at [0, 0, 0]"),
    ("labels on another scale", _pickled(lambda r: r["train"].update(labels=np.full((3, 1, 1), 7.0))),
     "split 'train': 'labels' must be sentiment scores in [-3, 3], got 7 at index 0"),
    ("one id for a split", _pickled(lambda r: r["train"].update(id=12)),
     "split 'train': 'id' must have one row per sample, got a single int"),
]


@pytest.mark.parametrize("make, words", [m[1:] for m in MISTAKES], ids=[m[0] for m in MISTAKES])
def test_a_mistake_in_the_data_is_one_line_and_exit_2_and_nothing_written(tmp_path, monkeypatch, capsys, make, words):
    monkeypatch.setenv("MSA_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "mosi.pkl"
    make(path)
    before = sorted(tmp_path.rglob("*"))
    assert main(["prepare", "--data", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"error: {path}: ") and words in captured.err
    assert sorted(tmp_path.rglob("*")) == before


def test_a_data_file_without_read_permission_is_one_line(tmp_path, capsys):
    path = tmp_path / "mosi.pkl"
    _unreadable(path)
    if os.access(path, os.R_OK):  # root (with CAP_DAC_OVERRIDE) reads it anyway
        pytest.skip("this user reads files without read permission")
    try:
        assert main(["prepare", "--data", str(path)]) == 2
    finally:
        path.chmod(0o644)
    assert capsys.readouterr().err == (f"error: {path}: cannot be read (permission denied; the file must be readable "
                                       "by this user)\n")


@pytest.mark.parametrize("pipeline", ["prepare", "ablations", "tune"])
def test_an_empty_data_source_is_one_line(tmp_path, monkeypatch, capsys, pipeline):
    """`--data "$MOSI"` with the variable unset is a mistake: never the synthetic default instead."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main([pipeline, "--data", "", *(["--quick"] if pipeline != "prepare" else [])]) == 2
    assert capsys.readouterr().err == "error: the data source is empty (expected a MOSI pickle path or 'synthetic')\n"
    assert list(tmp_path.iterdir()) == []                       # nothing written


def test_an_unwritable_cache_still_prepares_with_one_warning(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    cache.write_text("MSA_CACHE points at a file")
    monkeypatch.setenv("MSA_CACHE", str(cache))
    assert main(["prepare", "--quick"]) == 0
    captured = capsys.readouterr()
    assert "train 160, valid 64, test 96" in captured.out
    assert captured.err == (f"warning: cannot write the synthetic data cache in {cache} (it is a file, not a "
                            "directory); generated the data in memory instead (set MSA_CACHE to a writable directory "
                            "to keep it between runs)\n")



def test_a_relative_data_path_in_a_spec_is_read_from_the_specs_folder(tmp_path, monkeypatch):
    from pipelines.spec import load_spec
    from pipelines.stages.prepare import prepare

    (tmp_path / "specs").mkdir()
    (tmp_path / "data").mkdir()
    write_pickle(generate_raw(SyntheticSpec(sizes=(12, 6, 8), seq_len=10)), tmp_path / "data" / "mosi.pkl")
    spec = tmp_path / "specs" / "spec.yaml"
    spec.write_text("experiment: unit\ndata: ../data/mosi.pkl\nablations:\n  baseline: {}\n")
    elsewhere = tmp_path / "one" / "two"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)                                    # from here, ../data is another folder
    assert prepare(load_spec(spec).data).sizes == {"train": 12, "valid": 6, "test": 8}
    spec.write_text(f"experiment: unit\ndata: {tmp_path / 'data' / 'mosi.pkl'}\nablations:\n  baseline: {{}}\n")
    assert load_spec(spec).data == str(tmp_path / "data" / "mosi.pkl")                 # an absolute one as it is
    assert load_spec(None).data == "synthetic"
