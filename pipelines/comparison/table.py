"""The comparison table: per-ablation statistics over seeds with the bootstrap interval to the
baseline, and the facts read off the runs themselves (which ablations are modality subsets)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from msa.metrics import METRIC_NAMES
from pipelines.comparison.bootstrap import (
    BOTH_LEVELS,
    difference_intervals,
    direction_mark,
    markable,
    resample_weights,
    resampled_metrics,
    whole_test_scores,
)
from pipelines.comparison.model import DISPLAY_ORDER, ORACLE, CompareError, RunRecord

# Only used when a run carries no `model.modalities` param (e.g. runs logged by other tools).
NAMED_SUBSETS: dict[str, tuple[str, ...]] = {
    "text_only": ("text",), "vision_only": ("vision",), "audio_only": ("audio",),
    "text_vision": ("text", "vision"), "text_audio": ("text", "audio"), "vision_audio": ("vision", "audio")}
# Params that differ between runs of one suite without being part of the design choice.
_IGNORED_PARAMS = ("seed", "data.")


def summarise(records: list[RunRecord], order: list[str], baseline: str, *, oracle: dict[str, float] | None = None,
              n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per ablation (in `order`), an `oracle` row last when given: mean/std/n over seeds of every
    test metric, the difference of means to `baseline`, its bootstrap 95% interval and direction mark."""
    by_ablation = {a: [r for r in records if r.ablation == a] for a in order}
    assert baseline in by_ablation, f"baseline {baseline!r} not among the ablations {order}"
    predictions = {a: {r.seed: r.predictions["prediction"].to_numpy(np.float64)
                       for r in runs if r.predictions is not None} for a, runs in by_ablation.items()}
    label = _test_labels(records)
    rng = np.random.default_rng(seed)
    weights = resample_weights(len(label), n_boot, rng) if label is not None else None
    base_boot = {s: resampled_metrics(p, label, weights) for s, p in predictions[baseline].items()}
    base_scores = {s: whole_test_scores(p, label) for s, p in predictions[baseline].items()}
    base_means = {m: _stats([r.test_metrics.get(m) for r in by_ablation[baseline]])[0] for m in METRIC_NAMES}

    rows = []
    for ablation, runs in by_ablation.items():
        row: dict[str, Any] = {"ablation": ablation, "role": "baseline" if ablation == baseline else "ablation",
                               "seeds": ",".join(str(r.seed) for r in runs)}
        intervals, row["test"] = None, _no_test_reason(ablation, baseline, runs, predictions)
        marks = False
        if not row["test"]:
            intervals = difference_intervals(predictions[ablation], base_boot, base_scores, label, weights)
            row["test"], marks = _test_words(runs, predictions[ablation], by_ablation[baseline],
                                             predictions[baseline])
        for m in METRIC_NAMES:
            mean, std, n = _stats([r.test_metrics.get(m) for r in runs])
            low, high = intervals[m] if intervals else (math.nan, math.nan)
            row |= {f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n, f"{m}_delta": mean - base_means[m],
                    f"{m}_ci_low": low, f"{m}_ci_high": high,
                    f"{m}_mark": direction_mark(m, low, high) if marks else ""}
        rows.append(row)
    if oracle:
        row = {"ablation": ORACLE, "role": ORACLE, "seeds": "", "test": "best reachable score (noise-free labels)"}
        for m in METRIC_NAMES:
            value = oracle.get(m, math.nan)
            row |= {f"{m}_mean": value, f"{m}_std": math.nan, f"{m}_n": pd.NA, f"{m}_delta": value - base_means[m],
                    f"{m}_ci_low": math.nan, f"{m}_ci_high": math.nan, f"{m}_mark": ""}
        rows.append(row)
    table = pd.DataFrame(rows).set_index("ablation")
    for m in METRIC_NAMES:
        table[f"{m}_n"] = table[f"{m}_n"].astype("Int64")
    return table


def _stats(values: list[float | None]) -> tuple[float, float, int]:
    """mean, std (ddof=1; NaN for one value) and n of the finite values."""
    x = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, int(x.size)


