"""Rendering a Comparison: the terminal table, comparison.csv / comparison.md, and report.html.

The HTML is one self-contained file (inline CSS, plots as base64 PNG data URIs, no scripts), so it
opens from an MLflow artifact view, an e-mail or a laptop without network.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: figures are rendered to PNG bytes, never shown
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from msa.metrics import HIGHER_IS_BETTER, METRIC_NAMES  # noqa: E402
from pipelines.stages.compare import (BETTER, KEY_METRICS, MODALITIES, ORACLE, SAME,  # noqa: E402
                                      SYNTHETIC_BANNER, WORSE)

if TYPE_CHECKING:
    import pandas as pd

    from pipelines.stages.compare import Comparison

DISPLAY_METRICS: tuple[str, ...] = KEY_METRICS + tuple(m for m in METRIC_NAMES if m not in KEY_METRICS)
COLORS = {BETTER: "#2a9d52", WORSE: "#d1495b", SAME: "#9aa0a6", "": "#c8ccd0", "baseline": "#3465a4"}
MARK_WORDS = {BETTER: "better", WORSE: "worse", SAME: "not distinguishable", "": "no interval"}
VAL_LOSS_NOTE = ("Validation loss is each ablation's own training loss (MSE, L1 or Huber), so the loss "
                 "ablations sit on another scale; validation MAE is comparable across all of them.")


def write_reports(c: Comparison, out_dir: Path) -> dict[str, Path]:
    """Write comparison.csv, comparison.md and report.html into out_dir (created); name -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("comparison.csv", "comparison.md", "report.html")}
    c.table.to_csv(paths["comparison.csv"], encoding="utf-8")
    paths["comparison.md"].write_text(to_markdown(c), encoding="utf-8")
    paths["report.html"].write_text(to_html(c), encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------------
# Small formatting helpers


def _num(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _signed(x: float, digits: int = 3) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:+.{digits}f}"


def _mean_std(row: pd.Series, m: str) -> str:
    std = row[f"{m}_std"]
    return _num(row[f"{m}_mean"]) + ("" if not math.isfinite(std) else f" ± {_num(std)}")


def _delta_ci(row: pd.Series, m: str) -> str:
    """'+0.012 [-0.003, +0.027] ~' for an ablation; '' for the baseline."""
    if row["role"] == "baseline":
        return ""
    ci = "" if not math.isfinite(row[f"{m}_ci_low"]) else \
        f" [{_signed(row[f'{m}_ci_low'])}, {_signed(row[f'{m}_ci_high'])}]"
    return f"{_signed(row[f'{m}_delta'])}{ci} {row[f'{m}_mark']}".rstrip()


def _n_runs(row: pd.Series) -> str:
    return "–" if row["role"] == ORACLE else str(len([s for s in row["seeds"].split(",") if s]))


def _direction(m: str) -> str:
    return "higher is better" if HIGHER_IS_BETTER[m] else "lower is better"


def _legend() -> str:
    return (f"{BETTER} better / {WORSE} worse than the baseline in the metric's own direction (MAE: lower is "
            f"better): the 95% interval of the difference excludes 0. {SAME}: the interval contains 0, not "
            "distinguishable from noise.")


def _special_tests(c: Comparison) -> list[str]:
    """Rows whose interval was not the paired bootstrap, with why."""
    return [f"{a}: {t}" for a, t in c.table["test"].items()
            if c.table.loc[a, "role"] == "ablation" and not t.startswith("paired, ")]


# ---------------------------------------------------------------------------------------------------
# Terminal


def format_table(c: Comparison) -> str:
    """Key test metrics per ablation (suite order, baseline first): mean ± std over seeds, Δ, mark."""
    cell_width = 25
    lines = [f"*** {SYNTHETIC_BANNER} ***"] if c.synthetic else []
    lines.append(f"Test metrics of suite run {c.suite_run_id} ('{c.experiment}'): mean ± std over seeds, "
                 f"difference to '{c.baseline}', mark")
    header = (f"{'ablation':<20} {'n':>2}  " + "".join(f"{m:<{cell_width}}" for m in KEY_METRICS)).rstrip()
    lines += [header, "-" * len(header)]
    for ablation, row in c.table.iterrows():
        cells = []
        for m in KEY_METRICS:
            delta = "" if row["role"] == "baseline" else f" {_signed(row[f'{m}_delta'])} {row[f'{m}_mark']}"
            cells.append(f"{(_mean_std(row, m) + delta).rstrip():<{cell_width}}")
        lines.append(f"{ablation:<20} {_n_runs(row):>2}  " + "".join(cells).rstrip())
    lines.append(_legend())
    lines.append("Intervals: paired bootstrap over test samples, runs paired by seed "
                 "(comparison.md says exactly how).")
    lines += [f"  {line}" for line in _special_tests(c)]
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
        out += [f"> **{SYNTHETIC_BANNER}.** The labels come from a generator; the `oracle` row is the best score "
                "reachable from its noise-free labels. Read differences as what the pipeline can detect, not as "
                "findings about MOSI.", ""]
    out += [_meta_line(c), ""]
    out += ["## Test metrics (mean ± std over seeds; mark against the baseline)", ""]
    rows = [[f"**{a}**" if r["role"] == "baseline" else (f"*{a}*" if r["role"] == ORACLE else a), _n_runs(r)]
            + [f"{_mean_std(r, m)} {r[f'{m}_mark']}".rstrip() for m in DISPLAY_METRICS]
            for a, r in c.table.iterrows()]
    out += _md_table(["ablation", "n", *DISPLAY_METRICS], rows) + [""]
    out += ["## Difference to the baseline, with its 95% interval", ""]
    rows = [[a, r["test"]] + [_delta_ci(r, m) for m in KEY_METRICS]
            for a, r in c.table.iterrows() if r["role"] != "baseline"]
    out += _md_table(["ablation", "test", *(f"Δ {m}" for m in KEY_METRICS)], rows) + [""]
    out += _md_modalities(c)
    out += ["## How to read", "",
            f"- {_legend()}",
            f"- Test used: {c.test}",
            "- Every figure here is on the test split, touched once per run; each run's checkpoint was selected "
            "on the validation split (best validation Corr). n is the number of finished seeds; std uses ddof=1.",
            "- The curves (validation only) and plots are in `report.html`; every column for every metric "
            "(`<Metric>_mean`, `_std`, `_n`, `_delta`, `_ci_low`, `_ci_high`, `_mark`) is in `comparison.csv`.",
            ""]
    return "\n".join(out)


def _meta_line(c: Comparison) -> str:
    return (f"Suite run `{c.suite_run_id}` · seeds {', '.join(map(str, c.seeds))} · {c.n_test} test samples per run "
            f"· baseline `{c.baseline}`")


def _subset_rows(c: Comparison) -> list[tuple[str, tuple[str, ...], pd.Series]]:
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


def _modality_findings(c: Comparison) -> list[str]:
    lines = []
    singles = [(a, mods[0], r) for a, mods, r in _subset_rows(c) if len(mods) == 1 and math.isfinite(r["Corr_mean"])]
    if len(singles) > 1:
        a, m, r = singles[0]
        lines.append(f"Strongest single modality: {m} ({a}, test Corr {_num(r['Corr_mean'])}).")
    for m, a in _leave_one_out(c):
        r = c.table.loc[a]
        lines.append(f"Without {m} ({a}): Corr {_delta_ci(r, 'Corr')}, MAE {_delta_ci(r, 'MAE')}.")
    return lines


def _md_modalities(c: Comparison) -> list[str]:
    if not c.modality_subsets:
        return []
    out = ["## Which modalities matter (modality subsets, best test Corr first)", ""]
    rows = [[a, *("●" if m in mods else "·" for m in MODALITIES), _mean_std(r, "Corr"), _delta_ci(r, "Corr"),
             _mean_std(r, "MAE"), _delta_ci(r, "MAE")] for a, mods, r in _subset_rows(c)]
    out += _md_table(["ablation", *MODALITIES, "Corr", "Δ Corr", "MAE", "Δ MAE"], rows) + [""]
    out += [f"- {line}" for line in _modality_findings(c)] + [""]
    return out


# ---------------------------------------------------------------------------------------------------
# Plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _bar_color(c: Comparison, ablation: str, metric: str) -> str:
    row = c.table.loc[ablation]
    return COLORS["baseline"] if row["role"] == "baseline" else COLORS[row[f"{metric}_mark"]]


def _metric_chart(c: Comparison, metric: str) -> str:
    names = c.ablations
    y = np.arange(len(names))[::-1]  # baseline on top
    fig, ax = plt.subplots(figsize=(5.2, 0.32 * len(names) + 1.2))
    means = [c.table.loc[a, f"{metric}_mean"] for a in names]
    stds = [np.nan_to_num(c.table.loc[a, f"{metric}_std"]) for a in names]
    ax.barh(y, np.nan_to_num(means), xerr=stds, color=[_bar_color(c, a, metric) for a in names],
            error_kw={"elinewidth": 1, "capsize": 2}, height=0.7)
    for a, yy in zip(names, y):  # each seed as a dot: three seeds are too few to hide behind a bar
        values = c.runs.loc[c.runs["ablation"] == a, metric].dropna()
        ax.plot(values, np.full(len(values), yy), "o", ms=2.5, color="black", alpha=0.6)
    base = c.table.loc[c.baseline, f"{metric}_mean"]
    if math.isfinite(base):
        ax.axvline(base, color=COLORS["baseline"], ls="--", lw=1, label=f"{c.baseline} mean")
    if ORACLE in c.table.index and math.isfinite(c.table.loc[ORACLE, f"{metric}_mean"]):
        ax.axvline(c.table.loc[ORACLE, f"{metric}_mean"], color="black", ls=":", lw=1, label="oracle")
    ax.set_yticks(y, names, fontsize=8)
    ax.set_title(f"test {metric} ({_direction(metric)})" + ("  [SYNTHETIC]" if c.synthetic else ""), fontsize=10)
    ax.set_xlabel("mean ± std over seeds; dots: seeds", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _curves_chart(c: Comparison) -> str | None:
    keys = [("val_Corr", "validation Corr"), ("val_loss", "validation loss (own criterion)"),
            ("val_MAE", "validation MAE")]
    if not c.curves:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(14, 4.2))
    others = (a for a in c.ablations if a in c.curves and a != c.baseline)
    for i, ablation in enumerate([c.baseline, *others] if c.baseline in c.curves else list(others)):
        curve = c.curves[ablation]
        is_base = ablation == c.baseline
        style = {"color": "black", "lw": 2.4, "zorder": 5} if is_base else {"color": _line_color(i - 1), "lw": 1.2}
        for ax, (key, _) in zip(axes, keys):
            if key in curve:
                ax.plot(curve.index, curve[key], label=ablation, **style)
    for ax, (_, title) in zip(axes, keys):
        ax.set_title(title + ("  [SYNTHETIC]" if c.synthetic else ""), fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return _png(fig)


def _line_color(k: int):
    """tab20's ten dark shades first, then its light ones: neighbours in the legend stay distinguishable."""
    return plt.get_cmap("tab20")((2 * k) % 20 + (2 * k // 20) % 2)


def _modality_chart(c: Comparison) -> str | None:
    rows = _subset_rows(c)
    if not rows:
        return None
    labels = [" + ".join(mods) for _, mods, _ in rows]
    y = np.arange(len(rows))[::-1]
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.4 * len(rows) + 1.3), sharey=True)
    for ax, metric in zip(axes, ("Corr", "MAE")):
        means = [np.nan_to_num(r[f"{metric}_mean"]) for _, _, r in rows]
        stds = [np.nan_to_num(r[f"{metric}_std"]) for _, _, r in rows]
        ax.barh(y, means, xerr=stds, color=[_bar_color(c, a, metric) for a, _, _ in rows], height=0.7,
                error_kw={"elinewidth": 1, "capsize": 2})
        base = c.table.loc[c.baseline, f"{metric}_mean"]
        if math.isfinite(base):
            ax.axvline(base, color=COLORS["baseline"], ls="--", lw=1)
        ax.set_title(f"test {metric} ({_direction(metric)})" + ("  [SYNTHETIC]" if c.synthetic else ""), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, labels, fontsize=9)
    fig.tight_layout()
    return _png(fig)


# ---------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f4f5f7}td:first-child,th:first-child{text-align:left}
tr.baseline td{font-weight:bold;background:#eef3fb}tr.oracle td{font-style:italic;color:#555}
.banner{background:#fde8e8;border:2px solid #d1495b;color:#8a1c2b;padding:.6em 1em;font-weight:bold;margin:1em 0}
.meta,.note{color:#555;font-size:13px}.grid{display:flex;flex-wrap:wrap;gap:1em}
.better{color:#2a9d52;font-weight:bold}.worse{color:#d1495b;font-weight:bold}.same{color:#777}
code{background:#f4f5f7;padding:0 3px}img{max-width:100%}
"""


def _mark_html(text: str) -> str:
    """Escape a cell and colour its trailing mark."""
    for mark, cls in ((BETTER, "better"), (WORSE, "worse")):
        if text.endswith(mark):
            return f'{html.escape(text[:-1])}<span class="{cls}" title="{MARK_WORDS[mark]}">{mark}</span>'
    if text.endswith(f" {SAME}"):
        return f'{html.escape(text[:-1])}<span class="same" title="{MARK_WORDS[SAME]}">{SAME}</span>'
    return html.escape(text)


def _html_table(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    """rows: (css class, cells)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(f'<tr class="{cls}">' + "".join(f"<td>{_mark_html(x)}</td>" for x in cells) + "</tr>"
                   for cls, cells in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(src: str | None, alt: str) -> str:
    return "" if src is None else f'<img src="{src}" alt="{html.escape(alt)}">'


def to_html(c: Comparison) -> str:
    title = f"Ablation comparison: {c.experiment}"
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if c.synthetic:
        parts.append(f'<div class="banner">{SYNTHETIC_BANNER}. The labels come from a generator; the oracle row '
                     "is the best score reachable from its noise-free labels.</div>")
    parts.append(f'<p class="meta">{html.escape(_meta_line(c)).replace("`", "")}</p>')

    parts.append("<h2>Test metrics against the baseline</h2>")
    rows = [(r["role"], [a, _n_runs(r)] + [x for m in KEY_METRICS for x in (_mean_std(r, m), _delta_ci(r, m))])
            for a, r in c.table.iterrows()]
    header = ["ablation", "n"] + [x for m in KEY_METRICS for x in (f"{m} (mean ± std)", f"Δ {m} [95% CI]")]
    parts.append(_html_table(header, rows))
    parts.append(f'<p class="note">{html.escape(_legend())} Test used: {html.escape(c.test)}</p>')
    special = _special_tests(c)
    if special:
        parts.append('<p class="note">Rows not paired on every seed: ' + html.escape("; ".join(special)) + "</p>")

    parts.append("<h2>Key metrics</h2>")
    parts.append('<div class="grid">' + "".join(_img(_metric_chart(c, m), f"test {m} per ablation")
                                                 for m in KEY_METRICS) + "</div>")
    parts.append('<p class="note">Bars: mean over seeds, colour by mark (blue baseline, green better, red worse, '
                 "grey not distinguishable); error bars: std over seeds; dashed line: baseline mean; dotted: "
                 "oracle.</p>")

    if c.modality_subsets:
        parts.append("<h2>Which modalities matter</h2>")
        parts.append(_img(_modality_chart(c), "modality subsets, best test Corr first"))
        rows = [(c.table.loc[a, "role"], [a, *("●" if m in mods else "·" for m in MODALITIES),
                                          _mean_std(r, "Corr"), _delta_ci(r, "Corr"), _mean_std(r, "MAE"),
                                          _delta_ci(r, "MAE")]) for a, mods, r in _subset_rows(c)]
        parts.append(_html_table(["ablation", *MODALITIES, "Corr", "Δ Corr [95% CI]", "MAE", "Δ MAE [95% CI]"], rows))
        parts.append("<ul>" + "".join(f"<li>{_mark_html(x.rstrip('.'))}</li>" for x in _modality_findings(c))
                     + "</ul>")

    parts.append("<h2>Validation curves (mean over seeds)</h2>")
    parts.append('<p class="note">Validation split only: it selected each run\'s checkpoint (best validation '
                 f"Corr). The test split appears only in the tables and bars above. {VAL_LOSS_NOTE}</p>")
    parts.append(_img(_curves_chart(c), "validation curves per ablation") or '<p class="note">No metric history '
                                                                                "was logged.</p>")

    parts.append("<h2>All test metrics</h2><details><summary>mean ± std over seeds, with marks</summary>")
    rows = [(r["role"], [a, _n_runs(r)] + [f"{_mean_std(r, m)} {r[f'{m}_mark']}".rstrip() for m in DISPLAY_METRICS])
            for a, r in c.table.iterrows()]
    parts.append(_html_table(["ablation", "n", *DISPLAY_METRICS], rows) + "</details>")
    parts.append("<h2>How this was computed</h2>"
                 f'<p class="note">{html.escape(c.test)} Std is over seeds (ddof=1); n is the number of finished '
                 "seeds. Every column of every metric is in comparison.csv.</p>")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
