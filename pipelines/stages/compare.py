"""Stage 4, compare: every ablation of one suite against the baseline, with seed-aware uncertainty.

Reads only the tracking store (the suite's parent run, its `suite.json`, the child runs' test
metrics, metric histories and `test_predictions.csv`), so it works on runs made on other machines.
Writes `comparison.csv`, `comparison.md` and a self-contained `report.html` to `reports/<experiment>/`
(a `tune` suite: `reports/<experiment>/tune/`) and logs them on the suite's parent run under `comparison/`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import mlflow.artifacts
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from msa.metrics import HIGHER_IS_BETTER, METRIC_NAMES, eval_mosi_regression
from pipelines import tracking

KEY_METRICS: tuple[str, ...] = ("Corr", "MAE", "Has0_acc_2", "Mult_acc_7")
STAT_COLUMNS: tuple[str, ...] = ("mean", "std", "n", "delta", "ci_low", "ci_high", "mark")
BETTER, WORSE, SAME = "▲", "▼", "~"
SYNTHETIC_BANNER = "SYNTHETIC data — not a MOSI result"
ORACLE = "oracle"
CURVE_KEYS: tuple[str, ...] = ("val_Corr", "val_loss", "val_MAE", "train_loss")
MODALITIES: tuple[str, ...] = ("text", "vision", "audio")
# Only used when a run carries no `model.modalities` param (e.g. runs logged by other tools).
NAMED_SUBSETS: dict[str, tuple[str, ...]] = {
    "text_only": ("text",), "vision_only": ("vision",), "audio_only": ("audio",),
    "text_vision": ("text", "vision"), "text_audio": ("text", "audio"), "vision_audio": ("vision", "audio")}
# Params that differ between runs of one suite without being part of the design choice.
_IGNORED_PARAMS = ("seed", "data.")


class CompareError(ValueError):
    """The store holds nothing this comparison can use; the message says what to run or pass."""


@dataclass
class RunRecord:
    """One FINISHED child run of the suite, as the comparison needs it."""

    ablation: str
    seed: int
    run_id: str
    test_metrics: dict[str, float]        # test_<Metric> without the prefix; non-finite ones absent
    params: dict[str, str]
    predictions: pd.DataFrame | None      # id, label, prediction[, oracle]; None if not logged


@dataclass
class Comparison:
    table: pd.DataFrame                   # index ablation (suite order, baseline first, oracle last);
                                          # role, seeds, test, then <Metric>_<stat> for every metric
    runs: pd.DataFrame                    # one row per finished run: ablation, seed, run_id, test metrics
    curves: dict[str, pd.DataFrame]       # ablation -> per-epoch CURVE_KEYS, mean over seeds
    modality_subsets: dict[str, tuple[str, ...]]  # ablations that only change the modalities -> them
    experiment: str
    suite_run_id: str
    baseline: str
    synthetic: bool
    test: str                             # the statistical test, in words, as every report states it
    n_test: int                           # test samples per run (0 when no predictions were logged)
    seeds: tuple[int, ...]
    paths: dict[str, Path] = field(default_factory=dict)  # file name -> where it was written

    @property
    def ablations(self) -> list[str]:
        return [a for a in self.table.index if a != ORACLE]


# ---------------------------------------------------------------------------------------------------
# The statistics: metrics on bootstrap resamples, vectorised over resamples


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


def direction_mark(metric: str, ci_low: float, ci_high: float) -> str:
    """▲ better / ▼ worse than the baseline when the interval excludes 0, else ~ (or '' if unknown)."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)):
        return ""
    if ci_low <= 0 <= ci_high:
        return SAME
    higher = ci_low > 0
    return BETTER if higher == HIGHER_IS_BETTER[metric] else WORSE


