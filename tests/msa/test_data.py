"""Reading every MOSI layout users bring, exactly and safely, and refusing bad files clearly."""

import os
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


def test_a_file_to_predict_on_may_lack_splits_and_labels(tmp_path):
    rng = np.random.default_rng(3)
    test = _split(rng, 5, dims=(20, 768, 5))
    del test["labels"]
    path = _write(tmp_path, {"test": test})
    with pytest.raises(DataError, match="missing split 'train'"):
        load(path)                                                 # training still needs every split, labelled
    data = load(path, partial=True)
    assert list(data.splits) == ["test"] and data.dims == {"vision": 20, "text": 768, "audio": 5}
    assert not data["test"].has_labels and len(data["test"]) == 5 and data["test"].ids[0] == "vid0"
    assert "labels:    none" in data.summary() and len(data.digest) == 16
    labelled = load(_write(tmp_path, {"valid": _split(rng, 4)}, "valid.pkl"), partial=True)
    assert labelled["valid"].has_labels
    with pytest.raises(DataError, match="no split"):
        load(_write(tmp_path, {"other": _split(rng, 4)}, "other.pkl"), partial=True)


def test_mult_layout_with_byte_ids_and_small_dims(tmp_path):
    rng = np.random.default_rng(1)
    ids = np.array([[b"abc", b"3"]] * 4)
    raw = {s: _split(rng, 4, dims=(20, 300, 5), ids=ids) for s in ("train", "valid", "test")}
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
    assert real_path.synthetic, "a file holding the generator's noise-free labels is synthetic data"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_every_pickle_protocol_reads_the_same(tmp_path, protocol):
    """Protocols 0-2 (older tools, Python 2 compatible dumps) write an array's bytes through
    `_codecs.encode`: allowed with latin-1 alone."""
    rng = np.random.default_rng(4)
    raw = {s: _split(rng, 4) for s in ("train", "valid", "test")}
    # Python 3 writes Python 2's names with them: `__builtin__.set`, and `__builtin__.bytes` for an
    # empty byte string (the buffer of an array with no element).
    raw["train"]["annotations"] = {"a", "b"}
    raw["train"]["empty"] = np.zeros((0, 3), np.float32)
    path = tmp_path / f"p{protocol}.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=protocol))
    assert load(path).digest == load(_write(tmp_path, raw, "default.pkl")).digest


def test_a_pickle_that_asks_bytes_for_a_buffer_is_refused(tmp_path):
    path = tmp_path / "bytes.pkl"
    path.write_bytes(b"c__builtin__\nbytes\n(I1000000000000\ntR.")
    with pytest.raises(DataError, match=r"refused to load 'builtins.bytes' with arguments"):
        load(path)
    path.write_bytes(b"c__builtin__\neval\n(Vprint(1)\ntR.")           # a Python 2 name for code: refused
    with pytest.raises(DataError, match=r"refused to load 'builtins.eval'"):
        load(path)


def test_a_pickle_that_asks_codecs_for_another_encoding_is_refused(tmp_path):
    path = tmp_path / "codec.pkl"
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")
    with pytest.raises(DataError, match=r"refused to load '_codecs.encode' with encoding 'rot13'"):
        load(path)


def _padded(rng, n, lengths, at_end, steps=8):
    """An MMSA-layout split whose sample i holds lengths[i] real steps, padded with zero steps before
    them (MultiBench, MulT) or after them (MMSA's feature tool, padding 'back')."""
    d = _split(rng, n, t=(steps, steps, steps), dims=(20, 768, 5), labels="mmsa")
    for m in ("vision", "text", "audio"):
        for i, length in enumerate(lengths):
            real = d[m][i, :length].copy()
            d[m][i] = 0.0
            d[m][i, :length] = real if at_end else 0.0
            if not at_end:
                d[m][i, steps - length:] = real
    return d


