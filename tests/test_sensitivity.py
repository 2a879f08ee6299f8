"""The sensitivity report (python -m analysis.sensitivity) on a real small search, its numbers
against independent definitions, the page in headless Chromium, and the command line's errors."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.importance import FanovaImportanceEvaluator
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from scipy.stats import spearmanr

from analysis.sensitivity import (
    bootstrap_best_interval,
    collapse_importances,
    experiment_from_study,
    main,
    objective_importances,
    spearman_with_interval,
    wilson_interval,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("summary", "importance", "parameters", "maps", "dynamics", "label-free", "parallel", "history", "trials")

# A tiny clustering search (as in test_hpsearch) with forced outcomes: five healthy settings, two
# uniform collapses (a teacher at temperature 50-100 spreads every sample evenly over the
# prototypes), a divergence (learning rate 1e6) and a failure (one prototype). The parameters a
# point leaves out are drawn by the search's TPE sampler.
POINTS = [
    {"num_prototypes": 64, "teacher_temperature": 0.04, "learning_rate": 1e-3, "teacher_warmup_epochs": 0.0},
    {"num_prototypes": 16, "teacher_temperature": 0.03, "learning_rate": 3e-3, "teacher_warmup_epochs": 0.0},
    {"num_prototypes": 512, "teacher_temperature": 0.02, "learning_rate": 5e-4, "teacher_warmup_epochs": 1.0},
    {"num_prototypes": 32, "teacher_temperature": 0.06, "learning_rate": 2e-3, "teacher_warmup_epochs": 0.5},
    {"num_prototypes": 128, "teacher_temperature": 0.05, "learning_rate": 3e-4, "teacher_warmup_epochs": 2.0},
    {"num_prototypes": 64, "teacher_temperature": 100.0, "learning_rate": 1e-3, "teacher_warmup_epochs": 0.0},
    {"num_prototypes": 256, "teacher_temperature": 50.0, "learning_rate": 2e-3, "teacher_warmup_epochs": 0.0},
    {"num_prototypes": 64, "learning_rate": 1e6},
    {"num_prototypes": 1},
]
TRIALS = len(POINTS)
TINY = dict(max_epochs=2, steps_per_epoch=3, batch_size=8, probe_segments=32, probe_segments_per_track=1, concurrency=2)
# Only the uniform-assignment rule: a tiny run's other collapse metrics read "collapsed" for every
# trial (a fresh backbone in eval mode).
UNIFORM_ONLY = dict(
    complete_max_l2_std=0.0, complete_max_effective_rank=0.0, complete_min_mean_cosine=1.0, check_projection=False,
    dimensional_max_rank_fraction=0.0, cluster_min_occupancy=0.0, cluster_max_assignment_entropy=0.0,
)


@pytest.fixture(scope="module")
def storage(tmp_path_factory, tonal_data) -> Path:
    """A storage folder holding one real finished search, ``clustering-small``."""
    import ray

    from hpsearch.run import run_search
    from hpsearch.settings import SearchSettings

    folder = tmp_path_factory.mktemp("runs")
    settings = SearchSettings(
        method="clustering", trials=TRIALS, name="clustering-small", storage_dir=str(folder), data="tonal",
        grace_epochs=0, patience_epochs=1, thresholds=UNIFORM_ONLY, points_to_evaluate=POINTS, **TINY,
    )
    previous = {key: os.environ.get(key) for key in ("RAY_AUTH_MODE", "RAY_AIR_NEW_OUTPUT")}
    os.environ.update(RAY_AUTH_MODE="disabled", RAY_AIR_NEW_OUTPUT="0")
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as quiet:
            warnings.simplefilter("ignore")  # Optuna: enqueued values outside the space's ranges
            run_search(settings, data=tonal_data, stream=quiet)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return folder


@pytest.fixture(scope="module")
def experiment_folder(storage) -> Path:
    return storage / "clustering-small"


@pytest.fixture(scope="module")
def report(storage, experiment_folder, tmp_path_factory) -> dict:
    """The report of the search, written by the command line's main() with no RUN_DIR."""
    out = tmp_path_factory.mktemp("report") / "sensitivity.html"
    assert main(["--storage-dir", str(storage), "--out", str(out)]) == 0
    return {"html": out, "page": out.read_text(encoding="utf-8"), "summary": json.loads(out.with_suffix(".json").read_text()),
            "csv": pd.read_csv(out.with_name("sensitivity-trials.csv")),
            "trials": pd.read_csv(experiment_folder / "trials.csv")}