# ---------------------------------------------------------------------------------------------------
# The table


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
    base_means = {m: _stats([r.test_metrics.get(m) for r in by_ablation[baseline]])[0] for m in METRIC_NAMES}

    rows = []
    for ablation, runs in by_ablation.items():
        row: dict[str, Any] = {"ablation": ablation, "role": "baseline" if ablation == baseline else "ablation",
                               "seeds": ",".join(str(r.seed) for r in runs)}
        draws, row["test"] = None, _no_test_reason(ablation, baseline, runs, predictions)
        if not row["test"]:
            draws, row["test"] = bootstrap_difference(predictions[ablation], base_boot, label, weights, rng)
        for m in METRIC_NAMES:
            mean, std, n = _stats([r.test_metrics.get(m) for r in runs])
            low, high = interval(draws[m]) if draws else (math.nan, math.nan)
            row |= {f"{m}_mean": mean, f"{m}_std": std, f"{m}_n": n, f"{m}_delta": mean - base_means[m],
                    f"{m}_ci_low": low, f"{m}_ci_high": high,
                    f"{m}_mark": "" if ablation == baseline else direction_mark(m, low, high)}
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
    return (f"paired bootstrap over test samples: {n_boot} resamples (with replacement) of the {n_test} test "
            "samples, the same resample applied to an ablation's run and the baseline's run of the same seed; "
            "each metric recomputed on the resample, the difference averaged over the seeds both share; "
            "95% percentile interval of that difference. Rows marked 'unpaired' share no seed with the "
            "baseline and resample each side independently. Seed-to-seed spread is the std column.")


# ---------------------------------------------------------------------------------------------------
# Reading the store


def open_experiment(name: str | None, *, suite_run_id: str | None = None,
                    spec_path: str | None = None) -> tuple[MlflowClient, str]:
    """A client on the configured store and the id of an existing experiment (never creates one).

    Without a name: the suite run's experiment when a suite is given, else the spec's experiment.
    """
    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise CompareError(f"no tracking store at {uri.removeprefix('sqlite:///')}; run `python -m pipelines.run "
                           "ablations` first, or set MLFLOW_TRACKING_URI")
    client = MlflowClient(uri)
    if name is None and suite_run_id:
        return client, _run_or_error(client, suite_run_id, uri).info.experiment_id
    if name is None:
        from pipelines.spec import load_spec
        name = load_spec(spec_path).experiment
    exp = client.get_experiment_by_name(name)
    if exp is None:
        known = sorted(e.name for e in client.search_experiments())
        raise CompareError(f"no experiment '{name}' in {uri}; experiments there: {known or 'none'}")
    return client, exp.experiment_id


def _run_or_error(client: MlflowClient, run_id: str, uri: str):
    try:
        return client.get_run(run_id)
    except MlflowException:
        raise CompareError(f"no run '{run_id}' in {uri}") from None


def find_suite(client: MlflowClient, experiment_id: str, suite_run_id: str | None = None) -> tuple[Any, list[dict]]:
    """The suite's parent run and its suite.json rows: the given suite, else the newest one that has
    finished (or cached) runs."""
    experiment = client.get_experiment(experiment_id).name
    if suite_run_id:
        run = _run_or_error(client, suite_run_id, client.tracking_uri)
        if run.info.experiment_id != experiment_id:
            raise CompareError(f"run '{suite_run_id}' belongs to another experiment than '{experiment}'")
        if "suite" not in run.data.tags:
            raise CompareError(f"run '{suite_run_id}' is not a suite run (no 'suite' tag); pass its parent run's id")
        rows = _suite_rows(client, suite_run_id)
        if rows is None:
            raise CompareError(f"suite run '{suite_run_id}' has no suite.json yet (still running, or it crashed)")
        return run, rows
    # A full `ablations` suite first: a `tune` suite holds only the tuned model and its references.
    for suite_filter in ("tags.suite = 'ablations'", "tags.suite LIKE '%'"):
        token = None
        while True:
            page = client.search_runs([experiment_id], filter_string=suite_filter,
                                      order_by=["attributes.start_time DESC"], max_results=100, page_token=token)
            for run in page:
                rows = _suite_rows(client, run.info.run_id)
                if rows and any(_usable(r) for r in rows):
                    return run, rows
            token = page.token
            if not token:
                break
    raise CompareError(f"experiment '{experiment}' has no suite with finished runs to compare; "
                       "run `python -m pipelines.run ablations` first")