def test_a_file_padded_at_the_end_is_read_as_one_padded_at_the_front(tmp_path):
    lengths = {"train": [3, 8, 5, 1, 8, 2], "valid": [4, 2, 8], "test": [8, 6, 2]}
    front = {s: _padded(np.random.default_rng(i), len(n), n, at_end=False) for i, (s, n) in enumerate(lengths.items())}
    end = {s: _padded(np.random.default_rng(i), len(n), n, at_end=True) for i, (s, n) in enumerate(lengths.items())}
    as_front, as_end = load(_write(tmp_path, front, "front.pkl")), load(_write(tmp_path, end, "end.pkl"))
    for split in lengths:
        for m in ("vision", "text", "audio"):
            assert torch.equal(as_end[split].features[m], as_front[split].features[m]), (split, m)
    assert as_end.digest == as_front.digest                                  # the same data, as trained on
    assert as_end.repadded["train"] == {"vision": 4, "text": 4, "audio": 4}  # the 4 shorter than 8 steps
    assert "padding:   train: padded at the end, moved to the front" in as_end.summary()
    assert "padding:" not in as_front.summary() and as_front.repadded["train"] == {"vision": 0, "text": 0, "audio": 0}


def test_a_front_padded_file_with_empty_last_steps_is_left_as_it_is(tmp_path):
    rng = np.random.default_rng(7)
    raw = {s: _padded(rng, 5, [8, 8, 8, 3, 4], at_end=False) for s in ("train", "valid", "test")}
    raw["train"]["vision"][:3, -1] = 0.0          # no face in the last frame of the 3 full-length samples
    raw["train"]["audio"][2, -1] = 0.0
    data = load(_write(tmp_path, raw))
    for m in ("vision", "audio"):
        assert torch.equal(data["train"].features[m], torch.from_numpy(raw["train"][m])), m
    assert not any(n for moved in data.repadded.values() for n in moved.values())


def test_an_end_padded_files_modalities_move_together_with_the_text(tmp_path):
    lengths = [3, 8, 5, 2]
    raw = {s: _padded(np.random.default_rng(i), 4, lengths, at_end=True) for i, s in enumerate(("train", "valid",
                                                                                                 "test"))}
    raw["train"]["vision"][0, 2] = 0.0            # sample 0's last real frame has no face: still 3 steps long
    data = load(_write(tmp_path, raw))
    vision, text = data["train"].features["vision"], data["train"].features["text"]
    assert torch.equal(vision[0, -3:-1], torch.from_numpy(raw["train"]["vision"][0, :2]))   # aligned with the words
    assert text[0, -3:].ne(0).any(dim=1).all() and not text[0, :-3].any()


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


def _set(split, key, value):
    return lambda r: r[split].update({key: value(r[split]) if callable(value) else value})


def _mmsa_labels(split, value):
    def mutate(raw):
        del raw[split]["labels"]
        raw[split]["regression_labels"] = value
    return mutate


def _all_splits(key, value):
    return lambda r: [r[s].update({key: value(r[s])}) for s in r]


