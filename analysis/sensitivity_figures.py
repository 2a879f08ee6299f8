"""The figures and the HTML page of the sensitivity report (:mod:`analysis.sensitivity`).

Sections, per experiment (ids ``e<N>-<experiment>-<section>``, N its position in the report, so that
two experiments whose folders share a name get ids of their own):

- ``summary``: trials by outcome (collapsed ones by type), the best trial, compute spent and saved;
- ``importance``: PED-ANOVA and fANOVA importances for the objective and for collapse;
- ``parameters``: per sampled parameter, the objective against its value, the trials without a
  score, and the collapse rate across its range;
- ``maps``: two-parameter maps of the most important pairs, with the estimated collapse boundary;
- ``dynamics``: effective-rank (and cluster-occupancy) trajectories per trial, time to collapse;
- ``label-free``: final effective rank against the probe score, Spearman's rho with its interval;
- ``parallel``: parallel coordinates of every trial;
- ``history``: the optimisation history;
- ``trials``: a table of every trial;

and, with several experiments, ``comparison`` first. Every figure has a title, axis titles with
units and a one-line reading aid under it. Only SVG-rendered trace types are used, except the
parallel coordinates (WebGL, as plotly draws them).
"""

from __future__ import annotations

import html
import importlib.util
import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from musicssl.cli import counted

if TYPE_CHECKING:
    from analysis.sensitivity import Experiment, ExperimentAnalysis

__all__ = ["ReportFigure", "build_page", "export_pngs", "group_colour", "parameter_label"]

TEMPLATE = "plotly_white"
# Outcome colours: complete in blue; the collapse types in warm colours; the rest in neutrals.
_GROUP_COLOURS = {
    "complete": "#1f77b4",
    "collapsed: complete": "#d62728",
    "collapsed: dimensional": "#ff7f0e",
    "collapsed: cluster": "#9467bd",
    "collapsed: partial": "#c5b0d5",
    "collapsed: unknown": "#e377c2",
    "diverged": "#3b3b3b",
    "failed": "#9e9e9e",
    "stopped": "#17becf",
    "running": "#bcbd22",
}
_GROUP_SYMBOLS = {"complete": "circle", "diverged": "diamond", "failed": "square-open", "stopped": "triangle-up",
                  "running": "circle-open"}
_PARAMETER_LABELS = {
    "inv_weight": "invariance weight (loss coefficient)",
    "var_weight": "variance weight (loss coefficient)",
    "cov_weight": "covariance weight (loss coefficient)",
    "learning_rate": "learning rate (AdamW, per step)",
    "weight_decay": "weight decay (AdamW coefficient)",
    "num_prototypes": "cluster count K (prototypes)",
    "student_temperature": "student temperature (softmax)",
    "teacher_temperature": "teacher temperature (softmax)",
    "teacher_warmup_epochs": "teacher temperature warm-up (epochs)",
    "one_minus_center_momentum": "1 - centre momentum (per step)",
    "one_minus_ema_rate": "1 - teacher/target EMA rate (per step)",  # clustering's teacher, BYOL's target
    "temperature": "temperature (softmax)",
    "lambd": "off-diagonal weight lambda (loss coefficient)",
    "base_ema_rate": "teacher/target EMA rate (per step)",
    "batch_size": "batch size (segments)",
    "predictor_hidden_dim": "predictor hidden width (units)",
}
_KERNEL_BANDWIDTH = 0.15  # of the normalised (log) range, for the collapse-probability map
_MAP_GRID = 48
# Embedded in the page before plotly: errors and console errors land in <pre id="js-errors">, so a
# headless browser's DOM dump (and a reader) can see them.
_ERROR_HOOK = """<script>
(function () {
  function record(text) {
    var box = document.getElementById("js-errors");
    if (box) { box.textContent += text + "\\n"; box.style.display = "block"; }
    else { (window.__pendingErrors = window.__pendingErrors || []).push(text); }
  }
  window.addEventListener("error", function (event) { record("error: " + event.message); });
  window.addEventListener("unhandledrejection", function (event) { record("unhandled rejection: " + event.reason); });
  var original = console.error;
  console.error = function () {
    record("console.error: " + Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
  document.addEventListener("DOMContentLoaded", function () { (window.__pendingErrors || []).forEach(record); });
})();
</script>"""
_STYLE = """<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em} h3{margin-top:1.2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0;display:block;max-width:100%;overflow-x:auto}
td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:right}
th{background:#f6f6f6} td.text,th.text{text-align:left}
figure{margin:1em 0 2em 0} figcaption{font-size:.9em;color:#444;margin-top:.3em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em;margin:.6em 0}
.muted{color:#666} nav ul{columns:2} #js-errors{display:none;color:#b00020;background:#fde;padding:.5em}
details>summary{cursor:pointer;font-weight:600}
</style>"""


@dataclass
class ReportFigure:
    """A figure of the report with its reading aid."""

    key: str
    experiment: str | None
    title: str
    caption: str
    figure: go.Figure


def group_colour(group: str) -> str:
    return _GROUP_COLOURS.get(group, _GROUP_COLOURS["collapsed: unknown"] if group.startswith("collapsed") else "#8c564b")


def _group_symbol(group: str) -> str:
    return "x" if group.startswith("collapsed") else _GROUP_SYMBOLS.get(group, "circle")


def _is_log(distribution) -> bool:
    return bool(getattr(distribution, "log", False))


def _is_categorical(distribution) -> bool:
    return hasattr(distribution, "choices")


def parameter_label(name: str, distribution=None) -> str:
    """Axis title of a parameter: what it is, its unit, and its scale."""
    label = _PARAMETER_LABELS.get(name, f"{name} (unitless)")
    if distribution is not None and _is_log(distribution):
        label += ", log scale"
    return label


def _layout(figure: go.Figure, title: str, height: int = 420, **extra: Any) -> go.Figure:
    extra.setdefault("margin", {"l": 70, "r": 30, "t": 60, "b": 60})
    figure.update_layout(title={"text": title, "x": 0.01, "xanchor": "left"}, template=TEMPLATE, height=height, **extra)
    # Powers of ten as 10^-4 on every axis: plotly's default mixes SI prefixes (100μ, 10k) with decimals (0.001).
    # (Not on the parallel coordinates, which have no such axes: an x-axis set there is drawn, empty.)
    if any(trace.type != "parcoords" for trace in figure.data):
        figure.update_xaxes(exponentformat="power")
        figure.update_yaxes(exponentformat="power")
    return figure


def _hover(frame: pd.DataFrame, experiment: Experiment) -> list[str]:
    """Hover text of each trial: number, outcome, score and sampled parameters."""
    texts = []
    for _, row in frame.iterrows():
        parts = [f"trial #{int(row['trial'])}: {row['group']}"]
        if pd.notna(row.get("objective")):
            parts.append(f"{experiment.objective} {row['objective']:.4f}")
        if row["outcome"] in ("collapsed", "diverged") and pd.notna(row.get("collapse_epoch")):
            parts.append(f"collapse from epoch {int(row['collapse_epoch'])}")
        elif row.get("would_stop"):
            parts.append(_would_stop_text(row))
        for name in experiment.distributions:
            value = row.get(f"param_{name}")
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                parts.append(f"{name} = {value:.4g}" if isinstance(value, (int, float)) else f"{name} = {value}")
        texts.append("<br>".join(parts))
    return texts


WOULD_STOP_NAME = "the collapse rule would have stopped it"


def _would_stop_rings(would: pd.DataFrame, x: pd.Series, y: pd.Series, experiment: Experiment, size: int) -> go.Scatter:
    """Red rings around the complete trials the collapse rule would have stopped (a search without collapse
    stopping), drawn over their markers."""
    return go.Scatter(x=x, y=y, mode="markers", name=WOULD_STOP_NAME,
                      marker={"symbol": "circle-open", "size": size, "color": "#b00020", "line": {"width": 2}},
                      text=_hover(would, experiment), hoverinfo="text")


def _would_stop_text(row) -> str:
    """A trial the collapse rule would have stopped (collapse stopping off), in words."""
    text = "the collapse rule would have stopped it"
    if pd.notna(row.get("would_stop_epoch")):
        text += f" at epoch {int(row['would_stop_epoch'])}"
    kind = row.get("collapse_type") or "unknown"
    if pd.notna(row.get("collapse_epoch")):
        return f"{text} ({kind} collapse from epoch {int(row['collapse_epoch'])})"
    return f"{text} ({kind} collapse)"


def _groups_present(frame: pd.DataFrame) -> list[str]:
    order = list(_GROUP_COLOURS)
    return sorted(set(frame["group"]), key=lambda g: (order.index(g) if g in order else len(order), g))


# ----------------------------------------------------------------------------------------------
# Summary


def outcome_figure(analysis: ExperimentAnalysis) -> ReportFigure:
    experiment = analysis.experiment
    counts = analysis.counts
    compute = analysis.compute
    figure = make_subplots(rows=1, cols=2, column_widths=[0.5, 0.5], horizontal_spacing=0.18,
                           subplot_titles=("trials by outcome", "compute: trial-epochs run and saved"))
    groups = list(counts)
    figure.add_trace(go.Bar(
        y=groups, x=[counts[g] for g in groups], orientation="h", marker_color=[group_colour(g) for g in groups],
        text=[str(counts[g]) for g in groups], textposition="auto", showlegend=False,
        hovertemplate="%{y}: %{x} trials<extra></extra>",
    ), row=1, col=1)
    frame = experiment.trials
    outcomes = [o for o in ("complete", "collapsed", "diverged", "stopped", "failed", "running")
                if (frame["outcome"] == o).any()]
    run = [float(frame.loc[frame["outcome"] == o, "epochs_run"].fillna(0).sum()) for o in outcomes]
    saved = [float(compute["epochs_saved"].get(o, 0.0)) for o in outcomes]
    # Grey, not the blue of "complete" on the left (the bars are by outcome either way).
    figure.add_trace(go.Bar(y=outcomes, x=run, orientation="h", name="run", marker_color="#8c96a3",
                            hovertemplate="%{y}: %{x:.1f} trial-epochs run<extra></extra>"), row=1, col=2)
    if any(saved):  # (no legend entry for a part that no bar has)
        figure.add_trace(go.Bar(y=outcomes, x=saved, orientation="h", name="not run: the trial ended early",
                                marker_color="#2ca02c",
                                hovertemplate="%{y}: %{x:.1f} trial-epochs saved<extra></extra>"), row=1, col=2)
    figure.update_layout(barmode="stack")
    figure.update_xaxes(title_text="trials (count)", row=1, col=1)
    figure.update_xaxes(title_text=f"trial-epochs (epochs of {experiment.settings.get('steps_per_epoch', '?')} steps)",
                        row=1, col=2)
    figure.update_yaxes(title_text="outcome", autorange="reversed", row=1, col=1)
    figure.update_yaxes(title_text="outcome", autorange="reversed", row=1, col=2)
    title = f"{_label(analysis)}: outcomes of {len(frame)} trials and the compute they used"
    _layout(figure, title, height=max(300, 60 + 36 * max(len(groups), len(outcomes))),
            legend={"orientation": "h", "y": -0.25})
    saved_total = compute["epochs_saved_total"]
    caption = (f"Left: how the trials ended (collapsed ones by type). Right: the trial-epochs each outcome ran, and "
               f"in green the {saved_total:.1f} trial-epochs ({100 * compute['saved_fraction']:.0f} %) not run because "
               f"a trial ended early: {_saved_split(compute)}." if any(saved) else
               "Left: how the trials ended (collapsed ones by type). Right: the trial-epochs each outcome ran; no trial "
               "ended early, so none was saved.")
    # A search without collapse stopping: what stopping would have saved, which no bar shows (its trials ran on).
    would = frame[frame["would_stop"] & (frame["outcome"] == "complete")]
    if len(would):
        spared = float((would["epochs_run"] - pd.to_numeric(would["would_stop_epoch"], errors="coerce"))
                       .clip(lower=0).fillna(0).sum())
        total = float(frame["epochs_run"].fillna(0).sum())
        caption += (f" Collapse stopping was off: the collapse rule would have stopped {len(would)} of the complete "
                    f"trials, and not run {spared:.1f} of the {total:.1f} trial-epochs run "
                    f"({100 * spared / total if total else 0:.0f} %).")
    return ReportFigure(f"{_key(analysis)}-outcomes", _label(analysis), title, caption, figure)


