"""The comparison wired end to end: read the suite from the store, build the table, write the three
reports where they belong and log them on the suite's parent run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pipelines.comparison import store
from pipelines.comparison.html import to_html
from pipelines.comparison.model import CompareError, Comparison
from pipelines.comparison.render import to_markdown
from pipelines.comparison.table import (
    describe_test,
    modality_subsets,
    runs_table,
    summarise,
)
from pipelines.parent import label_of

REPORT_FILES: tuple[str, ...] = ("comparison.csv", "comparison.md", "report.html")
LATEST = "latest"  # reports/<experiment>/latest: a copy of the newest suite's reports


def compare(client: MlflowClient, experiment_id: str, *, suite_run_id: str | None = None,
            out_dir: str | Path | None = None, n_boot: int = 2000, seed: int = 0,
            log_artifacts: bool = True, latest: bool = True) -> Comparison:
    """Compare a suite's ablations with its baseline (the latest suite unless one is named); write
    comparison.csv/.md and report.html to `out_dir` (default: `default_report_dir`, then copied to
    reports/<experiment>/latest when `latest`) and log them on the suite's parent run under comparison/."""
    store.quiet_downloads()
    parent, rows = store.find_suite(client, experiment_id, suite_run_id)
    experiment = client.get_experiment(experiment_id).name
    records, left_out = store.load_runs(client, rows)
    order = store.suite_order(parent, rows)
    baseline = "baseline" if "baseline" in order else order[0]
    if not any(r.ablation == baseline for r in records):
        raise CompareError(f"suite run '{parent.info.run_id}' has no finished '{baseline}' run to compare against")
    # Only synthetic data has noise-free labels, so an oracle column also marks it.
    synthetic = parent.data.tags.get("synthetic") == "true" or any(
        r.predictions is not None and "oracle" in r.predictions for r in records)
    oracle = store.oracle_scores(parent, records) if synthetic else None
    table = summarise(records, order, baseline, oracle=oracle, n_boot=n_boot, seed=seed)
    n_test = next((len(r.predictions) for r in records if r.predictions is not None), 0)
    comparison = Comparison(
        table=table, runs=runs_table(records), curves=store.load_curves(client, records),
        modality_subsets=modality_subsets(records, baseline), experiment=experiment,
        suite_run_id=parent.info.run_id, baseline=baseline, synthetic=synthetic,
        test=describe_test(n_boot, n_test), n_test=n_test, seeds=store.suite_seeds(parent, records),
        left_out=tuple(left_out), n_running=store.still_running(client, experiment_id, rows),
        precision=", ".join(sorted({r.params.get("train.precision", "fp32") for r in records})))
    out = Path(out_dir) if out_dir else default_report_dir(experiment, label_of(parent))
    comparison.paths = write_reports(comparison, out.resolve())
    if latest and out_dir is None:
        point_latest(out.resolve(), parent)
    if log_artifacts:
        for path in comparison.paths.values():
            client.log_artifact(parent.info.run_id, str(path), "comparison")
        client.set_tag(parent.info.run_id, "comparison", "comparison/report.html")
    return comparison


def default_report_dir(experiment: str, label: str) -> Path:
    """reports/<experiment>/<suite label>: one folder per suite, so that no suite replaces another's
    report (the label is the parent run's `suite_label` tag, e.g. ablations-20250101-120000-1a2b3c)."""
    return Path("reports") / experiment / label


def point_latest(report_dir: Path, parent: Run) -> Path:
    """Make reports/<experiment>/latest a copy of `report_dir`, with SUITE.txt naming where it comes from.

    A copy, not a symlink: Windows creates symlinks only for administrators or in developer mode, and a
    browser or file manager opens a copied folder on every OS. Built beside and then swapped in, so a
    reader never finds it half written (at worst, for an instant, missing)."""
    latest = report_dir.parent / LATEST
    fresh = report_dir.parent / f".{LATEST}-{os.getpid()}"
    shutil.rmtree(fresh, ignore_errors=True)
    shutil.copytree(report_dir, fresh)
    (fresh / "SUITE.txt").write_text(
        f"A copy of {report_dir.name}/ (suite run {parent.info.run_id}), the newest suite's report.\n"
        f"Every suite keeps its own folder beside this one; `python -m pipelines.run compare --suite "
        f"{report_dir.name}` rebuilds it.\n", encoding="utf-8")
    if latest.is_symlink() or latest.is_file():  # someone's link or file in its place: ours to replace
        latest.unlink()
    else:
        shutil.rmtree(latest, ignore_errors=True)
    os.replace(fresh, latest)
    return latest


def write_reports(c: Comparison, out_dir: Path) -> dict[str, Path]:
    """Write comparison.csv, comparison.md and report.html into out_dir (created); name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in REPORT_FILES}
    # The CSV travels alone: every row says what data its figures come from.
    c.table.assign(data="SYNTHETIC (not a MOSI result)" if c.synthetic else "real", precision=c.precision).to_csv(
        paths["comparison.csv"], encoding="utf-8", float_format="%.10g")  # 0.1793, not 0.17930000000000001
    paths["comparison.md"].write_text(to_markdown(c), encoding="utf-8")
    paths["report.html"].write_text(to_html(c), encoding="utf-8")
    return paths