# What is wrong with the file, and the words the one-line message must hold (a regex).
BAD_FILES = [
    ("a split is missing", lambda r: r.pop("valid"), r"missing split 'valid'"),
    ("a split is not a dict", lambda r: r.update(train=[1, 2]), r"split 'train' is a list, expected a dict of arrays"),
    ("a modality is missing", lambda r: r["test"].pop("audio"), r"split 'test' has no key 'audio'"),
    ("no labels", lambda r: r["train"].pop("labels"), r"split 'train' has no key 'labels' or 'regression_labels'"),
    ("sample counts differ", _set("train", "text", lambda d: d["text"][:3]),
     r"'text' has 3 samples but 'labels' has 4"),
    ("features are 2-D", _set("valid", "vision", lambda d: d["vision"][:, 0]),
     r"'vision' must be 3-D .* got shape \(4, 35\)"),
    ("features are 4-D", _set("valid", "text", lambda d: d["text"][..., None]),
     r"'text' must be 3-D .* got shape \(4, 6, 300, 1\)"),
    ("sequences of length 0", _all_splits("audio", lambda d: d["audio"][:, :0]),
     r"split 'train': 'audio' has sequences of 0 steps, shape \(4, 0, 74\) \(expected at least 1 step\)"),
    ("0 features per step", _all_splits("vision", lambda d: d["vision"][..., :0]), r"'vision' has 0 features per step"),
    ("a split is empty", lambda r: r.update(test={k: v[:0] for k, v in r["test"].items()}), r"split 'test' is empty"),
    ("feature dims differ across splits", _set("test", "audio", lambda d: d["audio"][..., :5]),
     r"'audio' has 5 features per step in split 'test' but 74"),
    ("string features", _set("train", "text", np.array(["a"] * 4)),
     r"split 'train': 'text' must hold real numbers \(a float or int array\), got dtype <U1"),
    ("complex features", _set("train", "audio", lambda d: d["audio"].astype(np.complex64)),
     r"'audio' must hold real numbers .* got dtype complex64"),
    ("bool features", _set("valid", "vision", lambda d: d["vision"] > 0),
     r"'vision' must hold real numbers .* got dtype bool"),
    ("object features", _set("train", "text", [None] * 4), r"'text' must hold real numbers .* got dtype object"),
    ("datetime features", _set("train", "text", np.zeros((4, 6, 300), "datetime64[s]")),
     r"'text' must hold real numbers .* got dtype datetime64\[s\]"),
    ("ragged features", _set("train", "text", [np.zeros((6, 300)), np.zeros((5, 300))] * 2),
     r"split 'train': 'text' is not an array of one shape \(.*inhomogeneous"),
    ("huge finite features", _set("valid", "text", lambda d: np.where(d["text"] > 2, np.float32(1e30), d["text"])),
     r"split 'valid': 'text' holds \d+ finite values beyond \+-1e\+18, the first 1e\+30 at \[.*rescale"),
    ("float64 features beyond float32", _set("test", "audio", lambda d: d["audio"].astype(np.float64) * 1e300),
     r"split 'test': 'audio' holds \d+ finite values beyond \+-1e\+18"),
    ("huge int features", _set("train", "vision", np.full((4, 6, 35), 2 ** 62, dtype=np.int64)),
     r"'vision' holds 840 finite values beyond"),
    ("labels of a wrong shape", _set("train", "labels", np.zeros((4, 2))),
     r"'labels' must have shape \(N,\), \(N, 1\) or \(N, 1, 1\), got \(4, 2\)"),
    ("labels are one number", _set("train", "labels", np.float32(1)), r"'labels' must have shape .* got \(\)"),
    ("labels are strings", _set("train", "labels", np.array(["pos"] * 4)),
     r"'labels' must hold real numbers .* got dtype <U3"),
    ("labels are bools", _set("train", "labels", np.ones(4, bool)),
     r"'labels' must hold real numbers .* got dtype bool"),
    ("labels are missing values", _set("train", "labels", None),
     r"'labels' must hold real numbers .* got dtype object"),
    ("a NaN label", lambda r: r["valid"]["labels"].__setitem__((2, 0, 0), np.nan),
     r"split 'valid': 'labels' has a non-finite value at index 2"),
    ("an infinite label", lambda r: r["test"]["labels"].__setitem__((1, 0, 0), -np.inf),
     r"split 'test': 'labels' has a non-finite value at index 1"),
    ("labels outside [-3, 3]", _set("train", "labels", np.array([0.5, 10.0, -4.0, 1.0])),
     r"split 'train': 'labels' must be sentiment scores in \[-3, 3\], got 10 at index 1 \(2 outside in all\)"),
    ("MMSA labels on a percent scale", _mmsa_labels("test", np.full(4, 50.0)),
     r"split 'test': 'regression_labels' must be sentiment scores in \[-3, 3\], got 50 at index 0 \(4 outside"),
    ("one id for the whole split", _set("train", "id", "vid0"), r"'id' must have one row per sample, got a single str"),
    ("an id that is a number", _set("train", "id", 7), r"'id' must have one row per sample, got a single int"),
    ("too few ids", _set("train", "id", np.array(["a", "b"])), r"'id' has 2 rows but there are 4 samples"),
    ("missing ids", _set("valid", "id", [None] * 4),
     r"split 'valid': 'id' rows must hold strings, byte strings or integers, got NoneType None in row 0"),
    ("float ids", _set("valid", "id", np.array([0.5, 1.5, 2.5, 3.5])),
     r"'id' rows must hold .* got float 0.5 in row 0"),
    ("oracle of another length", _set("train", "oracle", np.zeros(3)), r"'oracle' has 3 values but 'labels' has 4"),
    ("a NaN oracle", _set("train", "oracle", np.array([0, np.nan, 0, 0])),
     r"'oracle' has a non-finite value at index 1"),
    ("oracle strings", _set("train", "oracle", np.array(["x"] * 4)), r"'oracle' must hold real numbers"),
    ("two label keys that disagree", lambda r: r["train"].update(regression_labels=np.array([0.4, 0, 0, 0])),
     r"split 'train' holds both 'labels' and 'regression_labels', which disagree \(first at index \d\): expected"),
    ("two label keys of other lengths", lambda r: r["valid"].update(regression_labels=np.zeros(3)),
     r"split 'valid' holds both .* \(3 against 4 values\)"),
    ("constant validation labels", _set("valid", "labels", np.full(4, 1.5)),
     r"split 'valid': all 4 labels are 1.5 \(expected at least 2 different sentiment scores: the correlation"),
    ("constant test labels", _set("test", "labels", np.zeros((4, 1))), r"split 'test': all 4 labels are 0 "),
    ("one test sample", lambda r: r.update(test={k: v[:1] for k, v in r["test"].items()}),
     r"split 'test' has 1 sample \(expected at least 2 with different sentiment scores"),
]