def study_of(folder: Path) -> optuna.Study:
    return optuna.load_study(study_name="search", storage=JournalStorage(JournalFileBackend(str(folder / "optuna.journal"))))


# ----------------------------------------------------------------------------------------------
# The report of a real search


def test_the_search_produced_every_outcome(report):
    outcomes = report["trials"]["outcome"].tolist()
    assert len(outcomes) == TRIALS
    for outcome in ("complete", "collapsed", "diverged", "failed"):
        assert outcome in outcomes, outcomes


def test_report_has_every_section_and_every_trial(report):
    page, summary, trials = report["page"], report["summary"], report["trials"]
    for section in SECTIONS:
        assert f"data-section='{section}'" in page
    # Every trial is in the page's table, in the CSV and in the summary's counts, whatever its outcome.
    for number in trials["trial"]:
        assert f"<tr data-trial='{number}'>" in page
    csv = report["csv"]
    assert sorted(csv["trial"]) == sorted(trials["trial"])
    assert dict(zip(csv["trial"], csv["outcome"])) == dict(zip(trials["trial"], trials["outcome"]))
    (experiment,) = summary["experiments"]
    counts = experiment["counts"]
    assert sum(counts.values()) == TRIALS
    assert counts["complete"] == (trials["outcome"] == "complete").sum()
    assert counts["collapsed: cluster"] == (trials["outcome"] == "collapsed").sum()
    assert counts["diverged"] == 1 and counts["failed"] == 1
    # plotly.js is inlined once and nothing is fetched from the network.
    assert page.count("plotly.js v") == 1 and "<script src=" not in page


def test_summary_numbers_match_the_journal(report, experiment_folder):
    (experiment,) = report["summary"]["experiments"]
    trials = report["trials"]
    complete = trials[trials["outcome"] == "complete"]
    best = complete.loc[complete["objective"].idxmax()]
    assert experiment["best"]["trial"] == best["trial"]
    assert experiment["best"]["value"] == pytest.approx(best["objective"])
    # Only sampled parameters (the helper one_minus_* ones, not the derived centre momentum).
    study = study_of(experiment_folder)
    assert set(experiment["best"]["params"]) == set(study.trials[int(best["trial"])].params)
    assert "center_momentum" in experiment["best"]["derived_params"]
    compute = experiment["compute"]
    assert compute["trial_epochs_run"] == pytest.approx(trials["epochs_run"].sum())
    saved = sum((2 - trials.loc[trials["outcome"] == o, "epochs_run"]).clip(lower=0).sum() for o in ("collapsed", "diverged"))
    assert compute["epochs_saved_total"] == pytest.approx(saved)
    finished = trials["outcome"].isin(["complete", "collapsed", "diverged"])
    collapsed = trials["outcome"].isin(["collapsed", "diverged"]).sum()
    assert experiment["collapse_rate"]["rate"] == pytest.approx(collapsed / finished.sum())


def test_the_untrained_reference_is_shown_in_both_batchnorm_states(report, experiment_folder, tmp_path):
    """The summary names the search's calibrated reference and shows the initial-statistics score
    beside it, as the search's summary.json holds them; an older search (one value) says which it is."""
    search = json.loads((experiment_folder / "summary.json").read_text())
    calibrated, initial = search["untrained_value"], search["untrained_value_initial_bn"]
    assert 0.0 <= calibrated <= 1.0 and 0.0 <= initial <= 1.0 and calibrated != initial
    assert (f"probe_map {calibrated:.4f} (BatchNorm statistics from the training tracks; {initial:.4f} with its "
            "initial ones)") in report["page"]

    older = tmp_path / "older"
    shutil.copytree(experiment_folder, older)
    (older / "summary.json").write_text(json.dumps({**search, "untrained_value": initial, "untrained_value_initial_bn": None}))
    out = tmp_path / "older.html"
    assert main([str(older), "--out", str(out)]) == 0
    assert f"probe_map {initial:.4f} (initial BatchNorm statistics)" in out.read_text(encoding="utf-8")


