"""Reading every MOSI layout users bring, exactly and safely, and refusing bad files clearly."""

import pickle

import numpy as np
import pytest
import torch

from msa.data import DataError, load
from msa.synthetic import make_synthetic, write_pickle


def _split(rng, n, t=(6, 6, 6), dims=(35, 300, 74), labels="multibench", ids=None):
    v, x, a = dims
    d = {
        "vision": rng.normal(size=(n, t[0], v)).astype(np.float32),
        "text": rng.normal(size=(n, t[1], x)).astype(np.float32),
        "audio": rng.normal(size=(n, t[2], a)).astype(np.float32),
        "id": ids if ids is not None else np.array([f"vid{i}" for i in range(n)]),
    }
    y = rng.uniform(-3, 3, n).astype(np.float32)
    if labels == "mmsa":
        d["regression_labels"] = y
    else:
        d["labels"] = y.reshape(n, 1, 1)
    return d


def _write(tmp_path, raw, name="data.pkl"):
    path = tmp_path / name
    with open(path, "wb") as f:
        pickle.dump(raw, f)
    return path


def test_multibench_layout_reads_dims_labels_ids_and_cleans_inf(tmp_path):
    rng = np.random.default_rng(0)
    raw = {s: _split(rng, n) for s, n in [("train", 8), ("valid", 4), ("test", 5)]}
    raw["train"]["audio"][0, 1, 2] = -np.inf
    raw["train"]["audio"][3, 0, 0] = np.inf
    raw["test"]["vision"][1, 1, 1] = np.nan
    data = load(_write(tmp_path, raw))

    assert data.layout == "multibench" and not data.synthetic
    assert data.sizes == {"train": 8, "valid": 4, "test": 5}
    assert data.dims == {"vision": 35, "text": 300, "audio": 74}
    assert data.cleaned["train"] == {"vision": 0, "text": 0, "audio": 2}
    assert data.cleaned["test"] == {"vision": 1, "text": 0, "audio": 0}
    train = data["train"]
    assert train.features["audio"][0, 1, 2] == 0 and torch.isfinite(train.features["audio"]).all()
    assert train.features["text"].dtype == torch.float32 and train.features["text"].is_contiguous()
    assert train.labels.shape == (8,)
    np.testing.assert_allclose(train.labels.numpy(), raw["train"]["labels"].reshape(-1))
    assert train.ids[:2] == ["vid0", "vid1"]
    assert "audio 2" in data.summary()


def test_mult_layout_with_byte_ids_and_small_dims(tmp_path):
    rng = np.random.default_rng(1)
    raw = {s: _split(rng, 4, dims=(20, 300, 5), ids=np.array([[b"abc", b"3"]] * 4)) for s in ("train", "valid", "test")}
    data = load(_write(tmp_path, raw))
    assert data.layout == "mult"
    assert data.dims == {"vision": 20, "text": 300, "audio": 5}
    assert data["valid"].ids[0] == "abc$_$3"


@pytest.mark.parametrize("aligned", [True, False])
def test_mmsa_layout_ignores_extra_keys(tmp_path, aligned):
    rng = np.random.default_rng(2)
    t = (50, 50, 50) if aligned else (55, 50, 40)
    raw = {}
    for s in ("train", "valid", "test"):
        d = _split(rng, 3, t=t, dims=(20, 768, 5), labels="mmsa", ids=np.array(["v1$_$1", "v1$_$2", "v2$_$1"]))
        d.update(text_bert=np.zeros((3, 3, 50)), raw_text=np.array(["a", "b", "c"]),
                 annotations=np.array(["Positive"] * 3), classification_labels=np.array([0.0, 1.0, 2.0]))
        if not aligned:
            d.update(audio_lengths=[40, 30, 20], vision_lengths=[55, 10, 3])
        raw[s] = d
    data = load(_write(tmp_path, raw, "aligned_50.pkl"))
    assert data.layout == "mmsa"
    assert data.dims == {"vision": 20, "text": 768, "audio": 5}
    assert data.seq_lens == {"vision": t[0], "text": t[1], "audio": t[2]}
    assert data["test"].ids[1] == "v1$_$2"
    np.testing.assert_allclose(data["test"].labels.numpy(), raw["test"]["regression_labels"])


