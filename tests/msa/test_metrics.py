"""The metrics against a slow, obvious reference written from SPEC.md's definitions."""

import math

import numpy as np
import pytest
import torch

from msa.metrics import METRIC_NAMES, eval_mosi_regression


def _weighted_f1(truth, pred):
    total, score = len(truth), 0.0
    for cls in (False, True):
        tp = sum(1 for t, p in zip(truth, pred) if t == cls and p == cls)
        fp = sum(1 for t, p in zip(truth, pred) if t != cls and p == cls)
        fn = sum(1 for t, p in zip(truth, pred) if t == cls and p != cls)
        support = sum(1 for t in truth if t == cls)
        f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
        score += f1 * support / total
    return score


def _round_half_even(x):
    return float(np.round(x))


def reference(p, t):
    p, t = list(map(float, p)), list(map(float, t))
    n = len(t)
    has_t, has_p = [x >= 0 for x in t], [x >= 0 for x in p]
    nz = [i for i in range(n) if t[i] != 0]
    non_t, non_p = [t[i] > 0 for i in nz], [p[i] > 0 for i in nz]

    def mult(lo, hi):
        c = lambda x: min(max(x, lo), hi)
        return sum(_round_half_even(c(a)) == _round_half_even(c(b)) for a, b in zip(p, t)) / n

    mp, mt = sum(p) / n, sum(t) / n
    cov = sum((a - mp) * (b - mt) for a, b in zip(p, t))
    corr = cov / math.sqrt(sum((a - mp) ** 2 for a in p) * sum((b - mt) ** 2 for b in t))
    out = {
        "Has0_acc_2": sum(a == b for a, b in zip(has_p, has_t)) / n,
        "Has0_F1_score": _weighted_f1(has_t, has_p),
        "Non0_acc_2": sum(a == b for a, b in zip(non_p, non_t)) / len(nz),
        "Non0_F1_score": _weighted_f1(non_t, non_p),
        "Mult_acc_3": mult(-1, 1), "Mult_acc_5": mult(-2, 2), "Mult_acc_7": mult(-3, 3),
        "MAE": sum(abs(a - b) for a, b in zip(p, t)) / n,
        "Corr": corr,
    }
    return {k: round(v, 4) for k, v in out.items()}


@pytest.mark.parametrize("seed", range(5))
def test_matches_reference_on_random_data(seed):
    rng = np.random.default_rng(seed)
    t = np.round(rng.uniform(-3, 3, 200) * 5) / 5          # MOSI's annotator grid
    p = np.clip(t + rng.normal(0, 1.0, 200), -3, 3)
    got = eval_mosi_regression(p, t)
    assert list(got) == list(METRIC_NAMES)
    np.testing.assert_allclose([got[k] for k in METRIC_NAMES], [reference(p, t)[k] for k in METRIC_NAMES], atol=1e-4)


def test_tie_heavy_values_use_half_to_even_rounding_and_zero_rules():
    t = np.array([0.0, 0.0, 0.5, -0.5, 1.5, 2.5, -2.5, 3.0, -3.0, 0.0, 1.0, -1.0])
    p = np.array([0.0, -0.0001, 0.5, 0.5, 2.5, 1.5, -3.5, 2.5, -2.5, 0.4, -1.0, 1.0])
    got = eval_mosi_regression(p, t)
    np.testing.assert_allclose([got[k] for k in METRIC_NAMES], [reference(p, t)[k] for k in METRIC_NAMES], atol=1e-4)
    # 0.5 and -0.5 both round to 0 (half to even), 1.5 and 2.5 both round to 2
    assert got["Mult_acc_7"] == reference(p, t)["Mult_acc_7"]


def test_weighted_f1_puts_truth_first():
    t = np.array([1, 1, 1, 1, -1, -1, 1, 1, 1, 1.0])
    p = np.array([1, 1, 1, -1, -1, 1, 1, 1, -1, -1.0])
    from sklearn.metrics import f1_score

    got = eval_mosi_regression(p, t)["Has0_F1_score"]
    assert got == round(f1_score(t >= 0, p >= 0, average="weighted"), 4)
    assert got != round(f1_score(p >= 0, t >= 0, average="weighted"), 4)


def test_accepts_torch_and_column_shapes():
    rng = np.random.default_rng(7)
    t, p = rng.uniform(-3, 3, 50), rng.uniform(-3, 3, 50)
    expected = eval_mosi_regression(p, t)
    assert eval_mosi_regression(torch.tensor(p).view(-1, 1), torch.tensor(t)) == expected
    assert eval_mosi_regression(p.reshape(-1, 1), t.reshape(-1, 1)) == expected


def test_constant_predictions_give_nan_corr_with_warning():
    t = np.array([-1.0, 0.5, 2.0, -2.0])
    with pytest.warns(RuntimeWarning, match="Corr is undefined"):
        got = eval_mosi_regression(np.zeros(4), t)
    assert math.isnan(got["Corr"]) and got["MAE"] == 1.375


def test_weighted_f1_is_sklearns_float_for_float():
    # Computed here (importing sklearn.metrics cost each process 1-2 s): it must stay sklearn's number exactly.
    from sklearn.metrics import f1_score

    from msa.metrics import f1_score_weighted

    rng = np.random.default_rng(0)
    for i in range(500):
        n = int(rng.integers(1, 40))
        t = rng.random(n) < rng.random()
        p = t.copy() if i % 7 == 0 else np.ones(n, bool) if i % 11 == 0 else rng.random(n) < rng.random()
        assert f1_score_weighted(t, p) == f1_score(t, p, average="weighted", zero_division=0.0), (t, p)