def test_importances_sum_to_one_for_both_targets_and_both_methods(report):
    (experiment,) = report["summary"]["experiments"]
    found = {(i["target"], i["evaluator"]): i for i in experiment["importances"]}
    assert set(found) == {(t, e) for t in ("objective", "collapse") for e in ("PED-ANOVA", "fANOVA")}
    for importance in found.values():
        assert importance["importances"] is not None, importance["note"]
        assert sum(importance["importances"].values()) == pytest.approx(1.0, abs=1e-9)
        assert all(value >= 0 for value in importance["importances"].values())
        # The sampled parameters only: one_minus_ema_rate, not the derived base_ema_rate.
        assert "one_minus_ema_rate" in importance["importances"]
        assert "base_ema_rate" not in importance["importances"]
    trials = report["trials"]
    # The collapse target counts every finished trial (the collapsed and diverged ones included);
    # the objective only the complete ones.
    assert found[("collapse", "fANOVA")]["trials"] == trials["outcome"].isin(["complete", "collapsed", "diverged"]).sum()
    assert found[("objective", "fANOVA")]["trials"] == (trials["outcome"] == "complete").sum()
    page = report["page"]
    assert "PED-ANOVA" in page and "fANOVA" in page


def test_objective_importance_equals_optunas_on_the_study_itself(experiment_folder, report):
    """The in-memory copy changes nothing for the objective: Optuna's fANOVA on the search's own
    study (COMPLETE trials) gives the same numbers."""
    study = study_of(experiment_folder)
    (experiment,) = report["summary"]["experiments"]
    ours = next(i for i in experiment["importances"] if i["target"] == "objective" and i["evaluator"] == "fANOVA")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    varied = [name for name in complete[0].params if len({t.params[name] for t in complete}) > 1]
    theirs = optuna.importance.get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), params=varied)
    for name, value in theirs.items():
        assert ours["importances"][name] == pytest.approx(value, abs=1e-9)


def test_spearman_equals_scipys_on_the_same_numbers(report):
    (experiment,) = report["summary"]["experiments"]
    csv = report["csv"]
    complete = csv[csv["outcome"] == "complete"]
    expected = spearmanr(complete["final_rankme"], complete["probe_map"])
    reported = experiment["label_free_vs_labelled"]
    assert reported["n"] == len(complete)
    assert reported["spearman"] == pytest.approx(expected.statistic, abs=1e-12)
    # Fisher z interval with the Bonett-Wright standard error, written out.
    rho, n = expected.statistic, len(complete)
    half = 1.959964 * math.sqrt((1 + rho**2 / 2) / (n - 3))
    assert reported["low"] == pytest.approx(math.tanh(math.atanh(rho) - half), abs=1e-9)
    assert reported["high"] == pytest.approx(math.tanh(math.atanh(rho) + half), abs=1e-9)
    assert "Spearman rho = " in report["page"] and "Bonett-Wright" in report["page"]


