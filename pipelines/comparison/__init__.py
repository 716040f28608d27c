"""Every ablation of one suite against its baseline, with seed-aware uncertainty, from the tracking
store alone: the statistics, the table, the store reads and the terminal/markdown/HTML reports."""

from pipelines.comparison.bootstrap import (
    BOTH_LEVELS,
    counts_of,
    difference_intervals,
    direction_mark,
    interval,
    resample_weights,
    resampled_metrics,
)
from pipelines.comparison.build import (
    LATEST,
    REPORT_FILES,
    compare,
    default_report_dir,
    write_reports,
)
from pipelines.comparison.model import (
    CURVE_KEYS,
    DISPLAY_ORDER,
    KEY_METRICS,
    ORACLE,
    SYNTHETIC_BANNER,
    CompareError,
    Comparison,
    RunRecord,
)
from pipelines.comparison.render import format_table, to_markdown
from pipelines.comparison.store import (
    find_suite,
    load_curves,
    load_runs,
    open_experiment,
)
from pipelines.comparison.table import describe_test, modality_subsets, summarise

__all__ = [
    "CURVE_KEYS",
    "DISPLAY_ORDER",
    "KEY_METRICS",
    "LATEST",
    "ORACLE",
    "REPORT_FILES",
    "SYNTHETIC_BANNER",
    "CompareError",
    "Comparison",
    "RunRecord",
    "BOTH_LEVELS",
    "difference_intervals",
    "compare",
    "counts_of",
    "default_report_dir",
    "describe_test",
    "direction_mark",
    "find_suite",
    "format_table",
    "interval",
    "load_curves",
    "load_runs",
    "modality_subsets",
    "open_experiment",
    "resample_weights",
    "resampled_metrics",
    "summarise",
    "to_markdown",
    "write_reports",
]
