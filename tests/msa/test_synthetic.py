"""The synthetic stand-in: deterministic, MOSI-shaped, labelled synthetic, with MOSI's modality ranking."""

import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from sklearn.linear_model import RidgeCV

from msa.config import RunConfig
from msa.synthetic import SyntheticSpec, _read_words, _utterances, _vocabulary, expected_label, make_synthetic
from msa.training import fit


def test_deterministic_and_seed_dependent():
    a = make_synthetic(sizes=(20, 10, 10), seq_len=10, seed=3)
    b = make_synthetic(sizes=(20, 10, 10), seq_len=10, seed=3)
    c = make_synthetic(sizes=(20, 10, 10), seq_len=10, seed=4)
    assert a.digest == b.digest != c.digest
    assert torch.equal(a["test"].features["text"], b["test"].features["text"])


def test_shape_padding_grid_inf_and_labels(tiny_data):
    assert tiny_data.synthetic and tiny_data.layout == "synthetic"
    assert "SYNTHETIC" in tiny_data.summary()
    assert tiny_data.dims == {"vision": 35, "text": 300, "audio": 74}
    assert tiny_data.sizes == {"train": 48, "valid": 24, "test": 24}
    assert sum(c["audio"] for c in tiny_data.cleaned.values()) > 0          # -inf were present
    for split in tiny_data.splits.values():
        real = (split.features["text"] != 0).any(-1)                        # (N, T)
        # front padding: once a row has a real step, every later step is real
        assert torch.equal(real, real.int().cummax(dim=1).values.bool())
        assert (real.sum(1) >= 3).all()
        y = split.labels.numpy()
        assert y.min() >= -3 and y.max() <= 3
        np.testing.assert_allclose(y * 5, np.round(y * 5), atol=1e-4)      # mean of 5 integer scores
        assert split.oracle is not None


@pytest.mark.parametrize("bad, words", [
    ({"seq_len": 2}, "seq_len must be >= 3"),
    ({"sizes": (10, 0, 5)}, "sizes must be three integers"),
    ({"polar_words": 2990}, "vocab > 20 + polar_words"),
    ({"negation": 0.7, "intensify": 0.5}, "sum <= 1"),
])
def test_bad_spec_is_refused_with_a_clear_message(bad, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        SyntheticSpec(**bad)


def test_cache_returns_the_same_data(tmp_path):
    first = make_synthetic(sizes=(12, 6, 6), seq_len=8, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("synthetic-*.pkl"))) == 1
    second = make_synthetic(sizes=(12, 6, 6), seq_len=8, cache_dir=tmp_path)
    assert first.digest == second.digest and second.synthetic and second.has_oracle


def test_oracle_is_the_expected_annotator_score():
    rng = np.random.default_rng(0)
    mu = np.array([-2.7, -0.4, 0.0, 1.3, 2.9])
    draws = np.clip(np.round(mu[:, None] + rng.normal(0, 1.1, (5, 200_000))), -3, 3).mean(1)
    np.testing.assert_allclose(expected_label(mu, 1.1), draws, atol=0.01)


def _pooled(split, modality):
    x = split.features[modality].numpy()
    real = (x != 0).any(-1, keepdims=True)
    return (x * real).sum(1) / np.maximum(real.sum(1), 1)


@pytest.fixture(scope="module")
def mosi_sized():
    return make_synthetic(SyntheticSpec())  # the default, MOSI-sized


def _ridge_corr(data, modalities):
    """Test Corr of a ridge regression on mean-pooled features: the bag-of-words (bag-of-frames) baseline."""
    xtr = np.concatenate([_pooled(data["train"], m) for m in modalities], axis=1)
    xte = np.concatenate([_pooled(data["test"], m) for m in modalities], axis=1)
    mean, std = xtr.mean(0), xtr.std(0) + 1e-6
    model = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit((xtr - mean) / std, data["train"].labels.numpy())
    return np.corrcoef(model.predict((xte - mean) / std), data["test"].labels.numpy())[0, 1]


def test_single_modality_ranking_matches_mosi(mosi_sized):
    corr = {m: _ridge_corr(mosi_sized, [m]) for m in ("text", "vision", "audio")}
    # measured: text 0.416, vision 0.177, audio 0.081; thresholds at about half the gaps
    assert corr["text"] > corr["vision"] + 0.12 and corr["vision"] > corr["audio"] + 0.05, corr
    oracle_corr = np.corrcoef(mosi_sized["test"].oracle.numpy(), mosi_sized["test"].labels.numpy())[0, 1]
    assert oracle_corr > corr["text"] + 0.3


def test_fusing_modalities_helps_even_a_bag_of_features(mosi_sized):
    text, fused = _ridge_corr(mosi_sized, ["text"]), _ridge_corr(mosi_sized, ["vision", "text", "audio"])
    assert fused > text + 0.025, (text, fused)      # measured: 0.465 against 0.416


def test_a_sequence_model_reads_the_text_better_than_a_bag_of_words(mosi_sized):
    bag = _ridge_corr(mosi_sized, ["text"])
    config = RunConfig.from_dict({"model": {"modalities": ["text"]}, "train": {"epochs": 5}})
    lstm = fit(config, mosi_sized, seed=1111, threads=1).test_metrics["Corr"]
    assert lstm > bag + 0.08, (bag, lstm)


