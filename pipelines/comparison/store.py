"""Every read of the tracking store the comparison makes: the experiment, the suite's parent run and
its suite.json, the child runs' test metrics, predictions and metric histories."""

from __future__ import annotations

import json
import math
import re
import tempfile
import warnings
from pathlib import Path

import mlflow.artifacts
import pandas as pd
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from msa.metrics import METRIC_NAMES, eval_mosi_regression
from pipelines.comparison.model import CURVE_KEYS, CompareError, RunRecord
from pipelines.parent import LABEL_TAG, label_of
from pipelines.status import RunStatus
from pipelines.store_check import read_client

_USABLE = frozenset(s for s in RunStatus if s.usable)


def quiet_downloads() -> None:
    """Turn MLflow's download progress bars off for this process, unless the user chose otherwise.

    MLflow draws one per artifact download and a comparison downloads one file per run: dozens of
    bars would bury the table. MLflow has no per-call switch, only this variable, read at each download.
    """
    if not MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.is_set():
        MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.set(False)


def open_experiment(name: str | None, *, suite_run_id: str | None = None,
                    spec_path: str | None = None) -> tuple[MlflowClient, str]:
    """A client on the configured store and the id of an existing experiment (never creates one).

    Without a name: the suite run's experiment when a suite is given, else the spec's experiment.
    """
    client = read_client()
    uri = client.tracking_uri
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


def _run_or_error(client: MlflowClient, run_id: str, uri: str) -> Run:
    """A run by id, or the suite run whose label (its reports folder's name) is `run_id`, or the one
    suite run whose id starts with it (4 hex digits at least, as the labels show the first 8)."""
    try:
        return client.get_run(run_id)
    except MlflowException:
        pass
    ids = [e.experiment_id for e in client.search_experiments()]
    if ids and "'" not in run_id:
        found = client.search_runs(ids, filter_string=f"tags.{LABEL_TAG} = '{run_id}'", max_results=1)
        if found:
            return found[0]
        suites = client.search_runs(ids, filter_string="tags.suite LIKE '%'", max_results=1000)
        # A suite recorded before labels existed is known by the label its reports folder got.
        found = [r for r in suites if label_of(r) == run_id]
        if not found and re.fullmatch(r"[0-9a-f]{4,31}", run_id):
            found = [r for r in suites if r.info.run_id.startswith(run_id)]
            if len(found) > 1:
                raise CompareError(f"'{run_id}' starts the ids of {len(found)} suite runs "
                                   f"({', '.join(r.info.run_id for r in found[:3])}); give more of the id")
        if found:
            return found[0]
    raise CompareError(f"no run '{run_id}' in {uri}, and no suite labelled so or whose id starts so")


def find_suite(client: MlflowClient, experiment_id: str, suite_run_id: str | None = None) -> tuple[Run, list[dict]]:
    """The suite's parent run and its suite.json rows: the given suite, else the one that ran last
    (running now, or the last to end: a suite run again counts from then) and has finished (or cached) runs."""
    experiment = client.get_experiment(experiment_id).name
    if suite_run_id:
        run = _run_or_error(client, suite_run_id, client.tracking_uri)
        suite_run_id = run.info.run_id
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
        for run in sorted(_all_runs(client, experiment_id, suite_filter), key=_last_active, reverse=True):
            rows = _suite_rows(client, run.info.run_id)
            if rows and any(_usable(r) for r in rows):
                return run, rows
    raise CompareError(f"experiment '{experiment}' has no suite with finished runs to compare; "
                       "run `python -m pipelines.run ablations` first")


def _all_runs(client: MlflowClient, experiment_id: str, filter_string: str) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _last_active(run: Run) -> tuple[float, float]:
    """When a suite last ran: now while it runs, else when it last ended. A suite run again (resumed)
    counts from then, as `ablations` counts it when it makes that suite's report `latest`."""
    ended = math.inf if run.info.status == RunStatus.RUNNING else (run.info.end_time or run.info.start_time or 0)
    return ended, run.info.start_time or 0


def _usable(row: dict) -> bool:
    return row.get("status") in _USABLE and bool(row.get("run_id"))


def _usable_or_running(row: dict) -> bool:
    return _usable(row) or (row.get("status") == RunStatus.RUNNING and bool(row.get("run_id")))


def still_running(client: MlflowClient, experiment_id: str, rows: list[dict]) -> int:
    """How many of the suite's (ablation, seed) are RUNNING now (here or in another suite) without a
    FINISHED run in the suite: the comparison leaves them out until they finish."""
    done = {row["run_id"] for row in rows if _usable(row)}
    keys = {row.get("run_key") for row in rows if row.get("run_id") not in done}
    ids = {row.get("run_id") for row in rows if row.get("run_id") not in done}
    running = client.search_runs([experiment_id], filter_string=f"attributes.status = '{RunStatus.RUNNING}'",
                                 max_results=1000)
    return len({r.data.tags.get("run_key") or r.info.run_id for r in running
                if r.data.tags.get("run_key") in keys or r.info.run_id in ids})


def _suite_rows(client: MlflowClient, run_id: str) -> list[dict] | None:
    if "suite.json" not in {a.path for a in client.list_artifacts(run_id)}:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(run_id, "suite.json", tmp)).read_text())


def suite_order(parent: Run, rows: list[dict]) -> list[str]:
    """The spec's order as the suite recorded it, then any ablation only suite.json names."""
    declared = [a for a in parent.data.params.get("ablations", "").split(",") if a]
    return list(dict.fromkeys(declared + [r["ablation"] for r in rows]))


def load_runs(client: MlflowClient, rows: list[dict]) -> tuple[list[RunRecord], list[str]]:
    """The FINISHED child runs behind the suite's finished and cached rows (and rows that were running
    elsewhere when the suite ended, once FINISHED), with their test predictions; and, in words, the
    FINISHED runs left out because they hold no finite test score (a run that trained to NaN, recorded
    before such runs were failed)."""
    records, left_out = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for row in filter(_usable_or_running, rows):
            run = client.get_run(row["run_id"])
            if run.info.status != RunStatus.FINISHED:
                continue
            metrics = {m: run.data.metrics[f"test_{m}"] for m in METRIC_NAMES if f"test_{m}" in run.data.metrics}
            if not all(math.isfinite(metrics.get(m, math.nan)) for m in SCORED):
                left_out.append(f"{row['ablation']}/seed-{row['seed']} (run {row['run_id']}): no finite test "
                                f"{' or '.join(SCORED)}")
                continue
            records.append(RunRecord(row["ablation"], int(row["seed"]), row["run_id"], metrics, dict(run.data.params),
                                     _predictions(client, run, Path(tmp))))
    return records, left_out


SCORED = ("MAE", "Corr")  # a run without both finite is no result to compare


def _predictions(client: MlflowClient, run: Run, tmp: Path) -> pd.DataFrame | None:
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


def oracle_scores(parent: Run, records: list[RunRecord]) -> dict[str, float] | None:
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


def suite_seeds(parent: Run, records: list[RunRecord]) -> tuple[int, ...]:
    """The seeds the suite was run with, else those of its finished runs."""
    return tuple(int(s) for s in parent.data.params.get("seeds", "").split(",") if s) or \
        tuple(sorted({r.seed for r in records}))