def _usable(row: dict) -> bool:
    return row.get("status") in (tracking.FINISHED, "CACHED") and bool(row.get("run_id"))


def _suite_rows(client: MlflowClient, run_id: str) -> list[dict] | None:
    if "suite.json" not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        return json.loads(Path(client.download_artifacts(run_id, "suite.json", tmp)).read_text())


@contextmanager
def _quiet_downloads() -> Iterator[None]:
    """MLflow draws a progress bar per download; dozens of them would bury the table."""
    key, old = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def load_runs(client: MlflowClient, rows: list[dict]) -> list[RunRecord]:
    """The FINISHED child runs behind the suite's finished and cached rows, with their test predictions."""
    records = []
    with tempfile.TemporaryDirectory() as tmp, _quiet_downloads():
        for row in filter(_usable, rows):
            run = client.get_run(row["run_id"])
            if run.info.status != tracking.FINISHED:
                continue
            metrics = {m: run.data.metrics[f"test_{m}"] for m in METRIC_NAMES if f"test_{m}" in run.data.metrics}
            records.append(RunRecord(row["ablation"], int(row["seed"]), row["run_id"], metrics, dict(run.data.params),
                                     _predictions(client, run, Path(tmp))))
    return records


def _predictions(client: MlflowClient, run, tmp: Path) -> pd.DataFrame | None:
    # From the run's artifact URI rather than client.download_artifacts(run_id, ...), which looks the
    # run up again: that doubled the stage's time on a SQLite store.
    uri = f"{run.info.artifact_uri.rstrip('/')}/test_predictions.csv"
    try:
        path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / run.info.run_id),
                                                   tracking_uri=client.tracking_uri)
    except (MlflowException, OSError):  # a run logged without predictions still has its metrics
        return None
    return pd.read_csv(path, dtype={"id": str})


def load_curves(client: MlflowClient, records: list[RunRecord]) -> dict[str, pd.DataFrame]:
    """ablation -> per-epoch validation (and train) curves, mean over its seeds, from metric histories."""
    curves = {}
    for ablation in dict.fromkeys(r.ablation for r in records):
        points = [(m.step, key, m.value) for r in records if r.ablation == ablation
                  for key in CURVE_KEYS for m in client.get_metric_history(r.run_id, key)]
        if points:
            long = pd.DataFrame(points, columns=["epoch", "key", "value"])
            curves[ablation] = long.pivot_table(index="epoch", columns="key", values="value", aggfunc="mean")
    return curves


def modality_subsets(records: list[RunRecord], baseline: str) -> dict[str, tuple[str, ...]]:
    """Ablations that differ from the baseline only in which modalities they use (the baseline included),
    mapped to those modalities in the lab's order."""
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
            subsets[ablation] = NAMED_SUBSETS.get(ablation, MODALITIES)
    return subsets if len(subsets) > 1 else {}


def _design_params(params: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in params.items() if not k.startswith(_IGNORED_PARAMS)}


def _parse_modalities(text: str) -> tuple[str, ...]:
    names = {n.strip(" '\"") for n in text.strip("[]()").split(",") if n.strip()}
    return tuple(m for m in MODALITIES if m in names) + tuple(sorted(names - set(MODALITIES)))


def _oracle(parent, records: list[RunRecord]) -> dict[str, float] | None:
    """The parent's oracle_test_* metrics, else the oracle column of a run's predictions."""
    logged = {k.removeprefix("oracle_test_"): v for k, v in parent.data.metrics.items() if k.startswith("oracle_test_")}
    if logged:
        return logged
    table = next((r.predictions for r in records if r.predictions is not None and "oracle" in r.predictions), None)
    if table is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return eval_mosi_regression(table["oracle"].to_numpy(), table["label"].to_numpy())


