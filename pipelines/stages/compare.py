"""Stage 4, compare: every ablation of one suite against the baseline; the work is in pipelines.comparison.

Writes comparison.csv, comparison.md and report.html to reports/<experiment>/<suite label>/ (and a copy
to reports/<experiment>/latest/) and logs them on the suite's parent run under comparison/.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from pipelines import tracking
from pipelines.comparison import (
    LATEST,
    CompareError,
    Comparison,
    compare,
    default_report_dir,
    format_table,
    open_experiment,
)


def compare_suite(experiment: str, experiment_id: str, suite_run_id: str) -> tuple[Comparison | None, str | None]:
    """The comparison of a suite that just ran, as `ablations` and `tune` end: (comparison, None), or
    (None, a line saying why not) when it cannot be made, e.g. a suite run with `--only` that leaves the
    baseline out. The runs stay recorded either way, so `python -m pipelines.run compare --suite <id>`
    can redo it.

    `experiment` is the name of `experiment_id`'s experiment; the store is read by id.
    """
    client = MlflowClient(tracking.tracking_uri())
    try:
        return compare(client, experiment_id, suite_run_id=suite_run_id), None
    except CompareError as e:
        return None, f"no comparison: {e}"


__all__ = ["LATEST", "CompareError", "Comparison", "compare", "compare_suite", "default_report_dir",
           "format_table", "open_experiment"]
