"""The statistics: every metric on bootstrap resamples of the test samples, vectorised over resamples,
and the interval and direction mark of a difference to the baseline."""

from __future__ import annotations

import math

import numpy as np

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


BOTH_LEVELS = "bootstrap over test samples and seeds"  # the test, in the words every report uses


def bootstrap_difference(ablation: dict[int, np.ndarray], baseline: dict[int, dict[str, np.ndarray]],
                         label: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Bootstrap distribution of (mean over the ablation's seeds - mean over the baseline's) for every
    metric, over both sources of noise in it (Bouthillier et al., 2021, "Accounting for variance in
    machine learning benchmarks"):
    - test samples: each draw's resample of them (`weights`) scores every run of both sides, so the
      difference is paired on samples;
    - seeds: each draw takes each side's seeds with replacement, independently (a seed number means
      nothing across two configs). With one seed on a side, its seed-to-seed spread is unknown and
      left out: `markable` says so.

    `ablation` maps seed -> test predictions; `baseline` maps seed -> the baseline's
    `resampled_metrics` on `weights`."""
    mine = {seed: resampled_metrics(p, label, weights) for seed, p in ablation.items()}
    a, b = _over_seeds(mine, rng), _over_seeds(baseline, rng)
    return {m: a[m] - b[m] for m in METRIC_NAMES}


def _over_seeds(per_seed: dict[int, dict[str, np.ndarray]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each draw's mean over a resample (with replacement) of the seeds, {metric: (B,)}."""
    stacked = {m: np.stack([per_seed[s][m] for s in sorted(per_seed)]) for m in METRIC_NAMES}  # (k, B) each
    k, draws = stacked[METRIC_NAMES[0]].shape
    pick = rng.integers(0, k, size=(draws, k))                       # the same seeds for every metric of a draw
    return {m: x[pick, np.arange(draws)[:, None]].mean(axis=1) for m, x in stacked.items()}


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