def test_every_figure_has_a_title_axis_titles_and_a_reading_aid(report):
    from analysis.sensitivity import analyse, load_experiment
    from analysis.sensitivity_figures import build_page

    analysis = analyse(load_experiment(Path(report["summary"]["experiments"][0]["folder"])))
    page, figures = build_page([analysis])
    keys = [f.key for f in figures]
    assert keys == [f["id"] for f in report["summary"]["figures"]]
    # Per-parameter figures for every sampled parameter, maps, dynamics with occupancy.
    for name in analysis.experiment.distributions:
        assert f"clustering-small-param-{name}" in keys
    assert any(key.startswith("clustering-small-map-num_prototypes-teacher_temperature") for key in keys)
    for figure in figures:
        layout = figure.figure.layout
        assert layout.title.text and figure.caption, figure.key
        assert figure.caption in page or figure.caption.replace("'", "&#x27;") in page
        if figure.figure.data and figure.figure.data[0].type == "parcoords":
            assert all(d.label for d in figure.figure.data[0].dimensions)
            continue
        used_y = {trace.yaxis or "y" for trace in figure.figure.data if hasattr(trace, "yaxis")}
        for axis in used_y:
            title = layout[axis.replace("y", "yaxis", 1)].title.text
            assert title, (figure.key, axis)
        x_titles = [layout[name].title.text for name in layout if name.startswith("xaxis") and layout[name].title.text]
        assert x_titles and any("(" in t for t in x_titles), figure.key
    dynamics = next(f for f in figures if f.key.endswith("-dynamics")).figure
    assert "occupancy" in dynamics.layout.yaxis2.title.text


def test_trajectories_are_joined_to_optuna_trials(experiment_folder):
    from analysis.sensitivity import read_trajectories

    trajectories = read_trajectories(experiment_folder)
    trials = pd.read_csv(experiment_folder / "trials.csv")
    for row in trials.itertuples():
        if row.outcome in ("complete", "collapsed"):
            epochs = trajectories[row.trial]["epoch"].tolist()
            assert epochs == list(range(1, int(row.epochs_completed) + 1))
            assert "collapse_cluster_occupancy" in trajectories[row.trial]