def _suite_order(parent, rows: list[dict]) -> list[str]:
    """The spec's order as the suite recorded it, then any ablation only suite.json names."""
    declared = [a for a in parent.data.params.get("ablations", "").split(",") if a]
    return list(dict.fromkeys(declared + [r["ablation"] for r in rows]))


# ---------------------------------------------------------------------------------------------------
# The stage


def compare(client: MlflowClient, experiment_id: str, *, suite_run_id: str | None = None,
            out_dir: str | Path | None = None, n_boot: int = 2000, seed: int = 0,
            log_artifacts: bool = True) -> Comparison:
    """Compare a suite's ablations with its baseline (the latest suite unless one is named); write
    comparison.csv/.md and report.html to `out_dir` (default: `default_report_dir`) and log them on the
    suite's parent run under comparison/."""
    from pipelines import report

    parent, rows = find_suite(client, experiment_id, suite_run_id)
    experiment = client.get_experiment(experiment_id).name
    records = load_runs(client, rows)
    order = _suite_order(parent, rows)
    baseline = "baseline" if "baseline" in order else order[0]
    if not any(r.ablation == baseline for r in records):
        raise CompareError(f"suite run '{parent.info.run_id}' has no finished '{baseline}' run to compare against")
    # Only synthetic data has noise-free labels, so an oracle column also marks it.
    synthetic = parent.data.tags.get("synthetic") == "true" or any(
        r.predictions is not None and "oracle" in r.predictions for r in records)
    oracle = _oracle(parent, records) if synthetic else None
    table = summarise(records, order, baseline, oracle=oracle, n_boot=n_boot, seed=seed)
    n_test = next((len(r.predictions) for r in records if r.predictions is not None), 0)
    seeds = tuple(int(s) for s in parent.data.params.get("seeds", "").split(",") if s) or \
        tuple(sorted({r.seed for r in records}))
    comparison = Comparison(
        table=table, runs=_runs_table(records), curves=load_curves(client, records),
        modality_subsets=modality_subsets(records, baseline), experiment=experiment,
        suite_run_id=parent.info.run_id, baseline=baseline, synthetic=synthetic,
        test=describe_test(n_boot, n_test), n_test=n_test, seeds=seeds)
    out = Path(out_dir) if out_dir else default_report_dir(experiment, parent.data.tags.get("suite"))
    comparison.paths = report.write_reports(comparison, out.resolve())
    if log_artifacts:
        for path in comparison.paths.values():
            client.log_artifact(parent.info.run_id, str(path), "comparison")
        client.set_tag(parent.info.run_id, "comparison", "comparison/report.html")
    return comparison


def default_report_dir(experiment: str, suite: str | None) -> Path:
    """reports/<experiment> for an `ablations` suite; another suite (a `tune` run's three ablations)
    gets a folder of its own below it, so that it never replaces the full suite's report."""
    base = Path("reports") / experiment
    return base if suite in (None, "ablations") else base / suite


def _runs_table(records: list[RunRecord]) -> pd.DataFrame:
    return pd.DataFrame([{"ablation": r.ablation, "seed": r.seed, "run_id": r.run_id,
                          **{m: r.test_metrics.get(m, math.nan) for m in METRIC_NAMES}} for r in records],
                        columns=["ablation", "seed", "run_id", *METRIC_NAMES])


def format_table(comparison: Comparison) -> str:
    """The terminal table: key test metrics, mean ± std over seeds, difference to the baseline, mark."""
    from pipelines import report
    return report.format_table(comparison)


__all__ = ["Comparison", "CompareError", "compare", "format_table", "open_experiment", "find_suite",
           "summarise", "resampled_metrics", "resample_weights", "counts_of", "bootstrap_difference", "KEY_METRICS",
           "SYNTHETIC_BANNER"]
