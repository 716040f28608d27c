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


def bootstrap_difference(ablation: dict[int, np.ndarray], baseline: dict[int, dict[str, np.ndarray]],
                         label: np.ndarray, weights: np.ndarray,
                         rng: np.random.Generator) -> tuple[dict[str, np.ndarray], str]:
    """Bootstrap distribution of (ablation - baseline) for every metric, and the test used, in words.

    `ablation` maps seed -> test predictions; `baseline` maps seed -> the baseline's
    `resampled_metrics` on `weights`. Seeds both have are paired: the same resamples of test samples
    score both runs of a seed, and the per-seed differences are averaged over the shared seeds. With
    no shared seed, the ablation's runs get resamples of their own (an unpaired bootstrap).
    """
    shared = sorted(set(ablation) & set(baseline))
    if shared:
        diffs = [_subtract(resampled_metrics(ablation[s], label, weights), baseline[s]) for s in shared]
        whole = len(shared) == len(ablation) == len(baseline)
        seeds = f"{len(shared)} seed{'s' if len(shared) > 1 else ''}"
        return _mean_of(diffs), f"paired, {seeds}" if whole else \
            f"paired on seed {', '.join(map(str, shared))} only; Δ uses every seed"
    own = resample_weights(len(label), weights.shape[0], rng)
    mine = _mean_of([resampled_metrics(p, label, own) for p in ablation.values()])
    return _subtract(mine, _mean_of(list(baseline.values()))), "unpaired (no seed shared with the baseline)"


def _subtract(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: a[k] - b[k] for k in a}


def _mean_of(items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.mean([d[k] for d in items], axis=0) for k in items[0]}


def interval(draws: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of a bootstrap distribution; NaN when the metric was undefined throughout."""
    finite = draws[np.isfinite(draws)]
    # A metric that is undefined on a few resamples only (e.g. constant labels) is judged on the rest.
    if finite.size < 0.5 * draws.size:
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(finite, [tail, 100 - tail])
    return float(low), float(high)


# Half a unit of the reports' last printed digit: an interval inside (-NEGLIGIBLE, NEGLIGIBLE) prints as
# [+0.000, +0.000] and is no difference, even when float noise keeps 0 just outside it (two runs of one
# model whose predictions differ by rounding only, seen in a study whose winner was the baseline's config).
NEGLIGIBLE = 5e-4


def direction_mark(metric: str, ci_low: float, ci_high: float) -> str:
    """▲ better / ▼ worse than the baseline when the interval excludes 0, else ~ (or '' if unknown).
    An interval that lies within ±NEGLIGIBLE of 0 counts as containing it."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return ""
    if ci_low <= 0 <= ci_high or max(abs(ci_low), abs(ci_high)) < NEGLIGIBLE:
        return SAME
    higher = ci_low > 0
    return BETTER if higher == HIGHER_IS_BETTER[metric] else WORSE
