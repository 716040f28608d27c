"""The statistics: every metric on bootstrap resamples of the test samples, vectorised over resamples,
and the interval and direction mark of a difference to the baseline."""

from __future__ import annotations

import math

import numpy as np
from scipy.special import stdtrit

from msa.metrics import HIGHER_IS_BETTER, METRIC_NAMES
from pipelines.comparison.model import BETTER, SAME, WORSE


def resample_weights(n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(B, N) bootstrap weights: how often each of N test samples is drawn in each of B resamples of N."""
    idx = rng.integers(0, n, size=(n_boot, n))
    return counts_of(idx, n)


def counts_of(idx: np.ndarray, n: int) -> np.ndarray:
    """Resampled indices (B, N) -> per-resample counts of each sample (B, N)."""
    rows = idx.shape[0]
    flat = (idx + n * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)


def resampled_metrics(pred: np.ndarray, label: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Every metric of msa.metrics on each resample, {name: (B,)}, for resample counts `weights` (B, N).

    Same definitions as `eval_mosi_regression` (a test checks it), without its rounding. Each metric
    is a ratio of sums over samples, so one matrix product (B, N) @ (N, k) does every resample at once.
    """
    p, t = np.asarray(pred, np.float64), np.asarray(label, np.float64)
    assert p.shape == t.shape == weights.shape[1:], f"pred {p.shape}, label {t.shape}, weights {weights.shape}"
    pc, tc = p - p.mean(), t - t.mean()  # centred first, so the Corr sums do not cancel catastrophically
    non_zero = t != 0
    columns = {
        "has0_hit": (p >= 0) == (t >= 0), **_f1_columns("has0", t >= 0, p >= 0, np.ones_like(non_zero)),
        "non0": non_zero, "non0_hit": ((p > 0) == (t > 0)) & non_zero, **_f1_columns("non0", t > 0, p > 0, non_zero),
        **{f"mult{b}": np.round(np.clip(p, -b, b)) == np.round(np.clip(t, -b, b)) for b in (1, 2, 3)},
        "abs_err": np.abs(p - t), "p": pc, "t": tc, "pp": pc * pc, "tt": tc * tc, "pt": pc * tc,
    }
    sums = dict(zip(columns, (weights @ np.stack(list(columns.values()), axis=1).astype(np.float64)).T))  # (B,) each
    n = weights.sum(axis=1)
    mp, mt = sums["p"] / n, sums["t"] / n
    var_p, var_t = np.maximum(sums["pp"] / n - mp ** 2, 0), np.maximum(sums["tt"] / n - mt ** 2, 0)
    out = {
        "Has0_acc_2": sums["has0_hit"] / n,
        "Has0_F1_score": _weighted_f1(sums, "has0", n),
        "Non0_acc_2": _safe_divide(sums["non0_hit"], sums["non0"]),
        "Non0_F1_score": _weighted_f1(sums, "non0", sums["non0"]),
        "Mult_acc_3": sums["mult1"] / n, "Mult_acc_5": sums["mult2"] / n, "Mult_acc_7": sums["mult3"] / n,
        "MAE": sums["abs_err"] / n,
        # Constant predictions (or labels) in a resample: Corr undefined, as np.corrcoef gives NaN.
        "Corr": _safe_divide(sums["pt"] / n - mp * mt, np.sqrt(var_p * var_t), floor=1e-12),
    }
    assert tuple(out) == METRIC_NAMES, f"resampled metrics {tuple(out)} out of step with {METRIC_NAMES}"
    return out


def _f1_columns(prefix: str, truth: np.ndarray, pred: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per-sample indicators whose resampled sums give each class's support, predictions and hits."""
    out = {}
    for cls in (True, False):
        t, p = (truth == cls) & mask, (pred == cls) & mask
        out |= {f"{prefix}_{cls}_support": t, f"{prefix}_{cls}_predicted": p, f"{prefix}_{cls}_hits": t & p}
    return out


def _weighted_f1(sums: dict[str, np.ndarray], prefix: str, total: np.ndarray) -> np.ndarray:
    """sklearn's f1_score(truth, pred, average='weighted') from per-class counts."""
    score = np.zeros_like(total)
    for cls in (True, False):
        support = sums[f"{prefix}_{cls}_support"]
        f1 = _safe_divide(2 * sums[f"{prefix}_{cls}_hits"], support + sums[f"{prefix}_{cls}_predicted"])
        score += support * np.nan_to_num(f1)  # a class with no support has weight 0: its undefined F1 never counts
    return _safe_divide(score, total)


def _safe_divide(num: np.ndarray, den: np.ndarray, floor: float = 0.0) -> np.ndarray:
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=den > floor)


BOTH_LEVELS = "test samples bootstrapped, seeds by Welch's t"  # the test, in the words every report uses


def whole_test_scores(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """A run's metrics on the whole test set (one 'resample' that draws every sample once)."""
    return {m: float(v[0]) for m, v in resampled_metrics(pred, label, np.ones((1, len(label)))).items()}


def difference_intervals(ablation: dict[int, np.ndarray], baseline: dict[int, dict[str, np.ndarray]],
                         base_scores: dict[int, dict[str, float]], label: np.ndarray, weights: np.ndarray,
                         level: float = 0.95) -> dict[str, tuple[float, float]]:
    """The interval of (mean over the ablation's seeds - mean over the baseline's) for every metric,
    around that difference, as wide as the larger of its two sources of noise makes it (the runs' own
    scores already hold the test-sample noise that differs between runs: adding both counts it twice):
    - the test set's sampling noise: a bootstrap over test samples, every run of both sides scored on
      the same resamples (`weights`), so the difference is paired on samples;
    - the seed-to-seed spread: Welch's t over the runs' own scores. With the few seeds a suite has,
      a bootstrap over seeds would span only the observed ones (a test of it marked 20% of 3 vs 3
      same-config rows); t's degrees of freedom make 3 seeds a side as wide as they should be. A
      side with one seed has no spread to go by: `markable` says so.

    `ablation` maps seed -> test predictions; `baseline` maps seed -> the baseline's
    `resampled_metrics` on `weights`, `base_scores` seed -> its metrics on the whole test set."""
    mine = {seed: resampled_metrics(p, label, weights) for seed, p in ablation.items()}
    own = {seed: whole_test_scores(p, label) for seed, p in ablation.items()}
    out = {}
    for m in METRIC_NAMES:
        draws = np.mean([mine[s][m] for s in mine], axis=0) - np.mean([baseline[s][m] for s in baseline], axis=0)
        finite = draws[np.isfinite(draws)]
        a = np.array([own[s][m] for s in own])
        b = np.array([base_scores[s][m] for s in base_scores])
        if finite.size < 0.5 * draws.size or not (np.isfinite(a).all() and np.isfinite(b).all()):
            out[m] = (math.nan, math.nan)
            continue
        sides = [(x.var(ddof=1) / x.size, x.size) for x in (a, b) if x.size > 1]   # (variance of a mean, n)
        seed_var = sum(v for v, _ in sides)
        # Welch-Satterthwaite degrees of freedom; no seed spread at all: the normal quantile.
        df = seed_var ** 2 / sum(v ** 2 / (n - 1) for v, n in sides) if seed_var > 0 else 1e9
        half = float(stdtrit(df, 0.5 + level / 2)) * math.sqrt(max(seed_var, float(finite.var(ddof=1))))
        centre = float(a.mean() - b.mean())
        out[m] = (centre - half, centre + half)
    return out


def markable(n_ablation: int, n_baseline: int) -> bool:
    """Whether a difference may be marked ▲/▼: both sides on 2 seeds or more, so that the interval
    holds their seed-to-seed spread (SPEC: a one-seed difference is mostly noise)."""
    return min(n_ablation, n_baseline) >= 2


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution; NaN when the metric was undefined throughout."""
    finite = draws[np.isfinite(draws)]
    # A metric that is undefined on a few resamples only (e.g. constant labels) is judged on the rest.
    if finite.size < 0.5 * draws.size:
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


# The reports print an interval's ends with this many decimals; the mark is decided on what they show,
# so that [+0.000, +0.031] is never marked ▲, nor [+0.000, +0.000] (two runs of one model whose
# predictions differ by float rounding only, seen in a study whose winner was the baseline's config).
PRINTED_DIGITS = 3


def direction_mark(metric: str, ci_low: float, ci_high: float) -> str:
    """▲ better / ▼ worse than the baseline when the interval, as printed, excludes 0, else ~ (or ''
    if unknown)."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return ""
    if round(ci_low, PRINTED_DIGITS) <= 0 <= round(ci_high, PRINTED_DIGITS):
        return SAME
    higher = ci_low > 0
    return BETTER if higher == HIGHER_IS_BETTER[metric] else WORSE
