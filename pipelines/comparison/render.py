"""Text renderings of a Comparison: the terminal table and comparison.md, and the cell formats
report.html shares with them."""

from __future__ import annotations

import math

import pandas as pd

from msa.metrics import HIGHER_IS_BETTER, METRIC_NAMES
from pipelines.comparison.bootstrap import BOTH_LEVELS
from pipelines.comparison.model import (
    BETTER,
    DISPLAY_ORDER,
    KEY_METRICS,
    ORACLE,
    SAME,
    SYNTHETIC_BANNER,
    WORSE,
    Comparison,
)

DISPLAY_METRICS: tuple[str, ...] = KEY_METRICS + tuple(m for m in METRIC_NAMES if m not in KEY_METRICS)


# ---------------------------------------------------------------------------------------------------
# Small formatting helpers


def num(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def signed(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:+.{digits}f}"


def mean_std(row: pd.Series, m: str) -> str:
    std = row[f"{m}_std"]
    return num(row[f"{m}_mean"]) + ("" if not math.isfinite(std) else f" ± {num(std)}")


def delta_ci(row: pd.Series, m: str) -> str:
    """'+0.012 [-0.003, +0.027] ~' for an ablation; '' for the baseline."""
    if row["role"] == "baseline":
        return ""
    ci = "" if not math.isfinite(row[f"{m}_ci_low"]) else \
        f" [{signed(row[f'{m}_ci_low'])}, {signed(row[f'{m}_ci_high'])}]"
    return f"{signed(row[f'{m}_delta'])}{ci} {row[f'{m}_mark']}".rstrip()


def n_runs(row: pd.Series) -> str:
    return "–" if row["role"] == ORACLE else str(len([s for s in row["seeds"].split(",") if s]))


def direction(m: str) -> str:
    return "higher is better" if HIGHER_IS_BETTER[m] else "lower is better"


def legend(baseline: str = "baseline") -> str:
    against = "the baseline" if baseline == "baseline" else f"'{baseline}' (the baseline here)"
    return (f"{BETTER} better / {WORSE} worse than {against} in the metric's own direction (MAE: lower is "
            f"better): the 95% interval of the difference, as printed, excludes 0. {SAME}: it contains 0, not "
            "distinguishable from the noise of test samples and seeds. No mark: one seed on a side, whose "
            "seed-to-seed spread is unknown.")


def special_tests(c: Comparison) -> list[str]:
    """Rows whose test is not the full one (no interval, no mark, runs left out of it), with why: one
    line per reason, naming its rows (a --quick suite's one-seed note once, not once per ablation)."""
    rows: dict[str, list[str]] = {}
    for a, t in c.table["test"].items():
        if c.table.loc[a, "role"] == "ablation" and not (t.startswith(BOTH_LEVELS) and ":" not in t and ";" not in t):
            rows.setdefault(t, []).append(a)
    return [f"{', '.join(names)}: {t}" for t, names in rows.items()]


# ---------------------------------------------------------------------------------------------------
# Terminal


def format_table(c: Comparison) -> str:
    """Key test metrics per ablation (suite order, baseline first): mean ± std over seeds, Δ, mark."""
    cell_width = 25
    lines = [f"*** {SYNTHETIC_BANNER} ***"] if c.synthetic else []
    trained = "" if c.precision == "fp32" else f", trained in {c.precision}"
    lines.append(f"Test metrics of suite run {c.suite_run_id} ('{c.experiment}'{trained}): mean ± std over seeds, "
                 f"difference to '{c.baseline}', mark")
    header = (f"{'ablation':<20} {'n':>2}  " + "".join(f"{m:<{cell_width}}" for m in KEY_METRICS)).rstrip()
    lines += [header, "-" * len(header)]
    for ablation, row in c.table.iterrows():
        cells = []
        for m in KEY_METRICS:
            delta = "" if row["role"] == "baseline" else f" {signed(row[f'{m}_delta'])} {row[f'{m}_mark']}"
            cells.append(f"{(mean_std(row, m) + delta).rstrip():<{cell_width}}")
        lines.append(f"{ablation:<20} {n_runs(row):>2}  " + "".join(cells).rstrip())
    lines.append(legend(c.baseline))
    lines.append(f"Intervals: {BOTH_LEVELS} (comparison.md says exactly how).")
    lines += [f"  {line}" for line in special_tests(c)]
    lines += [f"Left out: {note}" for note in c.left_out]
    if c.n_running:
        lines.append(f"{c.n_running} run(s) of this suite still running: counted once FINISHED "
                     "(`python -m pipelines.run compare` again then).")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Markdown


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|",
            *("| " + " | ".join(esc(x) for x in r) + " |" for r in rows)]


