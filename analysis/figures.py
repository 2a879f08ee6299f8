"""Plotly figures of the downstream evaluation, in the study's style, and a self-contained HTML report.

* :func:`bootstrap_figure` (the study's Fig. 1): one dot per bootstrap resample, the mean marked with
  its 95 % interval, per method, side by side within each dataset; rows are the metrics (macro
  ROC-AUC, macro mAP), columns the probes.
* :func:`limited_data_figure` (the study's Fig. 2): metric against the percentage of training tracks
  (log axis), one line per method through the mean over the draws, error bars one standard
  deviation, the single draws as faint dots.

A method keeps its colour in every panel and both figures. The report inlines plotly.js once
(``include_plotlyjs=True``), so it opens offline.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

__all__ = ["METRIC_TITLES", "bootstrap_figure", "limited_data_figure", "markdown_html", "method_colours",
           "write_report"]

METRIC_TITLES = {"roc_auc": "macro ROC-AUC", "average_precision": "macro mAP"}
PROBE_TITLES = {"linear": "linear probe", "mlp": "MLP probe"}
_PALETTE = qualitative.Plotly + qualitative.D3


def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method, in order of first appearance."""
    return {method: _PALETTE[i % len(_PALETTE)] for i, method in enumerate(dict.fromkeys(methods))}


