"""`python -m pipelines.run prepare`: a summary for good data, one clear line and exit 2 for bad data."""

import pickle
import subprocess
import sys

import numpy as np

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


def test_prepare_bad_file_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "broken.pkl"
    rng = np.random.default_rng(0)
    split = {"vision": rng.normal(size=(3, 4, 35)), "text": rng.normal(size=(3, 4, 300)),
             "labels": np.zeros((3, 1, 1))}
    path.write_bytes(pickle.dumps({"train": split, "valid": split, "test": split}))
    proc = subprocess.run([sys.executable, "-m", "pipelines.run", "prepare", "--data", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {path}: split 'train' has no key 'audio' (expected ['vision', 'text', 'audio'] and one of ['labels', 'regression_labels'])"
    assert "Traceback" not in proc.stderr
