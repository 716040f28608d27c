"""report.html: one self-contained page (inline CSS, plots as base64 PNG data URIs, no scripts), so it
opens from an MLflow artifact view, an e-mail or a laptop without network."""

from __future__ import annotations

import base64
import html
import io
import math

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

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
from pipelines.comparison.render import (
    DISPLAY_METRICS,
    delta_ci,
    direction,
    legend,
    mean_std,
    meta_line,
    modality_findings,
    n_runs,
    special_tests,
    subset_rows,
)

COLORS = {BETTER: "#2a9d52", WORSE: "#d1495b", SAME: "#9aa0a6", "": "#c8ccd0", "baseline": "#3465a4"}
MARK_WORDS = {BETTER: "better", WORSE: "worse", SAME: "not distinguishable", "": "no interval"}
VAL_LOSS_NOTE = ("Validation loss is each ablation's own training loss (MSE, L1 or Huber), so the loss "
                 "ablations sit on another scale; validation MAE is comparable across all of them.")


# ---------------------------------------------------------------------------------------------------
# Plots


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _bar_color(c: Comparison, ablation: str, metric: str) -> str:
    row = c.table.loc[ablation]
    return COLORS["baseline"] if row["role"] == "baseline" else COLORS[row[f"{metric}_mark"]]


def _metric_chart(c: Comparison, metric: str) -> str:
    names = c.ablations
    y = np.arange(len(names))[::-1]  # baseline on top
    fig = Figure(figsize=(5.2, 0.32 * len(names) + 1.2))
    ax = fig.subplots()
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
    ax.set_title(f"test {metric} ({direction(metric)})" + ("  [SYNTHETIC]" if c.synthetic else ""), fontsize=10)
    ax.set_xlabel("mean ± std over seeds; dots: seeds", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _curves_chart(c: Comparison) -> str | None:
    keys = [("val_Corr", "validation Corr"), ("val_loss", "validation loss (own criterion)"),
            ("val_MAE", "validation MAE")]
    if not c.curves:
        return None
    fig = Figure(figsize=(14, 4.2))
    axes = fig.subplots(1, len(keys))
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


def _line_color(k: int) -> tuple[float, float, float, float]:
    """tab20's ten dark shades first, then its light ones: neighbours in the legend stay distinguishable."""
    return colormaps["tab20"]((2 * k) % 20 + (2 * k // 20) % 2)


def _modality_chart(c: Comparison) -> str | None:
    rows = subset_rows(c)
    if not rows:
        return None
    labels = [" + ".join(mods) for _, mods, _ in rows]
    y = np.arange(len(rows))[::-1]
    fig = Figure(figsize=(10, 0.4 * len(rows) + 1.3))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric in zip(axes, ("Corr", "MAE")):
        means = [np.nan_to_num(r[f"{metric}_mean"]) for _, _, r in rows]
        stds = [np.nan_to_num(r[f"{metric}_std"]) for _, _, r in rows]
        ax.barh(y, means, xerr=stds, color=[_bar_color(c, a, metric) for a, _, _ in rows], height=0.7,
                error_kw={"elinewidth": 1, "capsize": 2})
        base = c.table.loc[c.baseline, f"{metric}_mean"]
        if math.isfinite(base):
            ax.axvline(base, color=COLORS["baseline"], ls="--", lw=1)
        ax.set_title(f"test {metric} ({direction(metric)})" + ("  [SYNTHETIC]" if c.synthetic else ""), fontsize=10)
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
    parts.append(f'<p class="meta">{html.escape(meta_line(c)).replace("`", "")}</p>')

    parts.append("<h2>Test metrics against the baseline</h2>")
    rows = [(r["role"], [a, n_runs(r)] + [x for m in KEY_METRICS for x in (mean_std(r, m), delta_ci(r, m))])
            for a, r in c.table.iterrows()]
    header = ["ablation", "n"] + [x for m in KEY_METRICS for x in (f"{m} (mean ± std)", f"Δ {m} [95% CI]")]
    parts.append(_html_table(header, rows))
    parts.append(f'<p class="note">{html.escape(legend(c.baseline))} Test used: {html.escape(c.test)}</p>')
    special = special_tests(c)
    if special:
        parts.append('<p class="note">Rows with a note on their test: ' + html.escape("; ".join(special)) + "</p>")

    parts.append("<h2>Key metrics</h2>")
    parts.append('<div class="grid">' + "".join(_img(_metric_chart(c, m), f"test {m} per ablation")
                                                 for m in KEY_METRICS) + "</div>")
    parts.append('<p class="note">Bars: mean over seeds, colour by mark (blue baseline, green better, red worse, '
                 "grey not distinguishable); error bars: std over seeds; dashed line: baseline mean; dotted: "
                 "oracle.</p>")

    if c.modality_subsets:
        parts.append("<h2>Which modalities matter</h2>")
        parts.append(_img(_modality_chart(c), "modality subsets, best test Corr first"))
        rows = [(c.table.loc[a, "role"], [a, *("●" if m in mods else "·" for m in DISPLAY_ORDER),
                                          mean_std(r, "Corr"), delta_ci(r, "Corr"), mean_std(r, "MAE"),
                                          delta_ci(r, "MAE")]) for a, mods, r in subset_rows(c)]
        header = ["ablation", *DISPLAY_ORDER, "Corr", "Δ Corr [95% CI]", "MAE", "Δ MAE [95% CI]"]
        parts.append(_html_table(header, rows))
        parts.append("<ul>" + "".join(f"<li>{_mark_html(x.rstrip('.'))}</li>" for x in modality_findings(c))
                     + "</ul>")

    parts.append("<h2>Validation curves (mean over seeds)</h2>")
    parts.append('<p class="note">Validation split only: it selected each run\'s checkpoint (best validation '
                 f"Corr). The test split appears only in the tables and bars above. {VAL_LOSS_NOTE}</p>")
    parts.append(_img(_curves_chart(c), "validation curves per ablation") or '<p class="note">No metric history '
                                                                                "was logged.</p>")

    parts.append("<h2>All test metrics</h2><details><summary>mean ± std over seeds, with marks</summary>")
    rows = [(r["role"], [a, n_runs(r)] + [f"{mean_std(r, m)} {r[f'{m}_mark']}".rstrip() for m in DISPLAY_METRICS])
            for a, r in c.table.iterrows()]
    parts.append(_html_table(["ablation", "n", *DISPLAY_METRICS], rows) + "</details>")
    parts.append("<h2>How this was computed</h2>"
                 f'<p class="note">{html.escape(c.test)} Std is over seeds (ddof=1); n is the number of finished '
                 "seeds. Every column of every metric is in comparison.csv.</p>")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