def _saved_split(compute: dict[str, Any]) -> str:
    """The saved trial-epochs by what ended the trials: the collapse rule or the scheduler."""
    return (f"{compute['epochs_saved_by_collapse_stopping']:.1f} by collapse stopping (collapsed and diverged trials), "
            f"{compute['epochs_saved_by_scheduler']:.1f} by the scheduler (ASHA's stopped trials)")


def batch_text(experiment: Experiment) -> str:
    """The trials' batch size: the search's setting, or, where the space samples it (contrastive,
    Barlow Twins), the values it samples from and those the trials used (the setting is not used then)."""
    from analysis.sensitivity import _describe_range

    distribution = experiment.distributions.get("batch_size")
    if distribution is None:
        return f"batch {experiment.settings.get('batch_size', '?')}"
    used = {trial.params["batch_size"] for trial in experiment.study.get_trials(deepcopy=False)
            if "batch_size" in trial.params}
    text = f"batch sampled from {_describe_range(distribution)}"
    if used:
        order = list(getattr(distribution, "choices", ()))
        used_in_order = sorted(used, key=lambda v: (order.index(v), 0) if v in order else (len(order), v))
        text += f" (used: {', '.join(_format_value(v) for v in used_in_order)})"
    return text


def summary_html(analysis: ExperimentAnalysis) -> str:
    from analysis.sensitivity import BEST_NONE_LIMIT, _would_stop_text

    experiment = analysis.experiment
    settings = experiment.settings
    rows = [
        ("method", experiment.method),
        ("folder", str(experiment.folder)),
        ("objective (maximised)", experiment.objective_label),
        ("trials", f"{len(experiment.trials)} of {experiment.trials_requested} requested"
         + (" (still running or interrupted)" if experiment.running else "")),
        ("per trial", f"up to {experiment.max_epochs} epochs x {settings.get('steps_per_epoch', '?')} steps, "
         f"{batch_text(experiment)}, preset {settings.get('preset', '?')}, data {settings.get('data', '?')}"),
        ("collapse stopping", (f"after {settings.get('patience_epochs')} collapsed epoch(s) past a grace of "
                               f"{settings.get('grace_epochs')}") if settings.get("collapse_stop", True) else "off"),
        ("sampler", f"random, seed {settings.get('seed', '?')}: each trial drawn on its own, every parameter "
         "uniformly on its sampling scale" if experiment.sampler == "random" else
         f"TPE, seed {settings.get('seed', '?')}: {_tpe_text(experiment)}"),
    ]
    counts = ", ".join(f"{count} {name}" for name, count in analysis.counts.items())
    rows.append(("outcomes", counts))
    rate = analysis.collapse_rate
    if rate["rate"] is not None:
        text = (f"{100 * rate['rate']:.0f} % of {rate['finished']} finished trials {rate['counted']} "
                f"(95 % Wilson interval {100 * rate['low']:.0f}-{100 * rate['high']:.0f} %)")
        if rate["would_have_been_stopped"] or not experiment.collapse_stop:
            text += (f": {rate['stopped']} stopped by the rule or diverged, {rate['would_have_been_stopped']} that the "
                     "rule would have stopped (they ran on without it)")
        if not rate["rule_could_fire"]:
            text += "; not a collapse rate: the rule's grace and patience exceed the trials' epochs (see the note)"
        rows.append(("collapse rate", text))
    best = analysis.best
    if best:
        params = ", ".join(f"{k} = {_format_value(v)}" for k, v in best["params"].items())
        rows.append(("best trial", f"#{best['trial']}: {experiment.objective} {best['value']:.4f}"
                                   f"{_would_stop_text(best)}"))
        rows.append(("best parameters", params))
        if best["derived_params"]:
            rows.append(("derived (as trained)", ", ".join(f"{k} = {_format_value(v)}"
                                                           for k, v in best["derived_params"].items())))
        sensitivity = analysis.sensitivity
        if sensitivity.get("best_low") is not None:
            none_share = sensitivity.get("best_none_share") or 0.0
            unscored = (f"; in {100 * none_share:.0f} % of the resamples no trial has a score, and the range is of "
                        "the others" if none_share >= BEST_NONE_LIMIT else "")
            rows.append(("best score, range", f"{sensitivity['best_low']:.4f}-{sensitivity['best_high']:.4f} "
                                              f"({sensitivity['best_interval']}{unscored})"))
    else:
        rows.append(("best trial", "no trial completed: there is no score to report"))
    untrained = experiment.untrained_value
    if untrained is not None:
        verdict = ""
        if best and experiment.objective == "rankme":  # label-free: an untrained backbone can spread widest
            verdict = " - a reference, not a bar: training often lowers the rank an untrained backbone starts at"
        elif best:
            verdict = (" (the best trial clears it by {:.4f})".format(best["value"] - untrained) if best["value"] > untrained
                       else " - no trial beat it: the runs are too short or the settings do not help the probe yet")
        initial = experiment.untrained_value_initial_bn
        # Searches before the calibrated reference stored only the initial-statistics score.
        how = ("BatchNorm statistics from the training tracks; {:.4f} with its initial ones".format(initial)
               if initial is not None else "initial BatchNorm statistics")
        rows.append(("untrained backbone", f"{experiment.objective} {untrained:.4f} ({how}){verdict}"))
    compute = analysis.compute
    spent = (f"{compute['trial_epochs_run']:.1f} trial-epochs of {compute['trial_epochs_of_started_trials']} "
             "for the trials started")
    if compute["trial_seconds"]:
        spent += f", {compute['trial_seconds'] / 60:.1f} trial-minutes"
    rows.append(("compute spent", spent))
    would_run = compute["trial_epochs_run"] + compute["epochs_saved_total"]
    saved_text = (f"{compute['epochs_saved_total']:.1f} trial-epochs ({100 * compute['saved_fraction']:.0f} % of the "
                  f"{would_run:.1f} the trials would have run without early stopping; a failed trial's unrun epochs "
                  f"are not counted): {_saved_split(compute)}")
    if compute["seconds_saved_estimate"]:
        saved_text += (f"; about {compute['seconds_saved_estimate'] / 60:.1f} trial-minutes at a median "
                       f"{compute['seconds_per_epoch']:.1f} s per epoch (from {compute['seconds_per_epoch_from']})")
    rows.append(("not run: trials ended early", saved_text))
    table = "".join(f"<tr><th class='text'>{html.escape(k)}</th><td class='text'>{html.escape(str(v))}</td></tr>"
                    for k, v in rows)
    notes = "".join(f"<p class='note'>{html.escape(note)}</p>" for note in analysis.notes)
    return f"{notes}<table>{table}</table>"


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# ----------------------------------------------------------------------------------------------
# Importances


def importance_figure(analysis: ExperimentAnalysis) -> ReportFigure | None:
    from analysis.sensitivity import EVALUATORS

    experiment = analysis.experiment
    targets = ("objective", "collapse")
    if not any(i.values for i in analysis.importances):
        return None
    names = analysis.ranked_parameters()
    figure = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.04, subplot_titles=(
        f"for the objective ({experiment.objective})", "for collapse (collapsed vs not)"))
    colours = {"PED-ANOVA": "#1f77b4", "fANOVA": "#ff7f0e"}
    shown: set[str] = set()
    blank: list[str] = []
    for column, target in enumerate(targets, start=1):
        importances = {evaluator: analysis.importance(target, evaluator) for evaluator in EVALUATORS}
        drawn = {evaluator: i for evaluator, i in importances.items() if i is not None and i.values}
        if not drawn:  # said in the panel too, so that a PNG of the figure is not a blank half
            notes = [i.note for i in importances.values() if i is not None and i.note]
            reason = notes[0] if notes else "no trials to compute it on"
            suffix = "" if column == 1 else str(column)
            figure.add_annotation(
                text="<br>".join(textwrap.wrap(f"not computed: {reason}", 45)), showarrow=False,
                xref=f"x{suffix} domain", yref=f"y{suffix} domain", x=0.5, y=0.5, font={"color": "#555555"},
            )
            blank.append("left" if column == 1 else "right")
            # plotly.js draws no axes for a panel without a trace: its note then fell on the other panel, and with
            # the left one empty the parameter names (on the shared y axis) were gone. An invisible bar keeps both.
            figure.add_trace(go.Bar(y=names, x=[0] * len(names), orientation="h", marker_color="rgba(0,0,0,0)",
                                    showlegend=False, hoverinfo="skip"), row=1, col=column)
        for evaluator, importance in drawn.items():
            figure.add_trace(go.Bar(
                y=names, x=[importance.values.get(n) for n in names], orientation="h", name=evaluator,
                legendgroup=evaluator, showlegend=evaluator not in shown,
                marker_color=colours[evaluator],
                hovertemplate=f"{evaluator}, {target}<br>%{{y}}: %{{x:.3f}}<extra></extra>",
            ), row=1, col=column)
            shown.add(evaluator)
        figure.update_xaxes(title_text="importance (share of the total, 0-1)", range=[0, 1], row=1, col=column)
    figure.update_yaxes(autorange="reversed", title_text="sampled parameter", row=1, col=1)
    figure.update_yaxes(autorange="reversed", title_text="sampled parameter", row=1, col=2)
    title = f"{_label(analysis)}: which parameters decide the score, and which decide collapse"
    _layout(figure, title, height=max(320, 120 + 40 * len(names)), barmode="group",
            legend={"orientation": "h", "y": -0.2})
    caption = ("Longer bar = the parameter explains more of the target (in a panel, each evaluator's bars, fANOVA's or "
               "PED-ANOVA's, sum to 1). Left: the score among complete trials. "
               f"Right: {experiment.collapsed_wording} or not, over all finished trials, so collapsed trials count.")
    for target, side in (("objective", "Left"), ("collapse", "Right")):
        first, others = (analysis.sensitivity.get(f"most_important_for_{target}"),
                         analysis.sensitivity.get(f"most_important_for_{target}_otherwise"))
        if first and others:
            by = analysis.sensitivity[f"most_important_for_{target}_by"]
            named = ", ".join(f"{evaluator} {name}" for evaluator, name in others.items())
            trials = next(i.trials for i in analysis.importances if i.target == target and i.evaluator == by)
            caption += (f" {side}, the evaluators put different parameters first ({by} {first}, "
                        f"{named}): on these {trials} trials the ranking is not settled.")
    if blank:
        caption += f" The {' and '.join(blank)} panel says why it has no bars."
    return ReportFigure(f"{_key(analysis)}-importance", _label(analysis), title, caption, figure)