def test_several_experiments_get_a_comparison(experiment_folder, tmp_path):
    copy = tmp_path / "clustering-copy"
    shutil.copytree(experiment_folder, copy)
    out = tmp_path / "two.html"
    assert main([str(experiment_folder), str(copy), "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    page = out.read_text()
    assert "data-section='comparison'" in page
    assert [row["experiment"] for row in summary["comparison"]] == ["clustering-small", "clustering-copy"]
    first = summary["comparison"][0]
    assert first["best_low"] <= first["best"] <= first["best_high"]
    for section in SECTIONS:
        assert page.count(f"data-section='{section}'") == 2


def test_a_running_search_is_read_as_far_as_it_has_gone(experiment_folder, tmp_path, capsys):
    copy = tmp_path / "clustering-running"
    shutil.copytree(experiment_folder, copy)
    study = study_of(copy)
    study.ask()  # a trial that has started and not ended
    out = tmp_path / "running.html"
    assert main([str(copy), "--out", str(out)]) == 0
    summary = json.loads(out.with_suffix(".json").read_text())
    (experiment,) = summary["experiments"]
    assert experiment["running"] and experiment["counts"]["running"] == 1
    assert "still running" in out.read_text()
    assert "running" in capsys.readouterr().out


def test_the_default_is_the_latest_search_of_each_method(storage, experiment_folder, tmp_path):
    from analysis.sensitivity import default_experiments

    copy = tmp_path / "clustering-later"
    shutil.copytree(experiment_folder, copy)
    older = tmp_path / "clustering-earlier"
    shutil.copytree(experiment_folder, older)
    now = time.time()
    os.utime(older / "search.json", (now - 100, now - 100))
    os.utime(copy / "search.json", (now, now))
    (tmp_path / "report").mkdir()  # the report's own folder is not an experiment
    assert default_experiments(tmp_path) == [copy]


# ----------------------------------------------------------------------------------------------
# In a browser


def chromium_dom(page: Path, tmp_path: Path) -> str:
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         # Software WebGL for the parallel coordinates: Chromium no longer falls back to it silently.
         "--disable-dev-shm-usage", "--enable-unsafe-swiftshader", f"--user-data-dir={tmp_path / 'chromium-profile'}",
         "--virtual-time-budget=20000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(not Path("/usr/bin/chromium").exists() and not shutil.which("chromium"),
                    reason="Chromium is not installed (Debian: apt install chromium; .ci/run installs it)")
def test_the_report_renders_in_headless_chromium_without_javascript_errors(report, tmp_path):
    dom = chromium_dom(report["html"], tmp_path)
    # The page's error hook collects window errors and console.error calls here.
    errors = dom.split('<pre id="js-errors"', 1)[1].split("</pre>", 1)[0].split(">", 1)[1]
    assert errors.strip() == "", errors
    figures = report["summary"]["figures"]
    blocks = dom.split("<figure class=\"plot\"")[1:]
    assert len(blocks) == len(figures)
    for block, figure in zip(blocks, figures):
        assert f'data-figure="{figure["id"]}"' in block
        # plotly drew the figure: its SVG layers exist and hold marks.
        assert 'class="main-svg"' in block, figure["id"]
        assert any(mark in block for mark in ('class="point"', 'class="trace', "<path")), figure["id"]


# ----------------------------------------------------------------------------------------------
# Numbers on synthetic studies (no Ray)


def synthetic_study(rows: list[tuple[float, float, str]]) -> optuna.Study:
    """Trials of x, y in [0, 1] with hpsearch's attributes: (x, y, outcome); a complete trial scores x."""
    study = optuna.create_study(direction="maximize")
    distributions = {"x": optuna.distributions.FloatDistribution(0.0, 1.0),
                     "y": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for x, y, outcome in rows:
        state = optuna.trial.TrialState.COMPLETE if outcome == "complete" else optuna.trial.TrialState.PRUNED
        attrs = {"outcome": outcome, "epochs_run": 2.0}
        if outcome == "collapsed":
            attrs.update(collapse_type="complete", collapse_epoch=1)
        study.add_trial(optuna.trial.create_trial(
            params={"x": x, "y": y}, distributions=distributions, state=state,
            value=x if outcome == "complete" else None, user_attrs=attrs))
    return study


SETTINGS = {"method": "vicreg", "objective": "probe_map", "max_epochs": 2, "trials": 40, "steps_per_epoch": 3}


def test_collapse_importance_finds_the_parameter_that_causes_collapse():
    rng = np.random.default_rng(0)
    rows = [(x, y, "collapsed" if x > 0.6 else "complete") for x, y in rng.uniform(size=(40, 2))]
    experiment = experiment_from_study(synthetic_study(rows), SETTINGS)
    for importance in collapse_importances(experiment):
        assert importance.values["x"] > 0.8, importance
        assert importance.trials == 40
    # Optuna alone would not see the collapsed trials: they are PRUNED.
    assert len(experiment.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) < 40


def test_too_few_trials_say_so_and_the_report_still_builds(tmp_path):
    from analysis.sensitivity import analyse
    from analysis.sensitivity_figures import build_page

    experiment = experiment_from_study(synthetic_study([(0.2, 0.3, "complete"), (0.7, 0.1, "collapsed"),
                                                        (0.4, 0.9, "complete")]), SETTINGS, tmp_path)
    for importance in objective_importances(experiment) + collapse_importances(experiment):
        assert importance.values is None and "not enough trials" in importance.note
    page, _ = build_page([analyse(experiment)])
    assert "not enough trials" in page


def test_no_collapse_at_all_says_there_is_nothing_to_explain():
    rng = np.random.default_rng(1)
    experiment = experiment_from_study(synthetic_study([(x, y, "complete") for x, y in rng.uniform(size=(8, 2))]), SETTINGS)
    for importance in collapse_importances(experiment):
        assert importance.values is None and "no trial collapsed" in importance.note


def test_wilson_interval_matches_its_formula():
    successes, total, z = 3, 12, 1.959964
    p = successes / total
    centre = (p + z**2 / (2 * total)) / (1 + z**2 / total)
    half = z / (1 + z**2 / total) * math.sqrt(p * (1 - p) / total + z**2 / (4 * total**2))
    assert wilson_interval(successes, total) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_spearman_interval_is_nan_below_four_trials_and_rho_is_scipys():
    x, y = [1.0, 2.0, 3.0], [2.0, 1.0, 3.0]
    result = spearman_with_interval(x, y)
    assert result.rho == pytest.approx(spearmanr(x, y).statistic) and math.isnan(result.low)
    assert math.isnan(spearman_with_interval([1, 1, 1, 1], [1, 2, 3, 4]).rho)


def test_best_interval_resamples_trials_and_counts_unscored_ones():
    values = [0.1, 0.2, 0.3, np.nan]
    low, high = bootstrap_best_interval(values)
    assert high == 0.3 and 0.1 <= low <= 0.3
    assert all(math.isnan(v) for v in bootstrap_best_interval([np.nan, np.nan]))


def test_enqueued_points_outside_the_space_are_noted_and_widened_for_importances():
    study = optuna.create_study(direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        study.enqueue_trial({"t": 100.0})
        for _ in range(6):
            trial = study.ask()
            value = trial.suggest_float("t", 0.01, 0.2, log=True)
            study.tell(trial, -abs(math.log(value / 0.05)))
    experiment = experiment_from_study(study, SETTINGS)
    assert (experiment.distributions["t"].low, experiment.distributions["t"].high) == (0.01, 0.2)
    widened = experiment.outside["t"]
    assert (widened.low, widened.high, widened.log) == (0.01, 100.0, True)
    # The importance evaluators accept the trial outside the space (Optuna itself would refuse it).
    for importance in objective_importances(experiment):
        assert importance.values == {"t": 1.0}, importance


# ----------------------------------------------------------------------------------------------
# Command line


def test_png_export_writes_images_or_says_how_to_get_them(tmp_path):
    import plotly.graph_objects as go

    from analysis.sensitivity_figures import ReportFigure, export_pngs

    figure = ReportFigure("one", None, "t", "c", go.Figure(go.Scatter(x=[1, 2], y=[2, 1]), layout={"height": 300}))
    result = export_pngs([figure], tmp_path / "figures")
    if importlib.util.find_spec("kaleido") is None:
        assert result["written"] == []
        assert "kaleido is not installed" in result["reason"] and ".[png]" in result["reason"]
        assert "apt install chromium" in result["reason"]
        return
    if result["written"]:
        assert (tmp_path / "figures" / "01-one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:  # kaleido without a browser
        assert "Chrome" in result["reason"] or "chrom" in result["reason"].lower()


def write_foreign(folder: Path) -> Path:
    return write_files(folder, {"notes.txt": "not a search"})


def write_files(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "no such folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "not a search folder"),
        (lambda p: write_foreign(p / "foreign"), "not a search folder"),
        (lambda p: write_files(p / "partial", {"search.json": '{"method": "vicreg"}'}), "has not recorded any trial yet"),
        (lambda p: write_files(p / "broken", {"search.json": "{not json"}), "unreadable search settings"),
        (lambda p: write_files(p / "other", {"search.json": '{"model": "x"}'}), "not the settings of a hpsearch search"),
        (lambda p: write_files(p / "corrupt", {"search.json": '{"method": "vicreg"}', "optuna.journal": "garbage\n"}),
         "holds no study named 'search'"),
    ],
    ids=["missing", "empty", "foreign", "partial", "broken", "other", "corrupt"],
)
def test_bad_folders_get_a_clear_message_and_exit_2(make, message, tmp_path, capsys):
    folder = make(tmp_path)
    assert main([str(folder), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "r.html").exists()


def test_a_storage_folder_given_as_an_experiment_is_explained(storage, tmp_path, capsys):
    assert main([str(storage), "--out", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert "holds 1 experiment folder(s) (clustering-small" in err and "--storage-dir" in err


def test_no_searches_under_the_storage_dir_exit_2(tmp_path, capsys):
    assert main(["--storage-dir", str(tmp_path)]) == 2
    assert "no search folders here" in capsys.readouterr().err


def test_the_module_runs_as_a_script_with_errors_and_no_traceback(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "analysis.sensitivity", str(write_foreign(tmp_path / "x"))],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 2 and "not a search folder" in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "analysis.sensitivity", "--format", "pdf"],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'pdf'" in done.stderr