def test_words_are_read_in_order():
    polarity = np.zeros(30)
    polarity[20], polarity[21] = 1.0, -0.5          # ids 0-9 negate, 10-19 intensify, 22+ neutral
    pad = -1
    rows = {
        "plain": ([pad, 25, 20], 1.0),
        "negated": ([pad, 3, 20], -1.0),
        "negation reaches over a neutral word": ([3, 25, 20], -1.0),
        "double negation": ([3, 4, 20], 1.0),
        "intensified": ([pad, 12, 21], -1.0),
        "a modifier binds only the next sentiment word": ([3, 20, 20], 0.0),
        "negated intensified": ([3, 12, 21], 1.0),
        "an intensifier binds only the next sentiment word": ([12, 20, 20], 3.0),
    }
    got = _read_words(np.array([r for r, _ in rows.values()]), polarity)
    counts = np.array([1, 1, 1, 1, 1, 2, 1, 2])
    want = np.array([v for _, v in rows.values()]) / np.sqrt(counts)
    np.testing.assert_allclose(got, want, err_msg=str(list(rows)))


def test_negation_makes_order_matter_but_leaves_the_bag_informative():
    spec = SyntheticSpec()
    rng = np.random.default_rng(0)
    _, polarity, neutral_p = _vocabulary(rng, spec)
    words, _ = _utterances(rng, spec, 2000, neutral_p)
    in_order = _read_words(words, polarity)
    bag = np.where(words >= 0, polarity[np.maximum(words, 0)], 0.0).sum(1)
    r = np.corrcoef(in_order, bag)[0, 1]
    assert 0.4 < r < 0.8, r                         # about 1 - 2 x (share negated)


def test_two_writers_filling_one_empty_cache_both_succeed(tmp_path, monkeypatch):
    import msa.synthetic

    expected = make_synthetic(sizes=(12, 6, 6), seq_len=8).digest
    # Both find the cache empty, both write, then both move their file into place: the race two
    # `prepare` runs on a fresh machine meet, made certain by waiting for each other at each step.
    barrier = threading.Barrier(2, timeout=30)
    generate, write = msa.synthetic.generate_raw, msa.synthetic.write_pickle

    def generate_together(spec):
        raw = generate(spec)
        barrier.wait()
        return raw

    def write_together(raw, path):
        write(raw, path)
        barrier.wait()

    monkeypatch.setattr(msa.synthetic, "generate_raw", generate_together)
    monkeypatch.setattr(msa.synthetic, "write_pickle", write_together)
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(make_synthetic, sizes=(12, 6, 6), seq_len=8, cache_dir=tmp_path) for _ in range(2)]
        digests = {run.result().digest for run in runs}
    assert digests == {expected}
    assert [p.name for p in tmp_path.iterdir()] == [next(tmp_path.glob("synthetic-*.pkl")).name]  # no temp files left


def test_a_cache_that_cannot_be_written_still_gives_the_data(tmp_path, caplog):
    not_a_dir = tmp_path / "cache"
    not_a_dir.write_text("a file where the cache directory should be")
    messages = []
    data = make_synthetic(sizes=(12, 6, 6), seq_len=8, cache_dir=not_a_dir, on_cache_error=messages.append)
    assert data.digest == make_synthetic(sizes=(12, 6, 6), seq_len=8).digest and data.synthetic
    assert messages == [(f"cannot write the synthetic data cache in {not_a_dir} (it is a file, not a directory); "
                         "generated the data in memory instead")]
    with caplog.at_level(logging.WARNING, logger="msa.synthetic"):  # without a callback: a logging warning
        make_synthetic(sizes=(12, 6, 6), seq_len=8, cache_dir=not_a_dir / "sub")
    assert [r.getMessage() for r in caplog.records] == [
        (f"cannot write the synthetic data cache in {not_a_dir / 'sub'} (Not a directory); "
         "generated the data in memory instead")]


def test_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    import msa.synthetic

    def full(raw, path):
        open(path, "wb").close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(msa.synthetic, "write_pickle", full)
    messages = []
    make_synthetic(sizes=(12, 6, 6), seq_len=8, cache_dir=tmp_path, on_cache_error=messages.append)
    assert messages == [(f"cannot write the synthetic data cache in {tmp_path} (No space left on device); "
                         "generated the data in memory instead")]
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_cache_directory_still_gives_the_data(tmp_path):
    tmp_path.chmod(0o500)
    if os.access(tmp_path, os.W_OK):  # root (with CAP_DAC_OVERRIDE) writes there anyway
        tmp_path.chmod(0o700)
        pytest.skip("this user writes into read-only directories")
    try:
        messages = []
        make_synthetic(sizes=(12, 6, 6), seq_len=8, cache_dir=tmp_path, on_cache_error=messages.append)
        assert len(messages) == 1 and "(Permission denied)" in messages[0]
    finally:
        tmp_path.chmod(0o700)


def test_a_damaged_cache_file_is_made_again(tmp_path):
    first = make_synthetic(sizes=(12, 6, 6), seq_len=8, cache_dir=tmp_path)
    cached = next(tmp_path.glob("synthetic-*.pkl"))
    cached.write_bytes(cached.read_bytes()[:100])
    messages = []
    again = make_synthetic(sizes=(12, 6, 6), seq_len=8, cache_dir=tmp_path, on_cache_error=messages.append)
    assert again.digest == first.digest
    assert len(messages) == 1 and messages[0].startswith(f"ignored the cached synthetic data: {cached}: not a readable")
    assert make_synthetic(sizes=(12, 6, 6), seq_len=8, cache_dir=tmp_path, on_cache_error=messages.append).digest \
        == first.digest and len(messages) == 1                  # rewritten whole