def to_markdown(c: Comparison) -> str:
    out = [f"# Ablation comparison: {c.experiment}", ""]
    if c.synthetic:
        out += [(f"> **{SYNTHETIC_BANNER}.** The labels come from a generator; the `oracle` row is the best "
                 "score reachable from its noise-free labels. Read differences as what the pipeline can detect, "
                 "not as findings about MOSI."), ""]
    out += [meta_line(c), ""]
    out += [*(f"- Left out: {note}" for note in c.left_out), ""] if c.left_out else []
    out += [f"- Still running, counted once FINISHED: {c.n_running} run(s) of this suite", ""] if c.n_running else []
    out += ["## Test metrics (mean ± std over seeds; mark against the baseline)", ""]
    rows = [[f"**{a}**" if r["role"] == "baseline" else (f"*{a}*" if r["role"] == ORACLE else a), n_runs(r)]
            + [f"{mean_std(r, m)} {r[f'{m}_mark']}".rstrip() for m in DISPLAY_METRICS]
            for a, r in c.table.iterrows()]
    out += _md_table(["ablation", "n", *DISPLAY_METRICS], rows) + [""]
    out += ["## Difference to the baseline, with its 95% interval", ""]
    rows = [[a, r["test"]] + [delta_ci(r, m) for m in KEY_METRICS]
            for a, r in c.table.iterrows() if r["role"] != "baseline"]
    out += _md_table(["ablation", "test", *(f"Δ {m}" for m in KEY_METRICS)], rows) + [""]
    out += _md_modalities(c)
    out += ["## How to read", "",
            f"- {legend(c.baseline)}",
            f"- Test used: {c.test}",
            ("- Every figure here is on the test split, touched once per run; each run's checkpoint was selected "
             "on the validation split (best validation Corr). n is the number of finished seeds; std uses ddof=1."),
            ("- The curves (validation only) and plots are in `report.html`; every column for every metric "
             "(`<Metric>_mean`, `_std`, `_n`, `_delta`, `_ci_low`, `_ci_high`, `_mark`, and `data`: synthetic or "
             "real) is in `comparison.csv`."),
            ""]
    return "\n".join(out)


def meta_line(c: Comparison) -> str:
    return (f"Suite run `{c.suite_run_id}` · seeds {', '.join(map(str, c.seeds))} · {c.n_test} test samples per run "
            f"· baseline `{c.baseline}` · precision {c.precision}")


def subset_rows(c: Comparison) -> list[tuple[str, tuple[str, ...], pd.Series]]:
    """Modality-subset ablations, best test Corr first."""
    rows = [(a, mods, c.table.loc[a]) for a, mods in c.modality_subsets.items() if a in c.table.index]
    return sorted(rows, key=lambda x: -x[2]["Corr_mean"] if math.isfinite(x[2]["Corr_mean"]) else math.inf)


def _leave_one_out(c: Comparison) -> list[tuple[str, str]]:
    """(modality, ablation without it) for each modality of the baseline whose removal was run."""
    full = c.modality_subsets.get(c.baseline, ())
    found = []
    for m in full:
        rest = tuple(x for x in full if x != m)
        match = next((a for a, mods in c.modality_subsets.items() if mods == rest), None)
        if match:
            found.append((m, match))
    return found


def modality_findings(c: Comparison) -> list[str]:
    lines = []
    singles = [(a, mods[0], r) for a, mods, r in subset_rows(c) if len(mods) == 1 and math.isfinite(r["Corr_mean"])]
    if len(singles) > 1:
        a, m, r = singles[0]
        lines.append(f"Strongest single modality: {m} ({a}, test Corr {num(r['Corr_mean'])}).")
    for m, a in _leave_one_out(c):
        r = c.table.loc[a]
        lines.append(f"Without {m} ({a}): Corr {delta_ci(r, 'Corr')}, MAE {delta_ci(r, 'MAE')}.")
    return lines


def _md_modalities(c: Comparison) -> list[str]:
    if not c.modality_subsets:
        return []
    out = ["## Which modalities matter (modality subsets, best test Corr first)", ""]
    rows = [[a, *("●" if m in mods else "·" for m in DISPLAY_ORDER), mean_std(r, "Corr"), delta_ci(r, "Corr"),
             mean_std(r, "MAE"), delta_ci(r, "MAE")] for a, mods, r in subset_rows(c)]
    out += _md_table(["ablation", *DISPLAY_ORDER, "Corr", "Δ Corr", "MAE", "Δ MAE"], rows) + [""]
    out += [f"- {line}" for line in modality_findings(c)] + [""]
    return out