def _test_words(runs: list[RunRecord], predicted: dict[int, np.ndarray], base_runs: list[RunRecord],
                base_predicted: dict[int, np.ndarray]) -> tuple[str, bool]:
    """The row's test in words (it starts with BOTH_LEVELS when it is the full one), and whether its
    difference may be marked."""
    words = f"{BOTH_LEVELS}, {len(predicted)} vs {len(base_predicted)} seeds"
    marks = markable(len(predicted), len(base_predicted))
    if not marks:
        words += ": one seed on a side leaves its seed-to-seed spread out of the interval, so no mark"
    missing = len(runs) - len(predicted) + len(base_runs) - len(base_predicted)
    if missing:
        words += f"; {missing} run(s) without test predictions are in Δ but not in the interval"
    return words, marks


def _no_test_reason(ablation: str, baseline: str, runs: list[RunRecord],
                    predictions: dict[str, dict[int, np.ndarray]]) -> str:
    """Why no interval can be computed for this row ('' when one can)."""
    if ablation == baseline:
        return "reference"
    if not runs:
        return "no finished run"
    if not predictions[ablation] or not predictions[baseline]:
        return "no test predictions logged"
    return ""


def _test_labels(records: list[RunRecord]) -> np.ndarray | None:
    """The test labels every run was scored on; an error if runs disagree on the test samples."""
    with_pred = [r for r in records if r.predictions is not None]
    if not with_pred:
        return None
    ref = with_pred[0].predictions
    for r in with_pred[1:]:
        same = len(r.predictions) == len(ref) and (r.predictions["id"].to_numpy() == ref["id"].to_numpy()).all()
        if not same:
            raise CompareError(f"run {r.run_id} ({r.ablation}/seed-{r.seed}) was tested on other samples than "
                               f"run {with_pred[0].run_id}; a suite's runs must share one test split")
    return ref["label"].to_numpy(np.float64)


def describe_test(n_boot: int, n_test: int) -> str:
    """The statistical test, in the words every report uses."""
    return (f"{BOTH_LEVELS}: a 95% interval around the difference of the means over seeds, as wide as the "
            f"larger of two sources of noise makes it. The test set's: {n_boot} resamples (with replacement) "
            f"of the {n_test} test samples, every run of both sides scored on the same resamples, the variance of the "
            "difference over them. The seeds': Welch's t over the runs' own scores (the variance of each "
            "side's mean, and the t quantile at their Welch-Satterthwaite degrees of freedom, which makes "
            "3 seeds a side wide). A row with one seed on a side has no mark (its spread is unknown).")


def modality_subsets(records: list[RunRecord], baseline: str) -> dict[str, tuple[str, ...]]:
    """Ablations that differ from the baseline only in which modalities they use (the baseline included),
    mapped to those modalities in DISPLAY_ORDER."""
    first = {}
    for r in records:
        first.setdefault(r.ablation, r)
    if baseline not in first:
        return {}
    ref = _design_params(first[baseline].params)
    subsets = {}
    for ablation, r in first.items():
        mine = _design_params(r.params)
        if "model.modalities" in mine:
            others_equal = {k: v for k, v in mine.items() if k != "model.modalities"} == \
                           {k: v for k, v in ref.items() if k != "model.modalities"}
            if others_equal:
                subsets[ablation] = _parse_modalities(mine["model.modalities"])
        elif ablation in NAMED_SUBSETS or ablation == baseline:
            subsets[ablation] = NAMED_SUBSETS.get(ablation, DISPLAY_ORDER)
    return subsets if len(subsets) > 1 else {}


def _design_params(params: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items() if not k.startswith(_IGNORED_PARAMS)}


def _parse_modalities(text: str) -> tuple[str, ...]:
    names = {n.strip(" '\"") for n in text.strip("[]()").split(",") if n.strip()}
    return tuple(m for m in DISPLAY_ORDER if m in names) + tuple(sorted(names - set(DISPLAY_ORDER)))


def runs_table(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run: ablation, seed, run_id and every test metric (NaN where not logged)."""
    return pd.DataFrame([{"ablation": r.ablation, "seed": r.seed, "run_id": r.run_id,
                          **{m: r.test_metrics.get(m, math.nan) for m in METRIC_NAMES}} for r in records],
                        columns=["ablation", "seed", "run_id", *METRIC_NAMES])
