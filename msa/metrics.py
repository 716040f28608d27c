"""The field's standard MOSI regression metrics, computed exactly as MMSA's `eval_mosi_regression`.

Reference: MMSA `utils/metricsTop.py`. Binary accuracies/F1 come in two variants: `Has0` counts
label 0 as positive (t >= 0), `Non0` drops samples whose label is exactly 0 and uses t > 0.
Weighted F1 is not symmetric in its arguments: truth goes first (MulT's own code swaps them).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

METRIC_NAMES: tuple[str, ...] = (
    "Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score",
    "Mult_acc_3", "Mult_acc_5", "Mult_acc_7", "MAE", "Corr",
)
# Direction of improvement, used by model selection and by every comparison table.
HIGHER_IS_BETTER: dict[str, bool] = {name: name != "MAE" for name in METRIC_NAMES}


def is_better(value: float, best: float | None, *, higher: bool) -> bool:
    """Whether `value` replaces `best` (None: nothing yet) as the best so far: the one rule for
    checkpoint selection, pruning reports and search results.

    NaN never wins over a number, but a first value is kept even when NaN, so that a best always
    exists; ties keep the earlier value."""
    if best is None:
        return True
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value > best if higher else value < best


def _flat(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor, on any device
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def multiclass_acc(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    """Overall accuracy of rounded scores (numpy's round: half to even), not a per-class mean."""
    return float(np.sum(np.round(y_pred) == np.round(y_true)) / len(y_true))


def pearson(y_pred: np.ndarray, y_true: np.ndarray) -> float:
    """Pearson correlation; NaN (with a warning) when either side is constant."""
    if np.std(y_pred) == 0 or np.std(y_true) == 0:
        warnings.warn("Corr is undefined for constant predictions or labels; reporting NaN",
                      RuntimeWarning, stacklevel=3)
        return float("nan")
    return float(np.corrcoef(y_pred, y_true)[0][1])


def f1_score_weighted(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """scikit-learn's `f1_score(y_true, y_pred, average="weighted")`, with its arithmetic step for step
    (per label 2 tp / (true + predicted), averaged with the true counts as weights), so the same float.
    Here rather than imported: importing sklearn.metrics cost each process 1-2 s for two sums."""
    labels = np.union1d(y_true, y_pred)
    tp = np.array([np.sum((y_true == c) & (y_pred == c)) for c in labels])
    true_sum = np.array([np.sum(y_true == c) for c in labels])
    pred_sum = np.array([np.sum(y_pred == c) for c in labels])
    if true_sum.sum() == 0:
        return 0.0
    denom = true_sum.astype(np.float64) + pred_sum.astype(np.float64)
    f = 2.0 * tp.astype(np.float64) / np.where(denom > 0, denom, 1.0)  # a label in neither has weight 0
    return float(np.average(f, weights=true_sum))


def eval_mosi_regression(y_pred: Any, y_true: Any) -> dict[str, float]:
    """MMSA's MOSI metrics (plus Mult_acc_3), each rounded to 4 places.

    Accepts numpy arrays or torch tensors of shape (N,) or (N, 1).
    """
    p, t = _flat(y_pred), _flat(y_true)
    assert p.shape == t.shape, f"predictions {p.shape} and labels {t.shape} differ in size"
    assert p.size > 0, "no predictions to evaluate"

    non_zero = t != 0
    has0_p, has0_t = p >= 0, t >= 0
    non0_p, non0_t = p[non_zero] > 0, t[non_zero] > 0
    results = {
        "Has0_acc_2": float(np.mean(has0_p == has0_t)),
        "Has0_F1_score": float(f1_score_weighted(has0_t, has0_p)),
        # MMSA divides by the non-zero count as-is; an all-zero label set is degenerate, report NaN.
        "Non0_acc_2": float(np.mean(non0_p == non0_t)) if non_zero.any() else float("nan"),
        "Non0_F1_score": float(f1_score_weighted(non0_t, non0_p)) if non_zero.any() else float("nan"),
        "Mult_acc_3": multiclass_acc(np.clip(p, -1, 1), np.clip(t, -1, 1)),
        "Mult_acc_5": multiclass_acc(np.clip(p, -2, 2), np.clip(t, -2, 2)),
        "Mult_acc_7": multiclass_acc(np.clip(p, -3, 3), np.clip(t, -3, 3)),
        "MAE": float(np.mean(np.abs(p - t))),
        "Corr": pearson(p, t),
    }
    return {k: round(v, 4) for k, v in results.items()}
