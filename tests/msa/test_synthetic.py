"""The synthetic stand-in: deterministic, MOSI-shaped, labelled synthetic, with MOSI's modality ranking."""

import numpy as np
import torch
from sklearn.linear_model import Ridge

from msa.synthetic import SyntheticSpec, expected_label, make_synthetic


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


def test_single_modality_ranking_matches_mosi():
    data = make_synthetic(SyntheticSpec())  # the default, MOSI-sized
    corr = {}
    for m in ("text", "vision", "audio"):
        xtr, xte = _pooled(data["train"], m), _pooled(data["test"], m)
        mean, std = xtr.mean(0), xtr.std(0) + 1e-6
        model = Ridge(alpha=30.0).fit((xtr - mean) / std, data["train"].labels.numpy())
        corr[m] = np.corrcoef(model.predict((xte - mean) / std), data["test"].labels.numpy())[0, 1]
    assert corr["text"] > corr["vision"] + 0.15 and corr["vision"] > corr["audio"] + 0.05, corr
    oracle_corr = np.corrcoef(data["test"].oracle.numpy(), data["test"].labels.numpy())[0, 1]
    assert oracle_corr > corr["text"] + 0.2
