"""The bootstrap statistics against the metrics' own definitions."""

import math

import numpy as np
import pytest

from msa.metrics import METRIC_NAMES, eval_mosi_regression
from pipelines.comparison import (
    counts_of,
    difference_intervals,
    direction_mark,
    interval,
    resample_weights,
    resampled_metrics,
)
from pipelines.comparison.bootstrap import markable


def test_resampled_metrics_match_eval_mosi_regression():
    rng = np.random.default_rng(3)
    t = np.round(rng.uniform(-3, 3, 150) * 5) / 5
    p = np.clip(t + rng.normal(0, 1.2, 150), -3, 3)
    idx = np.vstack([np.arange(150), rng.integers(0, 150, size=(5, 150))])
    got = resampled_metrics(p, t, counts_of(idx, 150))
    assert tuple(got) == METRIC_NAMES
    for b in range(idx.shape[0]):
        want = eval_mosi_regression(p[idx[b]], t[idx[b]])
        np.testing.assert_allclose([got[m][b] for m in METRIC_NAMES], [want[m] for m in METRIC_NAMES], atol=6e-5,
                                   err_msg=f"resample {b}")
    constant = resampled_metrics(np.zeros(150), t, counts_of(idx, 150))
    assert np.isnan(constant["Corr"]).all() and constant["MAE"][0] == pytest.approx(np.abs(t).mean())


def test_interval_and_mark_follow_the_metric_direction():
    draws = np.linspace(0.01, 0.2, 1000)                                    # the ablation is higher throughout
    low, high = interval(draws)
    assert 0 < low < high
    assert direction_mark("Corr", low, high) == "▲" and direction_mark("MAE", low, high) == "▼"
    assert direction_mark("Corr", -0.1, 0.1) == "~" and direction_mark("Corr", math.nan, math.nan) == ""
    assert all(math.isnan(x) for x in interval(np.full(10, np.nan)))       # undefined throughout: no interval


def test_the_mark_follows_the_interval_as_printed():
    # Two runs of one model that differ by float rounding only: the interval is [+1e-8, +3e-8], which excludes 0
    # but reads [+0.000, +0.000]; marking it ▼ would report a difference nobody can see. So for [+0.000, +0.001].
    assert direction_mark("MAE", 1e-8, 3e-8) == "~" and direction_mark("Corr", -3e-8, -1e-8) == "~"
    assert direction_mark("MAE", 1e-8, 6e-4) == "~" and direction_mark("Corr", 4e-4, 0.031) == "~"
    assert direction_mark("MAE", 6e-4, 2e-3) == "▼" and direction_mark("Corr", 6e-4, 2e-3) == "▲"


def test_the_interval_holds_the_seed_to_seed_spread():
    """Both sides with the same mean error, one with runs that agree and one with runs that scatter
    from seed to seed: the scatter widens the interval; the test samples alone would not show it."""
    rng = np.random.default_rng(0)
    label = np.round(rng.uniform(-3, 3, 686) * 5) / 5
    noise = {s: np.random.default_rng(s).normal(0, 0.8, 686) for s in (1, 2, 3)}
    weights = resample_weights(686, 2000, np.random.default_rng(1))
    baseline = {s: resampled_metrics(label + noise[s], label, weights) for s in noise}
    scores = {s: {m: float(v[0]) for m, v in resampled_metrics(label + noise[s], label, np.ones((1, 686))).items()}
              for s in noise}
    agree = {s: label + noise[s] * 1.0 for s in noise}
    scatter = {s: label + noise[s] * scale for s, scale in zip(noise, (0.7, 1.0, 1.3))}
    width = {}
    for name, runs in (("agree", agree), ("scatter", scatter)):
        low, high = difference_intervals(runs, baseline, scores, label, weights)["MAE"]
        assert low <= 0 <= high, name
        width[name] = high - low
    assert width["scatter"] > 2 * width["agree"], width
    assert not markable(1, 3) and not markable(3, 1) and markable(2, 2)


def test_same_config_rows_are_rarely_marked_with_three_seeds_a_side():
    """Two sides of one config, 3 seeds each, runs differing from seed to seed: the share of rows marked
    ▲/▼ stays near the 5% the interval promises (a bootstrap over the seeds gave about 20%)."""
    rng = np.random.default_rng(0)
    label = np.round(rng.uniform(-3, 3, 686) * 5) / 5
    weights, whole = resample_weights(686, 300, np.random.default_rng(1)), np.ones((1, 686))

    def run(seed):
        r = np.random.default_rng(seed)
        return label * 0.6 * (1 + r.normal(0, 0.05)) + r.normal(0, 0.05) + r.normal(0, 1.0, 686)

    marked = 0
    for rep in range(60):
        a = {s: run(1000 * rep + s) for s in range(3)}
        b = {s: run(1000 * rep + 100 + s) for s in range(3)}
        base = {s: resampled_metrics(p, label, weights) for s, p in b.items()}
        scores = {s: {m: float(v[0]) for m, v in resampled_metrics(p, label, whole).items()} for s, p in b.items()}
        low, high = difference_intervals(a, base, scores, label, weights)["MAE"]
        marked += direction_mark("MAE", low, high) != "~"
    assert marked <= 6, marked                                            # 10% of 60, against ~12 before
