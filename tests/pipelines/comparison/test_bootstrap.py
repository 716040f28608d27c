"""The bootstrap statistics against the metrics' own definitions."""

import math

import numpy as np
import pytest

from msa.metrics import METRIC_NAMES, eval_mosi_regression
from pipelines.comparison import counts_of, direction_mark, interval, resampled_metrics


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


def test_an_interval_that_prints_as_zero_is_no_difference():
    # Two runs of one model that differ by float rounding only: the interval is [+1e-8, +3e-8], which excludes 0
    # but reads [+0.000, +0.000]; marking it ▼ would report a difference nobody can see.
    assert direction_mark("MAE", 1e-8, 3e-8) == "~" and direction_mark("Corr", -3e-8, -1e-8) == "~"
    assert direction_mark("MAE", 1e-8, 6e-4) == "▼" and direction_mark("Corr", 6e-4, 2e-3) == "▲"