def _panels(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    metrics = [m for m in METRIC_TITLES if m in set(frame["metric"])] if "metric" in frame else list(METRIC_TITLES)
    classifiers = list(dict.fromkeys(frame["classifier"]))
    return metrics, classifiers


def bootstrap_figure(bootstrap: pd.DataFrame, results: pd.DataFrame | None = None, jitter: float = 0.12) -> go.Figure:
    """Fig. 1: the bootstrap resamples of every method, per dataset, metric and probe.

    ``bootstrap`` has columns ``dataset, method, classifier, metric, resample, value`` (one row per
    resample); ``results`` (optional, columns ``dataset, method, classifier, <metric>, <metric>_low,
    <metric>_high``) gives the marked mean and its 95 % interval, else they are computed from the
    resamples. Trace names are the method names.
    """
    metrics, classifiers = _panels(bootstrap)
    datasets = list(dict.fromkeys(bootstrap["dataset"]))
    methods = list(dict.fromkeys(bootstrap["method"]))
    colours = method_colours(methods)
    figure = make_subplots(
        rows=len(metrics), cols=len(classifiers), shared_xaxes=True, shared_yaxes=True, vertical_spacing=0.08,
        horizontal_spacing=0.06,
        subplot_titles=[f"{METRIC_TITLES[m]}, {PROBE_TITLES.get(c, c)}" for m in metrics for c in classifiers],
    )
    width = 0.8 / max(1, len(methods))  # the methods share 80 % of a dataset's slot
    rng = np.random.default_rng(0)  # jitter only: fixed so the figure is reproducible
    for row, metric in enumerate(metrics, start=1):
        for col, classifier in enumerate(classifiers, start=1):
            first_panel = row == 1 and col == 1
            for number, method in enumerate(methods):
                offset = -0.4 + width * (number + 0.5)
                points = bootstrap[(bootstrap["method"] == method) & (bootstrap["classifier"] == classifier)
                                   & (bootstrap["metric"] == metric)]
                if points.empty:
                    continue
                slot = points["dataset"].map({d: i for i, d in enumerate(datasets)}).to_numpy(dtype=float)
                x = slot + offset + rng.uniform(-jitter, jitter, len(points)) * width / 0.4
                if first_panel:  # the legend's entry: the method's colour at full strength (the dots are faint)
                    figure.add_trace(go.Scatter(
                        x=[None], y=[None], mode="markers", name=method, legendgroup=method, showlegend=True,
                        marker={"color": colours[method], "size": 10, "symbol": "diamond"}, hoverinfo="skip",
                    ), row=row, col=col)
                figure.add_trace(go.Scatter(
                    x=x, y=points["value"], mode="markers", name=method, legendgroup=method,
                    showlegend=False, marker={"color": colours[method], "size": 5, "opacity": 0.45},
                    customdata=np.stack([points["dataset"], points["resample"]], axis=1),
                    hovertemplate=f"{method}<br>%{{customdata[0]}}, resample %{{customdata[1]}}<br>%{{y:.4f}}"
                    "<extra></extra>",
                ), row=row, col=col)
                means, lows, highs = [], [], []
                for dataset in datasets:
                    values = points.loc[points["dataset"] == dataset, "value"].to_numpy()
                    mean, low, high = _interval(results, dataset, method, classifier, metric, values)
                    means.append(mean)
                    lows.append(mean - low)
                    highs.append(high - mean)
                figure.add_trace(go.Scatter(
                    x=np.arange(len(datasets)) + offset, y=means, mode="markers", name=f"{method} mean",
                    legendgroup=method, showlegend=False,
                    marker={"color": colours[method], "symbol": "diamond", "size": 12,
                            "line": {"color": "black", "width": 1.5}},
                    error_y={"type": "data", "symmetric": False, "array": highs, "arrayminus": lows,
                             "color": "black", "thickness": 1.5, "width": 6},
                    customdata=datasets,
                    hovertemplate=f"{method} mean<br>%{{customdata}}<br>%{{y:.4f}}<extra></extra>",
                ), row=row, col=col)
            figure.update_xaxes(tickvals=list(range(len(datasets))), ticktext=datasets,
                                range=[-0.5, len(datasets) - 0.5], row=row, col=col)
        figure.update_yaxes(title_text=f"{METRIC_TITLES[metric]} (0-1)", row=row, col=1)
    # Said outright: with the probes' axes matched and the x-axes' ranges set, plotly.js otherwise drew these
    # y-axes at its range for an axis without data (-1 to 4).
    figure.update_yaxes(autorange=True)
    figure.update_layout(
        # two lines: one ran past a single probe's 700 px and was cut off in the exported PNG
        title="Downstream scores<br><sup>one dot per bootstrap resample; diamond: the mean with its 95 % interval</sup>",
        template="plotly_white", height=380 * len(metrics), width=max(700, 420 * len(classifiers)),
        legend_title_text="method",
    )
    return figure


def _interval(results, dataset, method, classifier, metric, values) -> tuple[float, float, float]:
    if results is not None and not results.empty:
        match = results[(results["dataset"] == dataset) & (results["method"] == method)
                        & (results["classifier"] == classifier)]
        if not match.empty and f"{metric}_low" in match:
            first = match.iloc[0]
            return float(first[metric]), float(first[f"{metric}_low"]), float(first[f"{metric}_high"])
    if len(values) == 0:
        return np.nan, np.nan, np.nan
    low, high = np.percentile(values, [2.5, 97.5])
    return float(np.mean(values)), float(low), float(high)


def limited_data_figure(limited: pd.DataFrame) -> go.Figure:
    """Fig. 2: each metric against the percentage of training tracks, per method and probe.

    ``limited`` has columns ``dataset, method, classifier, fraction, draw, roc_auc,
    average_precision``. With several datasets a line is named ``method (dataset)``.
    """
    classifiers = list(dict.fromkeys(limited["classifier"]))
    metrics = list(METRIC_TITLES)
    datasets = list(dict.fromkeys(limited["dataset"]))
    methods = list(dict.fromkeys(limited["method"]))
    colours = method_colours(methods)
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    figure = make_subplots(
        rows=len(metrics), cols=len(classifiers), shared_xaxes=True, shared_yaxes=True, vertical_spacing=0.08,
        horizontal_spacing=0.06,
        subplot_titles=[f"{METRIC_TITLES[m]}, {PROBE_TITLES.get(c, c)}" for m in metrics for c in classifiers],
    )
    for row, metric in enumerate(metrics, start=1):
        for col, classifier in enumerate(classifiers, start=1):
            first_panel = row == 1 and col == 1
            for d_number, dataset in enumerate(datasets):
                for method in methods:
                    frame = limited[(limited["method"] == method) & (limited["classifier"] == classifier)
                                    & (limited["dataset"] == dataset)]
                    if frame.empty:
                        continue
                    name = method if len(datasets) == 1 else f"{method} ({dataset})"
                    stats = frame.groupby("fraction")[metric].agg(["mean", "std", "count"]).reset_index()
                    stats["std"] = stats["std"].fillna(0.0)
                    figure.add_trace(go.Scatter(
                        x=100 * stats["fraction"], y=stats["mean"], mode="lines+markers", name=name,
                        legendgroup=name, showlegend=first_panel,
                        line={"color": colours[method], "dash": dashes[d_number % len(dashes)]},
                        error_y={"type": "data", "array": stats["std"], "thickness": 1, "width": 4},
                        customdata=stats["count"],
                        hovertemplate=f"{name}<br>%{{x:g}} % of training tracks<br>mean %{{y:.4f}} "
                        "over %{customdata} draws<extra></extra>",
                    ), row=row, col=col)
                    figure.add_trace(go.Scatter(
                        x=100 * frame["fraction"], y=frame[metric], mode="markers", name=f"{name} draws",
                        legendgroup=name, showlegend=False,
                        marker={"color": colours[method], "size": 5, "opacity": 0.35},
                        customdata=frame["draw"],
                        hovertemplate=f"{name}<br>%{{x:g}} %, draw %{{customdata}}<br>%{{y:.4f}}<extra></extra>",
                    ), row=row, col=col)
            # A tick at each percentage evaluated (plotly's log ticks read "1 2 5 10 2 5 100": 20 % and 25 % sat
            # above a "2").
            percents = sorted({100 * float(f) for f in limited["fraction"]})
            figure.update_xaxes(type="log", title_text="% of training tracks" if row == len(metrics) else None,
                                tickvals=percents, ticktext=[f"{p:g}" for p in percents], row=row, col=col)
        figure.update_yaxes(title_text=f"{METRIC_TITLES[metric]} (0-1)", row=row, col=1)
    figure.update_layout(
        title="Limited training data: mean over draws (error bars: one standard deviation)",
        template="plotly_white", height=380 * len(metrics), width=max(700, 420 * len(classifiers)),
        legend_title_text="method",
    )
    return figure


_GROUP_COLUMNS = {"classifier": "probe", "scored_tags": "scored tags", "roc_auc": "ROC-AUC", "average_precision": "mAP"}


def _table_html(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, float_format=lambda value: f"{value:.4f}", na_rep="–", border=0,
                         classes="table")


_ALIGN = {(True, True): "center", (False, True): "right", (True, False): "left", (False, False): "left"}


def _cells(line: str) -> list[str]:
    """A Markdown table row's cells (``\\|`` is a ``|`` inside a cell)."""
    inner = line.strip()
    inner = inner[1:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner[1:]
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def markdown_html(text: str) -> str:
    """``analysis.downstream``'s Markdown blocks (pipe tables and paragraphs of text) as HTML: a table
    as a table, its columns aligned as the Markdown says, the rest as paragraphs; every text escaped."""
    parts: list[str] = []
    lines = text.splitlines()
    number = 0
    while number < len(lines):
        line = lines[number]
        is_table = (line.lstrip().startswith("|") and number + 1 < len(lines)
                    and re.fullmatch(r"\s*\|?(\s*:?-+:?\s*\|)+\s*:?-*:?\s*", lines[number + 1]) is not None)
        if is_table:
            header = _cells(line)
            aligns = [_ALIGN[cell.startswith(":"), cell.endswith(":")] for cell in _cells(lines[number + 1])]
            aligns += ["left"] * (len(header) - len(aligns))
            number += 2
            body = []
            while number < len(lines) and lines[number].lstrip().startswith("|"):
                body.append(_cells(lines[number]))
                number += 1

            def row(cells: list[str], tag: str) -> str:
                return "<tr>" + "".join(f'<{tag} style="text-align:{aligns[i] if i < len(aligns) else "left"}">'
                                        f"{html.escape(cell)}</{tag}>" for i, cell in enumerate(cells)) + "</tr>"

            parts.append('<table class="table"><thead>' + row(header, "th") + "</thead><tbody>"
                         + "".join(row(cells, "td") for cells in body) + "</tbody></table>")
            continue
        paragraph = []
        while number < len(lines) and lines[number].strip() and not lines[number].lstrip().startswith("|"):
            paragraph.append(lines[number].strip())
            number += 1
        if paragraph:
            parts.append(f"<p>{html.escape(' '.join(paragraph))}</p>")
        else:
            number += 1
    return "\n".join(parts)


def write_report(
    path: Path,
    results: pd.DataFrame,
    bootstrap: pd.DataFrame,
    limited: pd.DataFrame,
    per_group: pd.DataFrame | None = None,
    title: str = "Downstream evaluation",
    tables_markdown: Sequence[str] = (),
) -> Path:
    """One self-contained HTML file: the tables, Fig. 1 and Fig. 2 (plotly.js inlined once)."""
    figures = [bootstrap_figure(bootstrap, results), limited_data_figure(limited)]
    parts = [figure.to_html(full_html=False, include_plotlyjs=(i == 0), div_id=f"figure-{i + 1}")
             for i, figure in enumerate(figures)]
    tables = "".join(f'<div class="block">{markdown_html(text)}</div>' for text in tables_markdown)
    groups = ""
    if per_group is not None and not per_group.empty and per_group["group"].nunique() > 1:
        from analysis.downstream import CLASSIFIER_NAMES  # (the other tables' names of the probes)

        shown = per_group.rename(columns=_GROUP_COLUMNS)
        if "probe" in shown:
            shown["probe"] = shown["probe"].map(lambda name: CLASSIFIER_NAMES.get(name, name))
        groups = ("<h2>Per tag group</h2><p>Macro ROC-AUC and mAP on the whole test set over each group's tags (those "
                  "with positive and negative test tracks: the scored tags), probes trained on all training tracks "
                  "(per_group.csv).</p>" + _table_html(shown))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;}} p{{max-width:60em;}} .block{{margin:1.5em 0;overflow-x:auto;}}
table.table{{border-collapse:collapse;font-size:0.85em;display:block;overflow-x:auto;}}
.table td,.table th{{padding:2px 8px;text-align:right;white-space:nowrap;}} .table th{{border-bottom:1px solid #999;}}
.table tbody tr:nth-child(even){{background:#f6f6f6;}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
{tables}
<h2>Fig. 1: bootstrap resamples</h2>
{parts[0]}
<h2>Fig. 2: limited training data</h2>
{parts[1]}
{groups}
</body></html>
"""
    path = Path(path)
    path.write_text(page, encoding="utf-8")
    return path