def test_two_label_keys_that_agree_are_read(tmp_path):
    rng = np.random.default_rng(10)
    raw = {s: _split(rng, 4) for s in ("train", "valid", "test")}
    raw["train"]["regression_labels"] = raw["train"]["labels"].reshape(-1).astype(np.float64)
    data = load(_write(tmp_path, raw))
    np.testing.assert_allclose(data["train"].labels.numpy(), raw["train"]["labels"].reshape(-1))


def test_constant_or_single_labels_are_fine_in_train_and_in_a_file_to_predict_on(tmp_path):
    rng = np.random.default_rng(9)
    raw = {s: _split(rng, 4) for s in ("train", "valid", "test")}
    raw["train"] = {k: v[:1] for k, v in raw["train"].items()}
    assert load(_write(tmp_path, raw, "one-train.pkl")).sizes["train"] == 1
    raw["test"]["labels"] = np.zeros(4)
    assert load(_write(tmp_path, raw, "predict.pkl"), partial=True).sizes["test"] == 4


@pytest.mark.parametrize("mutate, message", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_bad_files_get_one_clear_error(tmp_path, mutate, message):
    path = _bad(tmp_path, mutate)
    with pytest.raises(DataError, match=message) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)


def test_no_warning_reaches_the_user_from_bad_or_odd_arrays(tmp_path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow/complex warnings would print a second stderr line
        for mutate, _ in [c[1:] for c in BAD_FILES]:
            with pytest.raises(DataError):
                load(_bad(tmp_path, mutate))
        load(_bad(tmp_path, _set("train", "text", lambda d: d["text"].astype(np.float16))))


def test_real_numbers_of_any_width_and_int_ids_are_converted(tmp_path):
    rng = np.random.default_rng(7)
    raw = {s: _split(rng, 4) for s in ("train", "valid", "test")}
    raw["train"].update(text=np.arange(4 * 6 * 300).reshape(4, 6, 300),            # int64
                        vision=raw["train"]["vision"].astype(np.float16),
                        audio=raw["train"]["audio"].astype(np.float64),
                        labels=np.array([-3, 0, 2, 3]),                                # int labels
                        id=np.arange(10, 14))                                         # int ids
    raw["valid"].update(labels=np.array([3.0005, -3.0005, 0.0, 1.0]),                 # float rounding at the ends
                        id=np.array([["v", 1], ["v", 2], ["w", 1], ["w", 2]], dtype=object))
    raw["test"]["text"][0, 0, 0] = 1e18                                               # large, but trainable
    data = load(_write(tmp_path, raw))
    train = data["train"]
    assert all(t.dtype == torch.float32 for t in train.features.values())
    assert train.features["text"][0, 0, 5] == 5 and train.labels.tolist() == [-3, 0, 2, 3]
    np.testing.assert_array_equal(train.features["vision"].numpy(), raw["train"]["vision"].astype(np.float32))
    assert train.ids == ["10", "11", "12", "13"]
    assert data["valid"].ids == ["v$_$1", "v$_$2", "w$_$1", "w$_$2"]
    assert data["test"].features["text"][0, 0, 0] == np.float32(1e18)


def test_a_message_is_always_one_line():
    assert str(DataError("a\nb\r\nc")) == "a b c"


def test_not_a_file_not_a_pickle_and_truncated(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load(tmp_path / "missing.pkl")
    with pytest.raises(DataError, match="not a file but a directory"):
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


def test_a_compressed_or_other_format_file_is_named_for_what_it_is(tmp_path):
    import gzip

    rng = np.random.default_rng(6)
    whole = _write(tmp_path, {s: _split(rng, 4) for s in ("train", "valid", "test")})
    packed = tmp_path / "mosi_raw.pkl.gz"
    packed.write_bytes(gzip.compress(whole.read_bytes()))
    with pytest.raises(DataError, match=r"mosi_raw.pkl.gz: a gzip-compressed file \(decompress it first"):
        load(packed)
    archive = tmp_path / "features.npz"
    np.savez(archive, text=np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match=r"features.npz: a zip archive \(numpy's .npz is one\), expected a pickle"):
        load(archive)


def _fifo(tmp_path):
    path = tmp_path / "pipe"
    os.mkfifo(path)
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.pkl"
    path.touch()
    return path


def _inside_a_file(tmp_path):
    (tmp_path / "data.pkl").write_bytes(b"x")
    return tmp_path / "data.pkl" / "train.pkl"


# Paths a user can give by mistake: each ends in one DataError naming the path.
BAD_PATHS = [
    ("missing", lambda p: p / "missing.pkl", r"no such file"),
    ("under a file", _inside_a_file, r"no such file"),
    ("a directory", lambda p: p, r"not a file but a directory \(expected a pickle file\)"),
    ("a named pipe", _fifo, r"not a file \(expected a pickle file, found a device, pipe or socket\)"),
    ("empty", _empty, r"the file is empty, expected a pickle"),
]


@pytest.mark.parametrize("make, message", [c[1:] for c in BAD_PATHS], ids=[c[0] for c in BAD_PATHS])
def test_bad_paths_get_one_clear_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(DataError, match=message) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: ")


def test_a_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    import msa.data

    path = _bad(tmp_path, lambda r: None)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(msa.data, "open", denied, raising=False)
    with pytest.raises(DataError, match=r"cannot be read \(permission denied; the file must be readable") as err:
        load(path)
    assert str(err.value).startswith(f"{path}: ")

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(msa.data, "open", broken, raising=False)
    with pytest.raises(DataError, match=r"cannot be read \(Input/output error\)"):
        load(path)


def test_a_file_without_read_permission_is_named(tmp_path):
    path = _bad(tmp_path, lambda r: None)
    path.chmod(0)
    if os.access(path, os.R_OK):  # root (with CAP_DAC_OVERRIDE) reads it anyway
        pytest.skip("this user reads files without read permission")
    try:
        with pytest.raises(DataError, match=r"cannot be read \(permission denied"):
            load(path)
    finally:
        path.chmod(0o644)