def test_synthetic_written_as_multibench_pickle_round_trips(tmp_path):
    from msa.synthetic import SyntheticSpec, generate_raw

    spec = SyntheticSpec(sizes=(10, 5, 5), seq_len=8)
    path = tmp_path / "mosi_raw.pkl"
    write_pickle(generate_raw(spec), path)
    real_path = load(path)
    direct = make_synthetic(spec)
    assert real_path.digest == direct.digest
    assert real_path.cleaned == direct.cleaned
    assert real_path.has_oracle


def test_digest_changes_with_content(tmp_path):
    rng = np.random.default_rng(3)
    raw = {s: _split(rng, 4) for s in ("train", "valid", "test")}
    a = load(_write(tmp_path, raw, "a.pkl")).digest
    raw["test"]["text"][0, 0, 0] += 1.0
    b = load(_write(tmp_path, raw, "b.pkl")).digest
    assert a != b and len(a) == 16
    assert load(tmp_path / "a.pkl").digest == a


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused_before_running(tmp_path):
    marker = tmp_path / "pwned"
    rng = np.random.default_rng(4)
    raw = {s: _split(rng, 2) for s in ("train", "valid", "test")}
    raw["train"]["payload"] = _Evil(marker)
    path = _write(tmp_path, raw)
    with pytest.raises(DataError, match=r"refused to load '(posix|os)\.system'"):
        load(path)
    assert not marker.exists()


def _bad(tmp_path, mutate):
    rng = np.random.default_rng(5)
    raw = {s: _split(rng, 4) for s in ("train", "valid", "test")}
    mutate(raw)
    return _write(tmp_path, raw)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("valid"), r"missing split 'valid'"),
    (lambda r: r["test"].pop("audio"), r"split 'test' has no key 'audio'"),
    (lambda r: r["train"].pop("labels"), r"split 'train' has no key 'labels' or 'regression_labels'"),
    (lambda r: r["train"].update(text=r["train"]["text"][:3]), r"'text' has 3 samples but 'labels' has 4"),
    (lambda r: r["valid"].update(vision=r["valid"]["vision"][:, 0]), r"'vision' must be 3-D .* got shape \(4, 35\)"),
    (lambda r: r.update(test={k: v[:0] for k, v in r["test"].items()}), r"split 'test' is empty"),
    (lambda r: r["valid"]["labels"].__setitem__((2, 0, 0), np.nan), r"split 'valid': 'labels' has a non-finite value at index 2"),
    (lambda r: r["test"].update(audio=r["test"]["audio"][..., :5]), r"'audio' has 5 features per step in split 'test' but 74"),
    (lambda r: r["train"].update(text=np.array(["a"] * 4)), r"'text' must hold numbers"),
])
def test_bad_files_get_one_clear_error(tmp_path, mutate, message):
    path = _bad(tmp_path, mutate)
    with pytest.raises(DataError, match=message) as err:
        load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_not_a_file_not_a_pickle_and_truncated(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "missing.pkl")
    with pytest.raises(DataError, match="not a file"):
        load(tmp_path)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a pickle")
    with pytest.raises(DataError, match="not a readable pickle"):
        load(text)
    rng = np.random.default_rng(6)
    whole = _write(tmp_path, {s: _split(rng, 4) for s in ("train", "valid", "test")})
    cut = tmp_path / "cut.pkl"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(DataError, match="not a readable pickle, or truncated"):
        load(cut)
    with pytest.raises(DataError, match="expected a dict of splits"):
        load(_write(tmp_path, [1, 2, 3], "list.pkl"))