def importance_html(analysis: ExperimentAnalysis) -> str:
    """The importances as a table and the notes on methods (or why there are none)."""
    from analysis.sensitivity import EVALUATORS

    lines = []
    for target in ("objective", "collapse"):
        for evaluator in EVALUATORS:
            importance = analysis.importance(target, evaluator)
            if importance is None:
                continue
            if importance.values is None:
                lines.append(f"<li>{target}, {evaluator}: <b>not computed</b>: {html.escape(importance.note)}</li>")
            else:
                ranked = ", ".join(f"{html.escape(k)} {v:.2f}" for k, v in importance.values.items())
                detail = f" ({html.escape(importance.note)})" if importance.note else ""
                lines.append(f"<li>{target}, {evaluator} on {importance.trials} trials{detail}: {ranked}</li>")
    methods = ("<p class='muted'>Methods: PED-ANOVA (Optuna's PedAnovaImportanceEvaluator: how differently the best "
               "trials are distributed from all trials, per parameter) and fANOVA (FanovaImportanceEvaluator, seed 0: "
               "the share of the target's variance a random forest attributes to each parameter). Importances are "
               "computed on the sampled parameters, on the scale they were sampled (log for log-scale parameters), and "
               "normalised to sum to 1. For collapse, an in-memory copy of the study holds every finished trial as "
               f"complete with value 1 ({html.escape(analysis.experiment.collapsed_wording)}) or 0.</p>")
    return f"<ul>{''.join(lines)}</ul>{methods}"


# ----------------------------------------------------------------------------------------------
# Per parameter


def _bin_edges(values: np.ndarray, distribution, bins: int) -> np.ndarray:
    """Equal-width bins over the search range on its sampling scale, plus one bin on each side for
    values outside it (enqueued points)."""
    low, high = float(distribution.low), float(distribution.high)
    if _is_log(distribution) and low > 0:
        edges = np.logspace(math.log10(low), math.log10(high), bins + 1)
    else:
        edges = np.linspace(low, high, bins + 1)
    if np.nanmin(values) < low:
        edges = np.concatenate([[np.nanmin(values)], edges])
    if np.nanmax(values) > high:
        edges = np.concatenate([edges, [np.nanmax(values)]])
    return edges


def collapse_rate_bins(values: Sequence[Any], collapsed: Sequence[bool], distribution) -> pd.DataFrame:
    """Collapse rate per bin of a parameter's range (equal width on its sampling scale; one bin per
    choice for a categorical one), with counts and a 95 % Wilson interval."""
    from analysis.sensitivity import wilson_interval

    collapsed = np.asarray(collapsed, dtype=bool)
    rows = []
    if _is_categorical(distribution):
        values = np.asarray(values, dtype=object)
        for choice in distribution.choices:
            mask = values == choice
            rows.append({"centre": choice, "low": choice, "high": choice, "n": int(mask.sum()),
                         "collapsed": int(collapsed[mask].sum())})
    else:
        values = np.asarray(values, dtype=float)
        count = len(values)
        edges = _bin_edges(values, distribution, int(min(8, max(2, count // 6))))
        bins = len(edges) - 1
        index = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, bins - 1)
        for number in range(bins):
            mask = index == number
            low, high = edges[number], edges[number + 1]
            centre = math.sqrt(low * high) if _is_log(distribution) and low > 0 else (low + high) / 2
            rows.append({"centre": centre, "low": low, "high": high, "n": int(mask.sum()),
                         "collapsed": int(collapsed[mask].sum())})
    frame = pd.DataFrame(rows)
    frame["rate"] = np.where(frame["n"] > 0, frame["collapsed"] / frame["n"].clip(lower=1), np.nan)
    intervals = [wilson_interval(c, n) for c, n in zip(frame["collapsed"], frame["n"])]
    frame["rate_low"] = [i[0] for i in intervals]
    frame["rate_high"] = [i[1] for i in intervals]
    return frame


def parameter_figure(analysis: ExperimentAnalysis, name: str) -> ReportFigure:
    from analysis.sensitivity import FINISHED_OUTCOMES

    experiment = analysis.experiment
    distribution = experiment.distributions[name]
    frame = experiment.trials
    column = f"param_{name}"
    frame = frame[frame[column].notna()] if column in frame else frame.iloc[0:0]
    scored = frame[(frame["outcome"] == "complete") & frame["objective"].notna()]
    unscored = frame[~frame.index.isin(scored.index)]
    # A row for the trials without a score only where there are some: an empty row of shared x-axes would
    # take the axis's ticks and title with it (plotly draws no axis for a subplot without points).
    # And no score row where no trial has a score.
    score_row = 1 if len(scored) else None
    unscored_row = ((2 if score_row else 1) if len(unscored) else None)
    rate_row = (unscored_row or score_row or 0) + 1
    heights = {(True, True): [0.55, 0.2, 0.25], (True, False): [0.68, 0.32], (False, True): [0.45, 0.55],
               (False, False): [1.0]}[bool(score_row), bool(unscored_row)]
    figure = make_subplots(rows=rate_row, cols=1, shared_xaxes=True, vertical_spacing=0.06, row_heights=heights)
    if len(scored):
        figure.add_trace(go.Scatter(
            x=scored[column], y=scored["objective"], mode="markers", name="complete",
            marker={"color": group_colour("complete"), "size": 9, "line": {"width": 0.5, "color": "white"}},
            text=_hover(scored, experiment), hoverinfo="text", legendgroup="complete",
        ), row=1, col=1)
    would = scored[scored["would_stop"]]
    if len(would):
        figure.add_trace(_would_stop_rings(would, would[column], would["objective"], experiment, 17), row=1, col=1)
    if analysis.best and score_row:
        best = frame[frame["trial"] == analysis.best["trial"]]
        figure.add_trace(go.Scatter(x=best[column], y=best["objective"], mode="markers", name="best trial",
                                    marker={"symbol": "star", "size": 16, "color": "gold",
                                            "line": {"width": 1, "color": "black"}},
                                    hoverinfo="skip"), row=1, col=1)
    for group in _groups_present(unscored):
        rows = unscored[unscored["group"] == group]
        figure.add_trace(go.Scatter(
            x=rows[column], y=[group] * len(rows), mode="markers", name=group, legendgroup=group,
            marker={"color": group_colour(group), "symbol": _group_symbol(group), "size": 10,
                    "line": {"width": 2, "color": group_colour(group)}},
            text=_hover(rows, experiment), hoverinfo="text",
        ), row=unscored_row, col=1)
    finished = frame[frame["outcome"].isin(FINISHED_OUTCOMES)]
    if len(finished):
        bins = collapse_rate_bins(finished[column].to_numpy(), finished["collapsed"].to_numpy(), distribution)
        bins = bins[bins["n"] > 0]
        categorical = _is_categorical(distribution)
        figure.add_trace(go.Scatter(
            x=bins["centre"], y=bins["rate"], mode="markers+lines", name="collapse rate per bin",
            line={"color": "#d62728", "dash": "dot"}, marker={"color": "#d62728", "size": 9},
            error_y={"type": "data", "symmetric": False, "array": bins["rate_high"] - bins["rate"],
                     "arrayminus": bins["rate"] - bins["rate_low"], "color": "#d62728", "thickness": 1},
            error_x=None if categorical else {"type": "data", "symmetric": False, "array": bins["high"] - bins["centre"],
                                              "arrayminus": bins["centre"] - bins["low"], "color": "#e8a0a0",
                                              "thickness": 1, "width": 0},
            customdata=np.stack([bins["collapsed"], bins["n"]], axis=1),
            hovertemplate=(f"%{{customdata[0]}} of %{{customdata[1]}} finished trials {experiment.collapsed_wording}"
                           "<extra></extra>"),
        ), row=rate_row, col=1)
    axis_type = "log" if _is_log(distribution) else ("category" if _is_categorical(distribution) else "linear")
    # A categorical parameter's choices in the space's order, on all three rows (plotly orders categories
    # as the traces first meet them, and the rate's line would then double back).
    order = ({"categoryorder": "array", "categoryarray": list(distribution.choices)}
             if _is_categorical(distribution) else {})
    for row in range(1, rate_row + 1):
        figure.update_xaxes(type=axis_type, row=row, col=1, **order)
    if not _is_categorical(distribution) and len(frame):
        # The whole searched range, so that where the trials fell within it shows.
        values = pd.to_numeric(frame[column], errors="coerce")
        low, high = min(float(distribution.low), values.min()), max(float(distribution.high), values.max())
        if axis_type == "log" and low > 0:
            pad = 0.03 * (math.log10(high) - math.log10(low))
            figure.update_xaxes(range=[math.log10(low) - pad, math.log10(high) + pad], **log_ticks(low, high))
        else:
            pad = 0.03 * (high - low)
            figure.update_xaxes(range=[low - pad, high + pad])
    figure.update_xaxes(title_text=parameter_label(name, distribution), row=rate_row, col=1)
    if score_row:
        figure.update_yaxes(title_text=experiment.objective_label.split(" (")[0] + " (score)", row=score_row, col=1)
    if unscored_row:
        figure.update_yaxes(title_text="no score", type="category", row=unscored_row, col=1)
    figure.update_yaxes(title_text="collapse rate (0-1)", range=[-0.05, 1.05], row=rate_row, col=1)
    title = f"{_label(analysis)}: {name} against the score and against collapse"
    _layout(figure, title, height=620 if score_row else 460, legend={"orientation": "h", "y": -0.15})
    ringed = "; red rings: trials the collapse rule would have stopped" if len(would) else ""
    if score_row:
        top = f"Top: the score of each complete trial at its {name} (star: the best{ringed}). "
        middle = ("Middle: trials without a score (collapsed by type, diverged, failed). " if len(unscored) else
                  "Every trial has a score. ")
    else:
        top, middle = "No trial has a score. Top: the trials by how they ended (collapsed by type, diverged, failed). ", ""
    caption = (f"{top}{middle}"
               f"Bottom: share of finished trials {experiment.collapsed_wording} "
               f"per bin of {name}, with 95 % Wilson intervals; a rising red line marks the side of the range to avoid.")
    return ReportFigure(f"{_key(analysis)}-param-{name}", _label(analysis), title, caption, figure)


# ----------------------------------------------------------------------------------------------
# Two-parameter maps


def log_ticks(low: float, high: float) -> dict[str, list]:
    """Ticks for a log axis from ``low`` to ``high`` (> 0), each labelled with its value: 1, 2 and 5 times the
    powers of ten inside it (the powers alone over more than about three decades; every digit over less than one).
    plotly's own write the digits of a short range without their power: 10 to 80 read "10, 2, ... 8"."""
    if not 0 < low <= high:
        return {}
    first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))

    def within(multipliers: Sequence[int]) -> list[float]:
        return [float(f"{m * 10.0 ** k:.12g}") for k in range(first, last + 1) for m in multipliers
                if low * (1 - 1e-9) <= m * 10.0 ** k <= high * (1 + 1e-9)]

    values = within((1, 2, 5))
    if len(values) > 10:
        values = within((1,))
    elif len(values) < 3:
        values = within(range(1, 10))
    return {"tickvals": values, "ticktext": [f"{value:g}" for value in values]}


def map_pairs(analysis: ExperimentAnalysis, limit: int = 3) -> list[tuple[str, str]]:
    """The method's preferred pair (e.g. VICReg variance vs covariance weight) first, then the
    pairs of the most important numerical parameters."""
    from analysis.sensitivity import PREFERRED_PAIRS

    experiment = analysis.experiment
    numeric = [n for n in analysis.ranked_parameters() if not _is_categorical(experiment.distributions[n])]
    pairs: list[tuple[str, str]] = []
    preferred = PREFERRED_PAIRS.get(experiment.method)
    if preferred and all(n in numeric for n in preferred):
        pairs.append(preferred)
    top = numeric[:3]
    for i, first in enumerate(top):
        for second in top[i + 1:]:
            if (first, second) not in pairs and (second, first) not in pairs:
                pairs.append((first, second))
    return pairs[:limit]


def _normalised(values: np.ndarray, distribution) -> np.ndarray:
    low, high = float(distribution.low), float(distribution.high)
    values = np.asarray(values, dtype=float)
    if _is_log(distribution) and low > 0:
        values, low, high = np.log10(np.clip(values, 1e-300, None)), math.log10(low), math.log10(high)
    return (values - low) / (high - low) if high > low else np.zeros_like(values)


def _denormalised(grid: np.ndarray, distribution) -> np.ndarray:
    low, high = float(distribution.low), float(distribution.high)
    if _is_log(distribution) and low > 0:
        return 10 ** (math.log10(low) + grid * (math.log10(high) - math.log10(low)))
    return low + grid * (high - low)


def collapse_probability_grid(x: np.ndarray, y: np.ndarray, collapsed: np.ndarray, x_distribution, y_distribution,
                              bandwidth: float = _KERNEL_BANDWIDTH, size: int = _MAP_GRID):
    """Kernel-smoothed (Nadaraya-Watson, Gaussian) collapse probability over a grid of two
    parameters on their sampling scales; NaN where less than half a trial's weight is near, so the
    map does not extrapolate into unexplored corners. Returns (grid x, grid y, probability[y, x])."""
    u, v = _normalised(x, x_distribution), _normalised(y, y_distribution)
    grid = np.linspace(0.0, 1.0, size)
    gu, gv = np.meshgrid(grid, grid)
    distance = (gu[..., None] - u) ** 2 + (gv[..., None] - v) ** 2
    weights = np.exp(-distance / (2 * bandwidth**2))
    total = weights.sum(axis=-1)
    probability = (weights * np.asarray(collapsed, dtype=float)).sum(axis=-1) / np.where(total > 0, total, 1)
    probability[total < 0.5] = np.nan
    return _denormalised(grid, x_distribution), _denormalised(grid, y_distribution), probability


def map_figure(analysis: ExperimentAnalysis, pair: tuple[str, str]) -> ReportFigure:
    from analysis.sensitivity import FINISHED_OUTCOMES

    experiment = analysis.experiment
    x_name, y_name = pair
    x_distribution, y_distribution = experiment.distributions[x_name], experiment.distributions[y_name]
    frame = experiment.trials
    frame = frame[frame[f"param_{x_name}"].notna() & frame[f"param_{y_name}"].notna()]
    finished = frame[frame["outcome"].isin(FINISHED_OUTCOMES)]
    collapsed = finished["collapsed"].to_numpy()
    figure = go.Figure()
    shaded = len(finished) >= 3 and 0 < collapsed.sum()
    if not collapsed.sum():
        boundary = f"no finished trial {experiment.collapsed_wording}, so there is no collapse probability to shade"
    else:
        boundary = f"{len(finished)} finished trial(s) are too few to estimate a collapse probability from"
    if shaded:
        gx, gy, probability = collapse_probability_grid(
            finished[f"param_{x_name}"].to_numpy(float), finished[f"param_{y_name}"].to_numpy(float), collapsed,
            x_distribution, y_distribution)
        figure.add_trace(go.Contour(
            x=gx, y=gy, z=probability, zmin=0, zmax=1, name="collapse probability", opacity=0.6,
            # green, amber, red strong enough to tell p = 0.3 from 0.7 under the trials' markers
            colorscale=[[0, "#a5d6a7"], [0.5, "#ffe082"], [1, "#ef9a9a"]], contours={"start": 0, "end": 1, "size": 0.1},
            line={"width": 0}, connectgaps=False, hovertemplate="estimated collapse probability %{z:.2f}<extra></extra>",
            colorbar={"title": {"text": "collapse<br>probability (0-1)"}, "x": 1.02, "len": 0.45, "y": 0.25},
        ))
        if np.nanmax(probability) >= 0.5 and np.nanmin(probability) <= 0.5:
            figure.add_trace(go.Contour(
                x=gx, y=gy, z=probability, name="collapse boundary (p = 0.5)", showscale=False, showlegend=True,
                contours={"start": 0.5, "end": 0.5, "size": 1, "coloring": "lines", "showlabels": False},
                colorscale=[[0, "#b00020"], [1, "#b00020"]], line={"width": 3, "dash": "dash"}, hoverinfo="skip",
            ))
            boundary = "the dashed red line is where the estimated collapse probability crosses one half"
        else:
            boundary = "the estimated collapse probability never crosses one half here, so no boundary line is drawn"
    scored = frame[(frame["outcome"] == "complete") & frame["objective"].notna()]
    if len(scored):
        figure.add_trace(go.Scatter(
            x=scored[f"param_{x_name}"], y=scored[f"param_{y_name}"], mode="markers", name="complete (colour: score)",
            marker={"color": scored["objective"], "colorscale": "Viridis", "size": 11, "line": {"width": 1, "color": "black"},
                    "colorbar": {"title": {"text": OBJECTIVE_TITLE.get(experiment.objective, experiment.objective)
                                                   .split(" (")[0] + "<br>(score)"},
                                 "x": 1.02, "len": 0.45, "y": 0.78}},
            text=_hover(scored, experiment), hoverinfo="text",
        ))
    would = scored[scored["would_stop"]]
    if len(would):
        figure.add_trace(_would_stop_rings(would, would[f"param_{x_name}"], would[f"param_{y_name}"], experiment, 19))
    others = frame[~frame.index.isin(scored.index)]
    for group in _groups_present(others):
        rows = others[others["group"] == group]
        figure.add_trace(go.Scatter(
            x=rows[f"param_{x_name}"], y=rows[f"param_{y_name}"], mode="markers", name=group,
            marker={"color": group_colour(group), "symbol": _group_symbol(group), "size": 11,
                    "line": {"width": 2, "color": group_colour(group)}},
            text=_hover(rows, experiment), hoverinfo="text",
        ))
    for update, name, distribution in ((figure.update_xaxes, x_name, x_distribution),
                                       (figure.update_yaxes, y_name, y_distribution)):
        log = _is_log(distribution)
        values = pd.to_numeric(frame[f"param_{name}"], errors="coerce").dropna()
        update(title_text=parameter_label(name, distribution), type="log" if log else "linear",
               **(log_ticks(min([float(distribution.low), *values]), max([float(distribution.high), *values]))
                  if log else {}))
    title = f"{_label(analysis)}: {y_name} against {x_name}, score and collapse"
    _layout(figure, title, height=560, legend={"orientation": "h", "y": -0.18})
    ringed = ", red rings the trials the collapse rule would have stopped" if len(would) else ""
    # Advice only where the map holds what it names: a low-probability (green) region, scored circles.
    green = shaded and bool(np.nanmin(probability) < 0.5)
    if not len(scored):
        advice = "No trial here has a score: the map shows only where trials collapsed or failed."
    elif green:
        advice = "Pick settings inside the green region near the brightest circles."
    else:
        advice = "Pick settings near the brightest circles."
    shading = (f"the shading is the kernel-smoothed probability that a trial {experiment.collapsed_wording} and "
               f"{boundary}. {advice}" if shaded else f"nothing is shaded: {boundary}. {advice}")
    caption = (f"Each trial at its ({x_name}, {y_name}): circles coloured by score, crosses collapsed, diamonds diverged"
               f"{ringed}; {shading}")
    return ReportFigure(f"{_key(analysis)}-map-{x_name}-{y_name}", _label(analysis), title, caption, figure)


# ----------------------------------------------------------------------------------------------
# Collapse dynamics


def dynamics_figure(analysis: ExperimentAnalysis) -> ReportFigure | None:
    from analysis.sensitivity import COLLAPSED_STOPPED, OCCUPANCY_METRIC, RANK_METRIC, flagged_verdicts, occupancy_metric

    experiment = analysis.experiment
    trajectories = experiment.trajectories
    if not trajectories:
        return None
    metrics = [(RANK_METRIC, "effective rank<br>(RankMe, dimensions, log)")]
    occupancy = occupancy_metric(experiment)
    if occupancy == OCCUPANCY_METRIC:  # what the collapse rule reads
        metrics.append((occupancy, "cluster occupancy<br>(used of min(probe segments, K), 0-1)"))
    elif occupancy is not None:  # a search from before it was logged
        metrics.append((occupancy, "cluster occupancy<br>(used of all K prototypes, 0-1)"))
    figure = make_subplots(rows=len(metrics), cols=1, shared_xaxes=True, vertical_spacing=0.08)
    frame = experiment.trials.set_index("trial")
    flagged = flagged_verdicts(frame)
    shown: set[str] = set()
    for number in sorted(trajectories):
        trajectory = trajectories[number]
        group = frame.loc[number, "group"] if number in frame.index else "running"
        row_info = frame.loc[number] if number in frame.index else None
        # A trial the collapse rule would have stopped (collapse stopping off) ended complete: it is drawn in its
        # collapse type's colour, dashed, so that the collapses of such a search show.
        would_stop = row_info is not None and bool(row_info["would_stop"])
        kind = (row_info["collapse_type"] if row_info is not None and isinstance(row_info["collapse_type"], str)
                else "unknown")
        # A complete trial whose last verdict was a collapse the rule did not stop it for: dash-dotted.
        verdict = flagged.get(number, "") if not would_stop else ""
        name = (f"would have been stopped: {kind}" if would_stop
                else f"{group}, flagged {verdict}" if verdict else group)
        colour = group_colour(f"collapsed: {kind}" if would_stop else group)
        for row, (metric, _) in enumerate(metrics, start=1):
            if metric not in trajectory:
                continue
            values = pd.to_numeric(trajectory[metric], errors="coerce")
            figure.add_trace(go.Scatter(
                x=trajectory["epoch"], y=values, mode="lines+markers", name=name, legendgroup=name,
                showlegend=name not in shown and row == 1,
                line={"color": colour, "width": 1.5, "dash": "dash" if would_stop else "dashdot" if verdict else "solid"},
                marker={"size": 5}, opacity=0.85,
                hovertemplate=f"trial #{number} ({name})<br>epoch %{{x}}: %{{y:.3g}}<extra></extra>",
            ), row=row, col=1)
            if row == 1:
                shown.add(name)
            collapsing = row_info is not None and bool(row_info["collapsed"])
            if collapsing and pd.notna(row_info["collapse_epoch"]):
                at = trajectory[trajectory["epoch"] == row_info["collapse_epoch"]]
                would = f"; {_would_stop_text(row_info)}" if row_info["would_stop"] else ""
                if len(at):
                    figure.add_trace(go.Scatter(
                        x=at["epoch"], y=pd.to_numeric(at[metric], errors="coerce"), mode="markers", showlegend=False,
                        marker={"symbol": "x", "size": 11, "color": colour}, legendgroup=name,
                        hovertemplate=f"trial #{number}: collapse begins, epoch %{{x}}{would}<extra></extra>",
                    ), row=row, col=1)
    lines = rule_lines(experiment, occupancy == OCCUPANCY_METRIC)
    epochs = [float(epoch) for trajectory in trajectories.values() for epoch in trajectory["epoch"]]
    if epochs:
        # Across the epochs the trials were to run (in a search whose trials all stopped at epoch 1, a line from
        # the first epoch reported to the last had no length).
        first, last = min(epochs), max(max(epochs), float(experiment.max_epochs))
        if last <= first:
            first, last = first - 0.5, last + 0.5
        for row, (metric, _) in enumerate(metrics, start=1):
            for value, text in lines.get(metric, []):
                figure.add_trace(go.Scatter(
                    x=[first, last], y=[value, value], mode="lines", name=text, showlegend=False,
                    line={"color": "#555", "width": 1, "dash": "dot"}, hovertemplate=f"{text}<extra></extra>",
                ), row=row, col=1)
                # Its words as an annotation on a pale box, which plotly draws above every trace: a trial's line
                # that crosses them no longer runs through them (a trace's text has no background). A log axis
                # places annotations by the logarithm of the value.
                figure.add_annotation(
                    x=last, y=math.log10(value) if row == 1 else value, text=text, showarrow=False,
                    xanchor="right", yanchor="bottom", font={"size": 10, "color": "#555"},
                    bgcolor="rgba(255, 255, 255, 0.8)", borderpad=1, row=row, col=1)
    figure.update_yaxes(type="log", title_text=metrics[0][1], row=1, col=1)
    if len(metrics) > 1:
        figure.update_yaxes(title_text=metrics[1][1], range=[0, 1.05], row=2, col=1)
    figure.update_xaxes(title_text=f"epoch (of {experiment.settings.get('steps_per_epoch', '?')} steps)",
                        row=len(metrics), col=1, dtick=1)
    title = f"{_label(analysis)}: collapse dynamics, one line per trial"
    _layout(figure, title, height=420 + 320 * (len(metrics) - 1), legend={"orientation": "h", "y": -0.12})
    what = "effective rank" + ((" and prototype occupancy (of min(probe segments, K), as the collapse rule reads it)"
                                if metrics[1][0] == OCCUPANCY_METRIC else " and prototype occupancy (of all K)")
                               if len(metrics) > 1 else "")
    marked = (" (in a trial that was stopped for it, or that the collapse rule would have stopped)"
              if experiment.collapsed_wording != COLLAPSED_STOPPED else "")
    dashed = ("; dashed, in the colour of its collapse type: a trial the collapse rule would have stopped"
              if any(name.startswith("would have been stopped") for name in shown) else "")
    if any(", flagged " in name for name in shown):
        dashed += ("; dash-dotted: a complete trial whose last epoch read a collapse the rule did not stop it for (a "
                   "type it does not stop on, or read within the grace period or for fewer epochs than the patience)")
    dotted = ("; dotted: the collapse rule's lines on these metrics (its other readings, such as the mean cosine "
              "and the assignments' entropy, are not drawn)"
              if any(lines.get(metric) for metric, _ in metrics) else "")
    caption = (f"The {what} of the validation embeddings at the end of each epoch, coloured by how the trial ended{dashed}; an x "
               f"marks the epoch where a collapse began{marked}{dotted}. Lines that sink early and stay low are collapses.")
    return ReportFigure(f"{_key(analysis)}-dynamics", _label(analysis), title, caption, figure)


# musicssl.collapse.CollapseThresholds' defaults for the rules the dynamics draw, written out so that the report
# does not import torch (a test checks they agree); a search's --threshold values replace them.
RULE_LINE_DEFAULTS = {"complete_max_effective_rank": 1.5, "dimensional_max_rank_fraction": 0.1,
                      "cluster_min_occupancy": 0.1}


def _attainable_rank(experiment: Experiment) -> int | None:
    """min(probe segments, embedding dimensions) as the trials' verdict took it: the embedding's RankMe over
    its share of that (both logged each epoch), or None where no trial logged them."""
    from analysis.sensitivity import RANK_METRIC

    for trajectory in experiment.trajectories.values():
        if RANK_METRIC in trajectory and f"{RANK_METRIC}_norm" in trajectory:
            rank = pd.to_numeric(trajectory[RANK_METRIC], errors="coerce")
            share = pd.to_numeric(trajectory[f"{RANK_METRIC}_norm"], errors="coerce")
            usable = (share > 0) & np.isfinite(rank) & np.isfinite(share)
            if usable.any():
                return int(round(float(rank[usable].iloc[0] / share[usable].iloc[0])))
    return None


def rule_lines(experiment: Experiment, attainable_occupancy: bool = True) -> dict[str, list[tuple[float, str]]]:
    """Where the search's collapse rule draws its lines on the metrics the dynamics plot, with their words:
    on the embedding's RankMe, complete collapse (below ``complete_max_effective_rank``) and dimensional
    collapse (below ``dimensional_max_rank_fraction`` of min(probe segments, embedding dimensions)); on the
    occupancy of min(probe segments, K) (``attainable_occupancy``), partial collapse. Each says whether it
    stops a trial. The search's ``--threshold`` values are used (none where they cannot be read); the dimensional
    line only where the trials logged min(probe segments, dimensions)."""
    from analysis.sensitivity import OCCUPANCY_METRIC, RANK_METRIC
    from hpsearch.settings import STOP_ON_BEFORE_SETTING

    overrides = experiment.settings.get("thresholds") or {}
    values = {name: overrides.get(name, default) for name, default in RULE_LINE_DEFAULTS.items()}
    if not all(isinstance(value, (int, float)) and math.isfinite(value) for value in values.values()):
        return {}  # a search.json written by hand
    stop_on = experiment.settings.get("stop_on")
    stop_on = STOP_ON_BEFORE_SETTING if stop_on is None else stop_on  # (an empty list: it stops on none)

    def stops(kind: str) -> str:
        if kind not in stop_on:
            return "recorded, not stopped"
        return "stops a trial" if experiment.collapse_stop else "would stop a trial"

    complete, fraction, occupancy = (values["complete_max_effective_rank"], values["dimensional_max_rank_fraction"],
                                     values["cluster_min_occupancy"])
    lines = {RANK_METRIC: [(complete, f"complete: rank < {complete:g} ({stops('complete')})")], OCCUPANCY_METRIC: []}
    attainable = _attainable_rank(experiment)  # (none where no trial logged it: no dimensional line)
    if attainable is not None:
        lines[RANK_METRIC].append((fraction * attainable, f"dimensional: rank < {fraction:g} x {attainable} = "
                                                          f"{fraction * attainable:g} ({stops('dimensional')})"))
    if attainable_occupancy:
        lines[OCCUPANCY_METRIC].append((occupancy, f"partial: occupancy < {occupancy:g} ({stops('partial')})"))
    # A rule turned off (a line at 0: nothing lies below it) draws no line.
    return {metric: [line for line in found if line[0] > 0] for metric, found in lines.items()}


def time_to_collapse_figure(analysis: ExperimentAnalysis) -> ReportFigure | None:
    experiment = analysis.experiment
    frame = experiment.trials
    collapsed = frame[frame["collapsed"] & frame["collapse_epoch"].notna()].copy()
    if collapsed.empty:
        return None
    # A trial the rule would have stopped is "complete" by outcome; here it counts by its collapse type.
    kinds = collapsed["collapse_type"].fillna("unknown")
    collapsed["bar"] = collapsed["group"].where(~collapsed["would_stop"], "would have been stopped: " + kinds)
    collapsed["colour"] = collapsed["group"].where(~collapsed["would_stop"], "collapsed: " + kinds)
    figure = go.Figure()
    epochs = list(range(1, experiment.max_epochs + 1))
    order = list(_GROUP_COLOURS)
    for bar in sorted(set(collapsed["bar"]), key=lambda b: (b.startswith("would"), order.index(b) if b in order else 0, b)):
        rows = collapsed[collapsed["bar"] == bar]
        counts = rows["collapse_epoch"].astype(int).value_counts()
        pattern = {"shape": "/"} if bar.startswith("would") else None
        figure.add_trace(go.Bar(x=epochs, y=[int(counts.get(e, 0)) for e in epochs], name=bar,
                                marker={"color": group_colour(rows["colour"].iloc[0]), "pattern": pattern},
                                hovertemplate=f"{bar}: %{{y}} trials from epoch %{{x}}<extra></extra>"))
    # the legend also for one kind (plotly hides a lone trace's): it names the collapse type, also in a PNG
    figure.update_layout(barmode="stack", showlegend=True)
    steps = experiment.settings.get("steps_per_epoch", "?")
    figure.update_xaxes(title_text=f"epoch where the collapse began (of {steps} steps)", dtick=1)
    figure.update_yaxes(title_text="trials (count)", tick0=0, dtick=max(1, math.ceil(len(collapsed) / 8)))
    median = analysis.time_to_collapse.get("median_collapse_epoch")
    title = f"{_label(analysis)}: time to collapse ({len(collapsed)} trials)"
    _layout(figure, title, height=360, legend={"orientation": "h", "y": -0.25})
    wording = experiment.collapsed_wording
    caption = (f"When each trial {wording} began to collapse (median epoch {median:g}); collapses that begin "
               "early cost little compute once stopped, late ones spend most of a run before they are caught."
               if median is not None else f"When each trial {wording} began to collapse.")
    return ReportFigure(f"{_key(analysis)}-time-to-collapse", _label(analysis), title, caption, figure)


# ----------------------------------------------------------------------------------------------
# Label-free vs labelled


def label_free_figure(analysis: ExperimentAnalysis) -> ReportFigure | None:
    from analysis.sensitivity import final_rank

    experiment = analysis.experiment
    if analysis.label_free is None:
        return None
    labelled = analysis.label_free_metric
    frame = experiment.trials.copy()
    frame["final_rank"] = final_rank(experiment)
    scored = frame[(frame["outcome"] == "complete") & frame[labelled].notna() & frame["final_rank"].notna()]
    others = frame[~frame.index.isin(scored.index) & frame["final_rank"].notna()]
    bottom = 2 if len(others) else 1  # no empty row: it would take the shared x-axis's ticks and title
    figure = make_subplots(rows=bottom, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                           row_heights=[0.78, 0.22] if len(others) else None)
    figure.add_trace(go.Scatter(
        x=scored["final_rank"], y=scored[labelled], mode="markers", name="complete",
        marker={"color": group_colour("complete"), "size": 10}, text=_hover(scored, experiment), hoverinfo="text",
    ), row=1, col=1)
    would = scored[scored["would_stop"]]
    if len(would):
        figure.add_trace(_would_stop_rings(would, would["final_rank"], would[labelled], experiment, 18), row=1, col=1)
    for group in _groups_present(others):
        rows = others[others["group"] == group]
        figure.add_trace(go.Scatter(
            x=rows["final_rank"], y=[group] * len(rows), mode="markers", name=group,
            marker={"color": group_colour(group), "symbol": _group_symbol(group), "size": 10,
                    "line": {"width": 2, "color": group_colour(group)}},
            text=_hover(rows, experiment), hoverinfo="text",
        ), row=2, col=1)
    correlation = analysis.label_free
    if math.isfinite(correlation.rho):
        interval = (f", 95 % interval {correlation.low:.2f} to {correlation.high:.2f}" if math.isfinite(correlation.low)
                    else ", too few trials for an interval")
        stat = f"Spearman rho = {correlation.rho:.2f}{interval} (n = {correlation.n})"
    else:
        stat = f"Spearman rho undefined (n = {correlation.n}: too few trials or a constant variable)"
    labelled_name = {"probe_map": "probe mAP (macro, valid split; 0-1)",
                     "probe_auc": "probe ROC-AUC (macro, valid split; 0-1)"}[labelled]
    figure.update_xaxes(title_text="final effective rank (RankMe of the embedding, dimensions, log scale)", type="log",
                        row=bottom, col=1)
    figure.update_xaxes(type="log", row=1, col=1)
    figure.update_yaxes(title_text=labelled_name, row=1, col=1)
    if len(others):
        figure.update_yaxes(title_text="not complete", type="category", row=2, col=1)
    title = f"{_label(analysis)}: does the label-free rank predict the probe? {stat}"
    # The statistic on a line of its own under the question: on one line it ran under the toolbar on a narrow page.
    _layout(figure, f"{_label(analysis)}: does the label-free rank predict the probe?<br><sup>{stat}</sup>", height=540,
            legend={"orientation": "h", "y": -0.2}, margin={"l": 70, "r": 30, "t": 80, "b": 60})
    caption = ("Each complete trial's final effective rank against its probe score"
               + (" (top)" if len(others) else "")
               + ("; red rings: trials the collapse rule would have stopped" if len(would) else "")
               + ("; the others sit below: collapsed and diverged trials get no probe, and a trial the scheduler "
                  "(ASHA) stopped has only the score of the epoch it was stopped at. " if len(others) else ". ")
               + ("A rho near 1 means the label-free rank can rank settings without labels; near 0 it cannot; below 0 "
                  "a higher rank goes with a lower score. Interval: Fisher z with the Bonett-Wright standard error."))
    return ReportFigure(f"{_key(analysis)}-label-free", _label(analysis), title, caption, figure)


# ----------------------------------------------------------------------------------------------
# Parallel coordinates and history


def parallel_figure(analysis: ExperimentAnalysis) -> ReportFigure | None:
    from optuna.distributions import IntDistribution

    experiment = analysis.experiment
    frame = experiment.trials
    names = analysis.ranked_parameters()
    if not names:
        return None
    groups = _groups_present(frame)
    codes = {group: index for index, group in enumerate(groups)}
    dimensions = []
    for name in names:
        distribution = experiment.distributions[name]
        column = f"param_{name}"
        values = frame[column] if column in frame else pd.Series(np.nan, index=frame.index)
        # A trial without the parameter (a conditional one, or a trial waiting to start) sits on a "not set"
        # tick below the range, not on its lowest value.
        unset = int(values.isna().any())  # 1 or 0: how many "not set" ticks
        if _is_categorical(distribution):
            choices = list(distribution.choices)
            dimensions.append({"label": name, "values": [choices.index(v) if v in choices else -1 for v in values],
                               "tickvals": [-1] * unset + list(range(len(choices))),
                               "ticktext": ["not set"] * unset + [str(c) for c in choices]})
        else:
            log = _is_log(distribution)
            numbers = pd.to_numeric(values, errors="coerce")
            if log:
                numbers = np.log10(numbers.clip(lower=1e-300))
            # The axis spans the searched range (and any enqueued point outside it).
            low, high = ((math.log10(distribution.low), math.log10(distribution.high)) if log
                         else (float(distribution.low), float(distribution.high)))
            if numbers.notna().any():
                low, high = min(low, float(numbers.min())), max(high, float(numbers.max()))
            floor = low - 0.15 * (high - low if high > low else 1.0)
            dimension = {"label": f"{name} (log)" if log else name, "values": numbers.fillna(floor if unset else low),
                         "range": [floor if unset else low, high]}
            # Ticks of its own on every axis (with plotly's, it wrote the range's ends again above and below).
            if log:  # the powers of ten inside the range, and its ends where they are not near one
                decades = [float(t) for t in np.arange(math.ceil(low), math.floor(high) + 1)]
                ends = [t for t in (low, high) if all(abs(t - decade) > 0.25 for decade in decades)]
                ticks = sorted(decades + ends)
                integer = isinstance(distribution, IntDistribution)
                text = [f"{10.0 ** t:g}" if t in decades else (f"{round(10.0 ** t)}" if integer else f"{10.0 ** t:.3g}")
                        for t in ticks]
            else:
                ticks = list(np.linspace(low, high, 5))
                if isinstance(distribution, IntDistribution):  # 64-1024: 304, not 3.04e+02
                    ticks = sorted({round(t) for t in ticks})
                text = [f"{t:.4g}" for t in ticks]
            dimension.update(tickvals=[floor] * unset + ticks, ticktext=["not set"] * unset + text)
            dimensions.append(dimension)
    objective = frame["objective"].where(frame["outcome"] == "complete")
    if objective.notna().any():
        low, high = float(objective.min()), float(objective.max())
        unscored = int(objective.isna().any())  # a "no score" tick below the range only where a trial has none
        floor = low - 0.15 * (high - low if high > low else max(abs(low), 1.0)) if unscored else low
        ticks = list(np.linspace(low, high, 4)) if high > low else [low]
        dimensions.append({"label": f"{experiment.objective} (score)", "values": objective.fillna(floor),
                           "tickvals": [floor] * unscored + ticks,
                           "ticktext": ["no score"] * unscored + [f"{t:.3g}" for t in ticks],
                           "range": [floor, high] if high > floor else [low - 0.5, high + 0.5]})
    dimensions.append({"label": "outcome", "values": frame["group"].map(codes), "tickvals": list(codes.values()),
                       "ticktext": list(codes)})
    count = max(len(groups), 1)
    colorscale = []
    for group, index in codes.items():
        colorscale += [[index / count, group_colour(group)], [(index + 1) / count, group_colour(group)]]
    figure = go.Figure(go.Parcoords(
        dimensions=dimensions,
        line={"color": frame["group"].map(codes), "colorscale": colorscale, "cmin": 0, "cmax": count,
              "showscale": False},
        labelangle=-15, labelside="top",
    ))
    title = f"{_label(analysis)}: parallel coordinates of all {len(frame)} trials"
    _layout(figure, title, height=520, margin={"l": 90, "r": 110, "t": 150, "b": 40})
    figure.update_layout(title={"y": 0.97, "yanchor": "top"})
    caption = ("One line per trial through its parameter values (each axis is labelled with the parameter and its scale), "
               "its score and its outcome, coloured by outcome. Drag along an axis to keep only the lines in that range.")
    return ReportFigure(f"{_key(analysis)}-parallel", _label(analysis), title, caption, figure)


def history_figure(analysis: ExperimentAnalysis) -> ReportFigure:
    experiment = analysis.experiment
    frame = experiment.trials
    scored = frame[(frame["outcome"] == "complete") & frame["objective"].notna()]
    others = frame[~frame.index.isin(scored.index)]
    would = scored[scored["would_stop"]]
    # No empty row: it would take the shared x-axis's ticks and title (and a score row with no score, only the
    # untrained backbone's line, was scaled around that line alone).
    score_row = 1 if len(scored) else None
    other_row = (2 if len(scored) else 1) if len(others) or not len(scored) else None
    bottom = other_row or 1
    figure = make_subplots(rows=bottom, cols=1, shared_xaxes=True, vertical_spacing=0.05,
                           row_heights=[0.75, 0.25] if bottom == 2 else None)
    if len(scored):
        figure.add_trace(go.Scatter(x=scored["trial"], y=scored["objective"], mode="markers", name="complete",
                                    marker={"color": group_colour("complete"), "size": 9},
                                    text=_hover(scored, experiment), hoverinfo="text"), row=1, col=1)
        if len(would):
            figure.add_trace(_would_stop_rings(would, would["trial"], would["objective"], experiment, 17), row=1, col=1)
        ordered = frame.sort_values("trial")
        best_so_far = ordered["objective"].where(ordered["outcome"] == "complete").cummax().ffill()
        figure.add_trace(go.Scatter(x=ordered["trial"], y=best_so_far, mode="lines", name="best so far",
                                    line={"shape": "hv", "color": "#2ca02c", "width": 2}, connectgaps=False,
                                    hovertemplate="best after trial #%{x}: %{y:.4f}<extra></extra>"), row=1, col=1)
    untrained = experiment.untrained_value
    if untrained is not None and len(frame) and score_row:
        figure.add_trace(go.Scatter(
            x=[frame["trial"].min(), frame["trial"].max()], y=[untrained, untrained], mode="lines",
            name="untrained backbone", line={"color": "#7f7f7f", "dash": "dash"},
            hovertemplate=f"untrained backbone: {untrained:.4f}<extra></extra>"), row=1, col=1)
    for group in _groups_present(others):
        rows = others[others["group"] == group]
        figure.add_trace(go.Scatter(
            x=rows["trial"], y=[group] * len(rows), mode="markers", name=group,
            marker={"color": group_colour(group), "symbol": _group_symbol(group), "size": 10,
                    "line": {"width": 2, "color": group_colour(group)}},
            text=_hover(rows, experiment), hoverinfo="text"), row=other_row, col=1)
    figure.update_xaxes(title_text="trial number (order the sampler proposed them)", row=bottom, col=1)
    if score_row:
        figure.update_yaxes(title_text=experiment.objective_label.split(" (")[0] + " (score)", row=score_row, col=1)
    if other_row:
        figure.update_yaxes(title_text="no score", type="category", row=other_row, col=1)
    title = f"{_label(analysis)}: optimisation history"
    _layout(figure, title, height=480 if score_row else 320, legend={"orientation": "h", "y": -0.2})
    if score_row:
        what = ("Each trial's score in the order it was proposed, with the best so far in green (dashed grey: an "
                "untrained backbone, when measured)"
                + ("; red rings: trials the collapse rule would have stopped" if len(would) else "")
                + ("; trials without a score sit below. " if len(others) else "; every trial has a score. "))
    else:
        what = ("No trial has a score: each is shown, in the order it was proposed, by how it ended"
                + (f" (an untrained backbone scores {untrained:.4f}). " if untrained is not None else ". "))
    draws = _tpe_draws(experiment)
    caption = (what
               + ("This search drew its trials at random (--sampler random): where collapses fall in this order is chance."
                  if experiment.sampler == "random" else
                  "Every trial was at a given start point (points_to_evaluate): their order is the one given."
                  if draws is not None and not draws[1] else
                  "TPE drew every trial at random so far (its start-up, until 10 trials have ended): where collapses fall "
                  "in this order is chance." if draws is not None and draws[0] >= draws[1] else
                  "Collapses that thin out over time mean the sampler (TPE) learned to avoid the collapsing region"
                  + (f" (it drew the first {draws[0]} trials at random)." if draws and draws[0] else ".")))
    return ReportFigure(f"{_key(analysis)}-history", _label(analysis), title, caption, figure)


def _tpe_draws(experiment: Experiment) -> tuple[int, int] | None:
    """``(random, drawn)``: of the trials a TPE search's sampler drew, how many at random (its start-up); None
    for a random search."""
    from analysis.sensitivity import sampled_trials

    random_start = experiment.random_start_trials
    return None if random_start is None else (random_start, len(sampled_trials(experiment.study)))


def _tpe_text(experiment: Experiment) -> str:
    """What a TPE search's sampler did: which trials it drew at random (its start-up), and what came after."""
    from analysis.sensitivity import TPE_STARTUP_TRIALS

    draws = _tpe_draws(experiment)
    if draws is None:
        return "after its random start-up trials, the trials gather where it found good scores"
    random_start, drawn = draws
    given = len(experiment.trials) - drawn
    if not drawn:
        return f"{counted(given, 'trial')} at given start points (points_to_evaluate), none drawn by it"
    text = f"{counted(given, 'trial')} at given start points, then " if given else ""
    if random_start >= drawn:
        return text + (f"{'both trials' if drawn == 2 else f'all {drawn} trials' if drawn > 1 else 'the trial'} drawn "
                       f"at random, as TPE draws until {TPE_STARTUP_TRIALS} trials have ended: nothing learned from the "
                       "scores yet")
    return text + (f"its first {random_start} trials drawn at random (those started before {TPE_STARTUP_TRIALS} trials had "
                   f"ended), the {drawn - random_start} after them where it had found good scores")


def trials_html(analysis: ExperimentAnalysis) -> str:
    """Every trial in a table (rows carry ``data-trial``), collapsed and failed ones included."""
    from analysis.sensitivity import final_rank, flagged_verdicts

    experiment = analysis.experiment
    frame = experiment.trials
    rank = final_rank(experiment)
    flagged = flagged_verdicts(frame)
    names = list(experiment.distributions)
    header = ["trial", "outcome", "collapse from epoch", "epochs run", f"{experiment.objective}", "final rank"] + names
    rows = []
    for index, row in frame.iterrows():
        outcome = (str(row["group"]) + (f"; {_would_stop_text(row)}" if row["would_stop"] else "")
                   + (f"; flagged {flagged.loc[index]}, not stopped" if flagged.loc[index] else ""))
        cells = [str(int(row["trial"])), html.escape(outcome),
                 "" if pd.isna(row["collapse_epoch"]) else str(int(row["collapse_epoch"])),
                 "" if pd.isna(row["epochs_run"]) else f"{row['epochs_run']:.2f}".rstrip("0").rstrip("."),
                 "" if pd.isna(row["objective"]) else f"{row['objective']:.4f}"
                 + ("*" if row["outcome"] == "stopped" else ""),
                 "" if pd.isna(rank.loc[index]) else f"{rank.loc[index]:.2f}"]
        for name in names:
            value = row.get(f"param_{name}")
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cells.append("" if missing else html.escape(_format_value(value)))
        colour = group_colour(str(row["group"]))
        cells_html = "".join(f"<td class='text' style='color:{colour}'>{c}</td>" if i == 1 else f"<td>{c}</td>"
                             for i, c in enumerate(cells))
        rows.append(f"<tr data-trial='{int(row['trial'])}'>{cells_html}</tr>")
        if row.get("error"):
            rows.append(f"<tr><td></td><td class='text muted' colspan='{len(header) - 1}'>"
                        f"{html.escape(str(row['error']))}</td></tr>")
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rung = ""
    if ((frame["outcome"] == "stopped") & frame["objective"].notna()).any():
        rung = (f"<p class='note'>* The {html.escape(experiment.objective)} of the epoch the scheduler (ASHA) stopped "
                "the trial at, not of a full trial: not comparable with the complete trials' scores, and never the "
                "best trial.</p>")
    return (f"<details><summary>All {len(frame)} trials</summary><table class='trials'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>{rung}</details>")


# ----------------------------------------------------------------------------------------------
# Comparison across experiments


def _gap(upper: float | None, lower: float | None) -> float:
    """Length of an error bar arm; 0 where either end is unknown."""
    return upper - lower if upper is not None and lower is not None else 0.0


def _rule_could_not_fire(analyses: Sequence[ExperimentAnalysis]) -> str:
    """The comparison's words for searches whose trials were too short for the collapse rule to fire."""
    short = [_label(a) for a in analyses if not a.experiment.rule_could_fire]
    return (f"; for {', '.join(short)}, whose trials were shorter than the rule's grace and patience, only divergences "
            "('divergences only')" if short else "")


def comparison_figure(analyses: Sequence[ExperimentAnalysis]) -> ReportFigure:
    from analysis.sensitivity import COLLAPSED_STOPPED, comparison_rows

    rows = comparison_rows(analyses)
    labels = [f"{r['method']}<br>({_label(a)})" for r, a in zip(rows, analyses)]
    objectives = sorted({r["objective"] for r in rows})
    # Short panel titles (the caption says the rest): longer ones ran into each other on a narrow page.
    figure = make_subplots(rows=1, cols=3, horizontal_spacing=0.09, subplot_titles=(
        "best score (95 % range)", "collapse rate (95 % Wilson)", "scores of complete trials"))
    best = [r["best"] if r["best"] is not None else np.nan for r in rows]
    # A search whose resamples often hold no scored trial: its range reaches "no score", said at its marker.
    no_score = [f"{100 * r['best_none_share']:.0f} %: no score" if r["best"] is not None and r["best_low"] is None
                and r.get("best_none_share") is not None else "" for r in rows]
    figure.add_trace(go.Scatter(
        x=labels, y=best, mode="markers+text", text=no_score, textposition="bottom center",
        name="best", marker={"size": 12, "color": "#1f77b4", "symbol": "diamond"},
        error_y={"type": "data", "symmetric": False, "array": [_gap(r["best_high"], r["best"]) for r in rows],
                 "arrayminus": [_gap(r["best"], r["best_low"]) for r in rows]},
        hovertemplate="%{x}: best %{y:.4f}<extra></extra>", showlegend=False), row=1, col=1)
    rate = [r["collapse_rate"] if r["collapse_rate"] is not None else np.nan for r in rows]
    figure.add_trace(go.Bar(
        x=labels, y=rate, marker_color="#d62728", showlegend=False,
        error_y={"type": "data", "symmetric": False,
                 "array": [_gap(r["collapse_high"], r["collapse_rate"]) for r in rows],
                 "arrayminus": [_gap(r["collapse_rate"], r["collapse_low"]) for r in rows]},
        customdata=[a.experiment.collapsed_wording for a in analyses],
        # the share written on each bar (one of 0 % has no height to see), and "divergences only" where the rule
        # could not fire (trials shorter than its grace and patience)
        text=["" if r["collapse_rate"] is None else f"{r['collapse_rate']:.0%}"
              + ("<br>divergences only" if not r["collapse_rule_could_fire"] else "") for r in rows],
        # inside a bar tall enough (above a full one, it was cut off), above a short one ("auto" hid it on one of 0)
        textposition=["inside" if (r["collapse_rate"] or 0) >= 0.2 else "outside" for r in rows],
        hovertemplate="%{x}: %{y:.0%} %{customdata}<extra></extra>"), row=1, col=2)
    for label, r in zip(labels, rows):  # a search without a best score, said where it would be
        if r["best"] is None:
            figure.add_annotation(x=label, y=0.05, xref="x", yref="y domain", text="no score", showarrow=False,
                                  font={"size": 11, "color": "#777"})
    for label, analysis in zip(labels, analyses):
        frame = analysis.experiment.trials
        scores = frame.loc[(frame["outcome"] == "complete"), "objective"].dropna().to_numpy(dtype=float)
        if not len(scores):  # said where its box would be (an empty point keeps its place on the axis)
            figure.add_trace(go.Scatter(x=[label], y=[None], mode="markers", showlegend=False, hoverinfo="skip"),
                             row=1, col=3)
            figure.add_annotation(x=label, y=0.05, xref="x3", yref="y3 domain", text="no complete trial",
                                  showarrow=False, font={"size": 11, "color": "#777"})
            continue
        # The quartiles the table's IQR is (numpy's linear interpolation), not plotly's own (another method: its
        # boxes were a quarter to a third taller than the IQR beside them), and Tukey's whiskers.
        q1, median, q3 = np.percentile(scores, [25, 50, 75])
        inside = scores[(scores >= q1 - 1.5 * (q3 - q1)) & (scores <= q3 + 1.5 * (q3 - q1))]
        figure.add_trace(go.Box(y=[scores], x=[label], q1=[q1], median=[median], q3=[q3], lowerfence=[inside.min()],
                                upperfence=[inside.max()], name=label, boxpoints="all", jitter=0.4, pointpos=0,
                                marker={"size": 5, "color": group_colour("complete")}, line={"width": 1},
                                showlegend=False, hovertemplate="%{y:.4f}<extra></extra>"), row=1, col=3)
    objective_title = (OBJECTIVE_TITLE.get(objectives[0], objectives[0]) if len(objectives) == 1
                       else "score (objectives differ: " + ", ".join(objectives) + ")")
    figure.update_yaxes(title_text=objective_title, row=1, col=1)
    figure.update_yaxes(title_text="collapsed or diverged (share of finished trials, 0-1)", range=[0, 1], row=1, col=2)
    # The best scores and the complete trials' scores on one scale, so that where each best lies shows.
    figure.update_yaxes(title_text=objective_title, matches="y", row=1, col=3)
    for column in (1, 2, 3):
        figure.update_xaxes(title_text="method (experiment)", row=1, col=column)
    # Two lines: one ran under plotly's toolbar on a 900 px page.
    title = ("Comparison across methods<br><sup>best score, collapse rate, and how much the score depends on the "
             "settings</sup>")
    _layout(figure, title, height=500, margin={"l": 70, "r": 30, "t": 100, "b": 60})  # (room for the subtitle)
    unstopped = [_label(a) for a in analyses if a.experiment.collapsed_wording != COLLAPSED_STOPPED]
    counted = (f" (for {', '.join(unstopped)}, run without collapse stopping: trials the collapse rule would have stopped "
               "count too)" if unstopped else "")
    caption = ("Left: the best score of each search with the range of the best a search of that size finds (95 % "
               "bootstrap over its trials; the upper end is the observed best; where 2.5 % or more of the resamples hold "
               "no scored trial, the range reaches 'no score', and the marker says how often). Middle: how often its "
               "settings collapse"
               f"{counted}{_rule_could_not_fire(analyses)}. Right: the spread of scores over its complete trials; a tall box means the method is "
               "sensitive to its hyperparameters and needs tuning.")
    return ReportFigure("comparison", None, title, caption, figure)


OBJECTIVE_TITLE = {"probe_map": "probe mAP (macro, 0-1)", "probe_auc": "probe ROC-AUC (macro, 0-1)",
                   "rankme": "final effective rank (dimensions)"}


def comparison_html(analyses: Sequence[ExperimentAnalysis]) -> str:
    from analysis.sensitivity import RULE_SETTINGS, comparison_rows, setting_differences

    rows = comparison_rows(analyses)
    header = ["method", "experiment", "objective", "trials", "best", "best: range (95 % bootstrap)", "median (complete)", "IQR",
              "near best", "collapse rate", "decides the score", "decides collapse"]

    def number(value, pattern="{:.4f}"):
        return "" if value is None or (isinstance(value, float) and math.isnan(value)) else pattern.format(value)

    body = []
    for r, analysis in zip(rows, analyses):
        if r["best_low"] is not None:
            best_range = f"{number(r['best_low'])}-{number(r['best_high'])}"
        elif r["best"] is not None and r.get("best_none_share") is not None:
            best_range = f"no score-{number(r['best_high'])} ({100 * r['best_none_share']:.0f} % of resamples: no score)"
        else:
            best_range = ""
        cells = [r["method"], _label(analysis), r["objective"], str(r["trials"]),
                 number(r["best"]) if r["best"] is not None else "no score", best_range,
                 number(r["median"]), number(r["iqr"]), number(r["near_best_fraction"], "{:.0%}"),
                 (f"{number(r['collapse_rate'], '{:.0%}')} ({number(r['collapse_low'], '{:.0%}')}-"
                  f"{number(r['collapse_high'], '{:.0%}')})"
                  + ("" if r["collapse_rule_could_fire"] else ", divergences only: the rule could not fire")
                  ) if r["collapse_rate"] is not None else "",
                 _most_important_text(r, "objective"), _most_important_text(r, "collapse")]
        body.append("<tr>" + "".join(f"<td class='text'>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    head = "".join(f"<th class='text'>{html.escape(h)}</th>" for h in header)
    differences, rule = setting_differences(analyses), setting_differences(analyses, RULE_SETTINGS)
    warning = "".join(
        f"<p class='note'>These searches differ in settings their {what} depend on: "
        + html.escape("; ".join(listed)) + f". Compare their {what} with care.</p>"
        for what, listed in (("scores", differences), ("collapse rates", rule)) if listed)
    return (f"{warning}<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            "<p class='muted'>Best range: the range of the best score of a search this size, 95 % percentile bootstrap "
            "over each search's finished trials resampled with replacement (a trial stopped for collapse drawn scores "
            "nothing; one the rule would have stopped, in a search run without stopping, keeps its score); "
            "its upper end is the observed best, its lower end what a search of this size could have ended with: "
            "'no score' where 2.5 % or more of the resamples hold no scored trial (most trials collapsed), with that "
            "share. "
            "Collapse rate: share of finished trials collapsed or diverged (for a search run without collapse "
            "stopping, also those the collapse rule would have stopped). Near best: share of finished trials within "
            "5 % of the best score, high for a method that needs little tuning. IQR: interquartile range of the complete trials' scores. The last two "
            "columns name the parameter with the largest importance (PED-ANOVA, else fANOVA), with fANOVA's first in "
            "brackets where it is another (the ranking is then not settled); n/a where no importance could be "
            "computed (too few trials; for collapse, too few collapsed or too few healthy ones: the experiment's own "
            "section says which).</p>")


def _most_important_text(row: dict[str, Any], target: str) -> str:
    """``x``, or ``x (fANOVA: y)`` where the other evaluator ranks another parameter first; ``n/a`` without."""
    first = row.get(f"most_important_for_{target}")
    if not first:
        return "n/a"
    others = row.get(f"most_important_for_{target}_otherwise") or {}
    return first + "".join(f" ({evaluator}: {name})" for evaluator, name in others.items())


# ----------------------------------------------------------------------------------------------
# The page


def _figure_html(figure: ReportFigure, include_plotlyjs: bool) -> str:
    div = pio.to_html(figure.figure, full_html=False, include_plotlyjs=include_plotlyjs, div_id=f"figure-{figure.key}",
                      config={"displaylogo": False, "responsive": True})
    return (f"<figure class='plot' data-figure='{html.escape(figure.key)}'>{div}"
            f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)


def _key(analysis: ExperimentAnalysis) -> str:
    """The experiment's prefix of DOM ids and figure keys (set by :func:`build_page`, unique in the page)."""
    return analysis.key or _slug(analysis.experiment.name)


def _label(analysis: ExperimentAnalysis) -> str:
    """The name the experiment is shown by (set by :func:`build_page`)."""
    return analysis.label or analysis.experiment.name


def keyed(analyses: Sequence[ExperimentAnalysis]) -> list[ExperimentAnalysis]:
    """The analyses with their page ``key`` (``e<N>-<folder name>``: the position makes it unique, since
    two searches in different folders can share a name) and ``label`` (the folder's name, with its
    parent's where two experiments share one, and the position where that is not enough)."""
    from dataclasses import replace

    from analysis.sensitivity import experiment_labels

    labels = experiment_labels([a.experiment for a in analyses])  # as in the JSON, the CSV and on the console
    return [replace(a, key=f"e{number}-{_slug(a.experiment.name)}", label=label)
            for number, (a, label) in enumerate(zip(analyses, labels), start=1)]


def experiment_sections(analysis: ExperimentAnalysis) -> list[tuple[str, str, list[ReportFigure | str]]]:
    """The sections of one experiment: (section id, heading, parts) where a part is a figure or HTML."""
    experiment = analysis.experiment
    importance = importance_figure(analysis)
    parameters = [parameter_figure(analysis, name) for name in analysis.ranked_parameters()]
    pairs = map_pairs(analysis)
    maps: list[ReportFigure | str] = [map_figure(analysis, pair) for pair in pairs]
    if not pairs:
        maps = ["<p class='note'>Fewer than two numerical sampled parameters: no two-parameter map.</p>"]
    dynamics = [f for f in (dynamics_figure(analysis), time_to_collapse_figure(analysis)) if f is not None]
    if not experiment.trajectories:
        dynamics.insert(0, "<p class='note'>No per-epoch reports were found (Ray Tune's result.json in the trial "
                           "folders), so there are no trajectories to show.</p>")
    if time_to_collapse_figure(analysis) is None:
        dynamics.append(f"<p class='note'>No trial {html.escape(experiment.collapsed_wording)}, so there is no time to "
                        "collapse to show.</p>")
    label_free = label_free_figure(analysis)
    if label_free is None and experiment.objective in ("probe_map", "probe_auc"):
        # A probe objective whose trials have not completed (all collapsed, or the search just started).
        # (A trial stopped early may carry the probe score of an epoch before its stop: not its final one.)
        when = "yet" if experiment.running else "in this search"
        label_free_parts: list[ReportFigure | str] = [
            f"<p class='note'>No trial has completed {when}, so there is no final {html.escape(experiment.objective)} "
            "score to compare the label-free rank with (trials stopped for collapse or divergence get no final probe; "
            "a score of an earlier epoch is not their final one).</p>"]
    elif label_free is None:
        label_free_parts = [
            "<p class='note'>No probe score in this search (its objective is "
            f"{html.escape(experiment.objective)}, and probes run only for a probe objective): there is no labelled "
            "score to compare the label-free rank with.</p>"]
    else:
        label_free_parts = [label_free]
    parallel = parallel_figure(analysis)
    return [
        ("summary", "Summary", [summary_html(analysis), outcome_figure(analysis)]),
        ("importance", "Parameter importance",
         ([importance] if importance else []) + [importance_html(analysis)]),
        ("parameters", "Each parameter: score and collapse rate", parameters or
         ["<p class='note'>No sampled parameters recorded.</p>"]),
        ("maps", "Two-parameter maps", maps),
        ("dynamics", "Collapse dynamics", dynamics),
        ("label-free", "Does the label-free metric predict the labelled one?", label_free_parts),
        ("parallel", "Parallel coordinates", [parallel] if parallel else ["<p class='note'>No parameters.</p>"]),
        ("history", "Optimisation history", [history_figure(analysis)]),
        ("trials", "Every trial", [trials_html(analysis)]),
    ]


def build_page(analyses: Sequence[ExperimentAnalysis]) -> tuple[str, list[ReportFigure]]:
    """The whole report as one HTML string (plotly.js inlined once) and its figures in page order.

    Every id in the page (sections, headings, figures) starts with the experiment's page key
    (:func:`keyed`), so two experiments whose folders share a name get their own sections and plots."""
    analyses = keyed(analyses)
    blocks: list[tuple[str, str, str, ExperimentAnalysis | None, list[ReportFigure | str]]] = []
    if len(analyses) > 1:
        blocks.append(("comparison", "comparison", "Comparison across methods", None,
                       [comparison_html(analyses), comparison_figure(analyses)]))
    for analysis in analyses:
        for section, heading, parts in experiment_sections(analysis):
            blocks.append((f"{_key(analysis)}-{section}", section, heading, analysis, parts))
    figures: list[ReportFigure] = []
    body = []
    toc = []
    current = None
    for section_id, section_name, heading, owner, parts in blocks:
        if owner is not None and owner is not current:
            label, method = html.escape(_label(owner)), html.escape(owner.experiment.method)
            body.append(f"<h2 id='{_key(owner)}'>{label}: {method}, {len(owner.experiment.trials)} trials</h2>")
            toc.append(f"<li><a href='#{_key(owner)}'>{label} ({method})</a></li>")
            current = owner
        elif owner is None:
            toc.append(f"<li><a href='#{section_id}'>{html.escape(heading)}</a></li>")
        level = "h3" if owner is not None else "h2"
        rendered = []
        for part in parts:
            if isinstance(part, ReportFigure):
                rendered.append(_figure_html(part, include_plotlyjs=not figures))
                figures.append(part)
            else:
                rendered.append(part)
        data = "" if owner is None else f" data-experiment='{html.escape(_label(owner))}'"
        body.append(f"<section id='{section_id}' class='report-section' data-section='{section_name}'{data}>"
                    f"<{level}>{html.escape(heading)}</{level}>{''.join(rendered)}</section>")
    names = ", ".join(f"{_label(a)} ({a.experiment.method})" for a in analyses)
    from analysis.sensitivity import PROG, REPORT_HTML_TITLE

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">{REPORT_HTML_TITLE}{html.escape(names)}</title>
{_STYLE}
{_ERROR_HOOK}
</head><body>
<h1>Hyperparameter sensitivity and collapse</h1>
<p class="muted">Written by {PROG} on {html.escape(pd.Timestamp.now().strftime('%Y-%m-%d %H:%M'))} from {html.escape(names)}.
Every trial is included, collapsed, diverged and failed ones too (Optuna's own plots show only complete trials).</p>
<pre id="js-errors"></pre>
<nav><ul>{''.join(toc)}</ul></nav>
{''.join(body)}
</body></html>
"""
    return page, figures


def export_pngs(figures: Sequence[ReportFigure], folder: Path) -> dict[str, Any]:
    """Write each figure as ``<folder>/<NN>-<key>.png`` with kaleido; without kaleido or a Chrome it
    writes nothing and says how to get them. Figures of an earlier report in the folder (``NN-*.png``
    files this export did not write) are removed once the export has succeeded, so that the folder
    holds this report's figures only."""
    how = ("install kaleido (pip install -c constraints.txt -e '.[png]') and a Chrome or Chromium "
           "(Debian/Ubuntu: apt install chromium; or run plotly_get_chrome), or open the HTML report and use each "
           "figure's camera button")
    if importlib.util.find_spec("kaleido") is None:
        return {"written": [], "reason": f"kaleido is not installed; {how}"}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{number:02d}-{_slug(figure.key)}.png" for number, figure in enumerate(figures, start=1)]
    before = {path: path.stat().st_mtime_ns for path in paths if path.is_file()}  # an earlier report's
    try:
        # One browser session for all figures (write_image would start one per figure).
        pio.write_images([f.figure for f in figures], paths, format="png", width=1100,
                         height=[f.figure.layout.height or 500 for f in figures])
    except Exception as error:  # kaleido raises its own errors, e.g. when no Chrome is found
        # What this export wrote before it failed; an earlier report's figures of the same names are not.
        written = [str(p) for p in paths if p.is_file() and p.stat().st_mtime_ns != before.get(p)]
        return {"written": written, "folder": str(folder),
                "reason": f"kaleido could not export ({type(error).__name__}: {error}); {how}"}
    stale = sorted(set(p for p in folder.glob("*.png") if re.fullmatch(r"\d{2,}-.+\.png", p.name)) - set(paths))
    for path in stale:
        path.unlink(missing_ok=True)
    return {"written": [str(p) for p in paths], "folder": str(folder), "removed": [str(p) for p in stale]}
