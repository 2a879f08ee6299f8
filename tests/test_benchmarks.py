"""The benchmark scripts still run against today's code (their smallest settings; most are slow).

The numbers in benchmarks/README.md come from these scripts: one that no longer runs cannot be used
to check them. Each runs in a subprocess, as a user runs it, with its cache in this test's folder;
their --help, in one subprocess for all (one script after the other, as __main__).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "bench_audio": (["--repeats", "1", "--threads", "1"], "RESULT load_audio / decoding alone (FLAC): "),
    "bench_collapse": (["--repeats", "1", "--samples", "64"], "of training time"),
    "bench_models": (["--repeats", "1", "--pairs", "2", "--presets", "cpu", "--threads", "1"], "ratios of step times"),
    "bench_sampler": (["--tracks", "4", "--batches", "2", "--repeats", "1"], "segments/s"),
    "bench_trainer": (["--steps", "2", "--repeats", "1", "--threads", "1", "--skip-collapse"], "ratio Lightning / plain"),
    "bench_downstream": (["--synthetic", "--tracks", "8", "--skip-full", "--repeats", "1", "--threads", "1",
                          "--presets", "cpu"], "embedding extraction"),
    "bench_scale": (["--tracks", "20", "40", "--seconds", "8"], "RESULT folder loader seconds per .m4a row, 40 / 20 rows"),
    "bench_probe_memory": (["--segments", "60000", "--dim", "128", "--workers", "0"],
                           "RESULT probe_memory_over_segments workers=0 "),
    "bench_decode_memory": (["--minutes", "3", "--formats", "flac", "--repeats", "1"],
                            "RESULT flac peak memory today / whole: "),
    # The case a first version read otherwise (the benchmark fails where the two ways' log-mels differ).
    "bench_decode_memory_mp3": (["--minutes", "1", "--formats", "mp3", "--repeats", "1", "--rate", "22050",
                                 "--channels", "1"], "mp3: the same log-mel both ways"),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", list(CASES))
def test_benchmark_script_runs(script, tmp_path):
    arguments, expected = CASES[script]
    if script == "bench_sampler":
        arguments = [*arguments, "--workdir", str(tmp_path / "work")]
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script.removesuffix('_mp3')}.py"), *arguments],
        capture_output=True, text=True,
        timeout=600, cwd=tmp_path, env={**os.environ, "MUSICSSL_CACHE": str(tmp_path / "cache")},
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert expected in completed.stdout
    if script == "bench_probe_memory":  # about one copy of the embeddings at most (before: 4.2 and 10.4)
        ratios = [float(line.split()[-1]) for line in completed.stdout.splitlines() if line.startswith("RESULT")]
        assert ratios and max(ratios) < 2.0, completed.stdout
    if script == "bench_decode_memory":  # the same log-mel (else it fails), for under half the memory (0.19 at 10 min)
        ratio = next(float(line.split()[7]) for line in completed.stdout.splitlines()
                     if line.startswith("RESULT flac peak memory"))
        assert "the same log-mel both ways" in completed.stdout and ratio < 0.5, completed.stdout
    if script == "bench_downstream":  # the synthetic tracks' mel cache went with them (before: one left a run)
        assert not list((tmp_path / "cache").glob("mels/*")), list((tmp_path / "cache").rglob("*"))[:5]


SCRIPTS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py"))

# Runs each (script, arguments) as `python benchmarks/SCRIPT.py ARGUMENTS` does (as __main__, its folder first on
# sys.path), one after the other in one process: torch and the project load once, not once a script.
RUN_EACH = """
import contextlib, io, json, os, runpy, sys, traceback
answers = []
for path, arguments in json.loads(sys.argv[1]):
    sys.argv, sys.path[0] = [path, *arguments], os.path.dirname(path)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
            code = 0
        except SystemExit as stop:
            code = stop.code
        except BaseException:
            code, _ = 1, traceback.print_exc()
    answers.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(answers))
"""


def run_each(runs: list[tuple[str, list[str]]]) -> list[dict]:
    """Exit code, stdout and stderr of each (script, arguments), run by RUN_EACH."""
    listed = [[str(REPO / "benchmarks" / f"{script}.py"), arguments] for script, arguments in runs]
    completed = subprocess.run([sys.executable, "-c", RUN_EACH, json.dumps(listed)], capture_output=True, text=True,
                               timeout=300, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(completed.stdout)


@pytest.fixture(scope="module")
def help_of_each_script():
    return dict(zip(SCRIPTS, run_each([(script, ["--help"]) for script in SCRIPTS])))


@pytest.mark.parametrize("script", SCRIPTS)
def test_benchmark_script_documents_its_options(script, help_of_each_script):
    """Every benchmark script starts and answers --help (fast); those that import the project at the
    top are thereby checked against today's code. The slow cases above run eight of them; bench_search
    needs finished searches (its savings on stored ones below; noise and replay on a real tiny search,
    slow), and bench_gpu (a GPU), bench_corpus (minutes) and corpus_baseline (the built corpus) are
    checked only here."""
    answer = help_of_each_script[script]
    assert answer["code"] == 0, answer["stderr"][-2000:]
    assert answer["stdout"].startswith("usage:")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["vicreg", "clustering"])
def test_bench_search_noise_trains_a_searchs_trials_again_and_its_seed_reproduces_them(method, tonal_dataset, tmp_path):
    """``bench_search.py noise`` on a finished tiny search: the search's own seed, in a process of its
    own outside Ray, gives each trial's recorded objective exactly (the search is reproducible trial by
    trial), and another seed gives other numbers. Clustering's space has fixed settings and values it
    derives from helper parameters, which the retrain must give as the search did."""
    env = {**os.environ, "MUSICSSL_CACHE": str(tmp_path / "cache"), "RAY_AUTH_MODE": "disabled",
           "PYTHONWARNINGS": "ignore"}
    search = [sys.executable, "-m", "hpsearch.run", method, "--trials", "2", "--concurrency", "1", "--name", "n",
              "--storage-dir", str(tmp_path), "--no-collapse-stop", "--data", str(tonal_dataset / "tracks.csv"),
              "--max-epochs", "2", "--steps-per-epoch", "3", "--batch-size", "8", "--probe-segments", "32",
              "--probe-segments-per-track", "1"]
    ran = subprocess.run(search, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert ran.returncode == 0, ran.stdout[-2000:] + ran.stderr[-2000:]
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_search.py"), "noise", str(tmp_path / "n"), "--seeds", "0,1",
         "--ranks", "1,2", "--csv", str(tmp_path / "seeds.csv")], capture_output=True, text=True, timeout=600, cwd=REPO,
        env=env,
    )
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "the search's seed reproduces the search's objective for 2 of 2 trials" in completed.stdout
    import pandas as pd

    trials = pd.read_csv(tmp_path / "n" / "trials.csv").set_index("trial")
    retrained = {}
    for line in completed.stdout.splitlines():  # "  #N seed S: VALUE (outcome, T s)"
        if line.startswith("  #") and " seed " in line:
            number, rest = line.strip()[1:].split(" seed ")
            seed, value = rest.split(":")
            retrained[int(number), int(seed)] = float(value.split()[0])
    assert sorted(retrained) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for number in (0, 1):
        assert retrained[number, 0] == pytest.approx(trials.loc[number, "objective"], abs=1e-4)
        assert retrained[number, 1] != pytest.approx(retrained[number, 0], abs=1e-4)

    # The runs it wrote judge replayed stopping rules by the trials' mean over the seeds.
    runs = pd.read_csv(tmp_path / "seeds.csv")
    assert sorted(zip(runs["trial"], runs["seed"])) == sorted(retrained)
    replayed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_search.py"), "replay", "--name", "n", "--storage-dir",
         str(tmp_path), "--seed-runs", str(tmp_path / "seeds.csv")], capture_output=True, text=True, timeout=600,
        cwd=REPO, env=env,
    )
    assert replayed.returncode == 0, replayed.stdout[-2000:] + replayed.stderr[-2000:]
    # The search's own values for its seed (which the retrained seed-0 runs reproduce), the runs' for seed 1.
    means = {number: (trials.loc[number, "objective"] + runs.set_index(["trial", "seed"]).loc[(number, 1), "objective"])
             / 2 for number in (0, 1)}
    best = max(means, key=means.get)
    assert f"the mean over seeds 0, 1 of 2 trials; its 5 best: #{best} ({means[best]:.4f}" in replayed.stdout

    # Runs of another search are refused, not averaged with this one's trial numbers.
    runs.assign(search="another").to_csv(tmp_path / "other.csv", index=False)
    refused = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_search.py"), "replay", str(tmp_path / "n"), "--seed-runs",
         str(tmp_path / "other.csv")], capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )
    assert refused.returncode == 2 and "--seed-runs: runs of ['another'], not of n" in refused.stderr

    # A search still running: a trial without epochs_run in trials.csv ("running") is left out of the
    # replay, and named, instead of failing it.
    trials.loc[1, ["outcome", "state", "epochs_run"]] = ["running", "RUNNING", None]
    trials.reset_index().to_csv(tmp_path / "n" / "trials.csv", index=False)
    running = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_search.py"), "replay", str(tmp_path / "n")],
        capture_output=True, text=True, timeout=600, cwd=REPO, env=env,
    )
    assert running.returncode == 0, running.stdout[-2000:] + running.stderr[-2000:]
    assert "left out (not finished): #1\n" in running.stdout
    assert "replaying stopping rules on n (1 trials, 2 epochs each)" in running.stdout


def _stored_search(folder: Path, epochs_run: list[float], objectives: list[float], progress: dict[int, list[dict]],
                   collapse_stop: bool, xs: list[float] | None = None, sampler: str = "tpe",
                   thresholds: dict | None = None) -> None:
    """A finished search's folder as hpsearch leaves it: search.json, trials.csv, summary.json, and per
    trial a folder with params.json and Ray's result.json (its epoch reports, one JSON line each)."""
    import json

    import pandas as pd

    from hpsearch.results import summarize
    from hpsearch.settings import SearchSettings

    settings = SearchSettings(method="vicreg", trials=len(epochs_run), max_epochs=4, collapse_stop=collapse_stop,
                              sampler=sampler, thresholds=thresholds or {})
    folder.mkdir(parents=True)
    settings.save(folder)
    stopped = [epochs < 4 for epochs in epochs_run]
    frame = pd.DataFrame({
        "trial": range(len(epochs_run)),
        "state": ["PRUNED" if stop else "COMPLETE" for stop in stopped],
        "outcome": ["collapsed" if stop else "complete" for stop in stopped],
        "objective": [float("nan") if stop else value for stop, value in zip(stopped, objectives)],
        "epochs_run": epochs_run, "seconds": 10.0, "param_x": xs or [0.5] * len(epochs_run),
    })
    frame.to_csv(folder / "trials.csv", index=False)
    summary = summarize(frame, "vicreg", "probe_map", len(epochs_run), 4).to_dict()
    (folder / "summary.json").write_text(json.dumps({**summary, "seconds": 60.0}))
    for number, rows in progress.items():
        trial = folder / f"trial-{number:04d}-abcd"
        trial.mkdir()
        (trial / "params.json").write_text(json.dumps({"optuna_trial": number}))
        (trial / "result.json").write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_benchmark_scripts_refuse_bad_values_in_one_line():
    """Before: --repeats 0, --threads 0, --steps 0, an unknown --method, --tracks 0 or a missing --corpus
    ended in a traceback (StatisticsError, ZeroDivisionError, ...) after minutes of work, or ran to
    meaningless numbers (bench_sampler --batches 0: every rate 0.0). Now exit 2 with the flag named, before
    any work."""
    cases = [
        ("bench_models", ["--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
        ("bench_models", ["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
        ("bench_audio", ["--repeats", "0"], "argument --repeats: expected a positive integer"),
        ("bench_collapse", ["--repeats", "0"], "argument --repeats: expected a positive integer"),
        ("bench_collapse", ["--method", "nosuch"], "argument --method: invalid choice: 'nosuch'"),
        ("bench_trainer", ["--steps", "0"], "argument --steps: expected a positive integer"),
        ("bench_trainer", ["--method", "nosuch"], "argument --method: invalid choice: 'nosuch'"),
        ("bench_downstream", ["--synthetic", "--tracks", "0"], "argument --tracks: expected a positive integer, got '0'"),
        ("bench_downstream", ["--synthetic", "--tracks", "18"], "--tracks 18: a full evaluation needs 19 or more"),
        ("bench_downstream", ["--repeats", "0"], "argument --repeats: expected a positive integer"),
        ("bench_sampler", ["--batches", "0"], "argument --batches: expected a positive integer"),
        ("bench_corpus", ["--songs", "0"], "argument --songs: expected a positive integer"),
        ("corpus_baseline", ["--corpus", "/no/such/corpus"], "--corpus /no/such/corpus: /no/such/corpus/tracks.csv"),
        ("bench_scale", ["--tracks", "10"], "argument --tracks: expected an integer >= 20, got '10'"),
        ("bench_scale", ["--seconds", "5"], "argument --seconds: expected 8 to 600 (two 4 s segments per track), got 5"),
        ("bench_probe_memory", ["--segments", "100"], "argument --segments: expected an integer >= 175, got '100'"),
        ("bench_probe_memory", ["--fractions", "0"], "argument --fractions: expected a fraction in (0, 1], got '0'"),
        ("bench_decode_memory", ["--repeats", "0"], "argument --repeats: expected a positive integer, got '0'"),
        ("bench_decode_memory", ["--minutes", "0"], "argument --minutes: expected 0.1 to 240, got 0"),
        ("bench_decode_memory", ["--formats", "aac"], "argument --formats: invalid choice: 'aac'"),
        ("bench_decode_memory", ["--rate", "96000"], "--formats mp3 takes --rate 8000, 11025, 12000, 16000, 22050, "
                                                     "24000, 32000, 44100, 48000 and --channels 1 or 2"),
        ("bench_decode_memory", ["--channels", "0"], "argument --channels: expected an integer in 1-8, got '0'"),
    ]
    for (script, arguments, message), answer in zip(cases, run_each([case[:2] for case in cases])):
        assert answer["code"] == 2 and message in answer["stderr"], (script, arguments, answer["stderr"][-800:])
        assert "Traceback" not in answer["stderr"]


def test_bench_search_savings_compares_the_two_searches_and_replays_the_rule_on_the_best(tmp_path):
    """``bench_search.py savings`` on two finished searches (it reuses them): the saved share is
    1 - trial-epochs with stopping / without, and each of the 5 best trials without stopping is judged by
    the stopping rule replayed on its epoch reports (grace 1, patience 2: collapsed from epoch 1, stopped
    at epoch 3)."""
    from test_hpsearch import COMPLETE, HEALTHY  # epoch records, written out once

    objectives = [0.5, 0.6, 0.7, 0.4, 0.3, 0.2]  # the 5 best: #2, #1, #0, #3, #4
    progress = {number: [{**(COMPLETE if number == 3 else HEALTHY), "epoch": epoch, "step": 15 * epoch}
                         for epoch in range(1, 5)] for number in range(6)}
    xs = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    _stored_search(tmp_path / "vicreg-6-4ep-nostop", [4.0] * 6, objectives, progress, collapse_stop=False, xs=xs)
    # TPE's sixth draw followed the outcomes, which differ: another x.
    _stored_search(tmp_path / "vicreg-6-4ep-stop", [4.0, 4.0, 4.0, 3.0, 4.0, 4.0], objectives, {}, collapse_stop=True,
                   xs=xs[:5] + [0.9])
    # A trial folder whose params.json a kill cut short (before: a JSONDecodeError ended the benchmark).
    (tmp_path / "vicreg-6-4ep-nostop" / "trial-0006-abcd").mkdir()
    (tmp_path / "vicreg-6-4ep-nostop" / "trial-0006-abcd" / "params.json").write_text('{"optuna_tr')
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_search.py"), "savings", "--method", "vicreg", "--trials", "6",
         "--max-epochs", "4", "--storage-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    out = completed.stdout
    assert "trial-epochs: with collapse stop 23.0, without 24.0: 4.2% saved (target >= 30%)" in out
    assert "would have stopped 1 of 6 trials" in out
    assert "  #3  0.4000  3  complete" in out and "  #2  0.7000  None  None" in out
    assert ("RESULT savings vicreg: 4.2% of trial-epochs saved (NOT met); 1 of the 5 best trials without stopping "
            "would have been stopped (NOT met)") in out
    # #0, #1, #2 and #4 drew the same x and completed in both, with the same objectives.
    assert "settings drawn: the same in 5 of 6 trial numbers; the 4 trials that ran to the end in both score within 0" in out
    assert "warning" not in out
    # A random pair that drew other settings is not the comparison it should be.
    settings = json.loads((tmp_path / "vicreg-6-4ep-stop" / "search.json").read_text())
    (tmp_path / "vicreg-6-4ep-stop" / "search.json").write_text(json.dumps({**settings, "sampler": "random"}))
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_search.py"), "savings", "--method", "vicreg", "--trials", "6",
         "--max-epochs", "4", "--storage-dir", str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert "warning: a random pair should draw the same settings in every trial" in completed.stdout


def _replayed_rows(out: str) -> dict[tuple[str, int, int], tuple[float, int, int]]:
    """``replay``'s table: (stop on, grace, patience) -> (% saved, trials stopped, best 5 stopped)."""
    rows = {}
    for line in out.splitlines():
        parts = line.rsplit(maxsplit=5)
        if len(parts) == 6 and parts[3].endswith("%"):
            label, grace, patience, saved, stopped, best = parts
            rows[label.strip(), int(grace), int(patience)] = (float(saved[:-1]), int(stopped), int(best))
    return rows


@pytest.mark.slow  # 22 s; run when bench_search.py's replay changes (it keeps the fast suite under 10 minutes)
def test_bench_search_replay_judges_by_the_searchs_thresholds_or_those_given(tmp_path):
    """``replay --threshold NAME=VALUE`` replays the rules with that collapse line in place of the
    search's own (its search.json, else the defaults). Trial #1, the second best, has embeddings whose
    mean cosine stays at 0.983 (every other metric healthy): above the default 0.98 line of complete
    collapse, so the default rule (grace 1, patience 2) stops it at epoch 3 of 4 and saves 1 of 24
    trial-epochs; grace 0 and patience 1 stop it at epoch 1 (3 of 24). At 0.985 nothing is stopped."""
    from test_hpsearch import HEALTHY

    objectives = [0.5, 0.6, 0.7, 0.4, 0.3, 0.2]  # the 5 best: #2, #1, #0, #3, #4
    progress = {number: [{**HEALTHY, "collapse_mean_cosine": 0.983 if number == 1 else 0.3, "epoch": epoch,
                          "step": 15 * epoch} for epoch in range(1, 5)] for number in range(6)}
    _stored_search(tmp_path / "default", [4.0] * 6, objectives, progress, collapse_stop=False)
    rows = _replayed_rows((replayed := _bench_search("replay", str(tmp_path / "default"))).stdout)
    assert replayed.returncode == 0, replayed.stdout[-2000:] + replayed.stderr[-2000:]
    assert "collapse thresholds" not in replayed.stdout  # the defaults
    assert rows["complete,cluster", 1, 2] == (pytest.approx(100 * 1 / 24, abs=0.05), 1, 1)
    assert rows["complete,cluster", 0, 1] == (pytest.approx(100 * 3 / 24, abs=0.05), 1, 1)
    assert rows["complete", 1, 2] == rows["complete,cluster", 1, 2]

    moved = _bench_search("replay", str(tmp_path / "default"), "--threshold", "complete_min_mean_cosine=0.985")
    assert moved.returncode == 0, moved.stdout[-2000:] + moved.stderr[-2000:]
    assert ("collapse thresholds: complete_min_mean_cosine=0.985 (--threshold); the others default"
            in moved.stdout)
    rows = _replayed_rows(moved.stdout)
    assert len(rows) == 45 and {value for key, value in rows.items() if "dimensional" not in key[0]} == {(0.0, 0, 0)}

    # A search run with the line at 0.985 is replayed at 0.985; --threshold moves it back.
    _stored_search(tmp_path / "own", [4.0] * 6, objectives, progress, collapse_stop=False,
                   thresholds={"complete_min_mean_cosine": 0.985})
    own = _bench_search("replay", str(tmp_path / "own"))
    assert "collapse thresholds: complete_min_mean_cosine=0.985 (the search's); the others default" in own.stdout
    assert _replayed_rows(own.stdout)["complete,cluster", 1, 2] == (0.0, 0, 0)
    back = _bench_search("replay", str(tmp_path / "own"), "--threshold", "complete_min_mean_cosine=0.98")
    assert _replayed_rows(back.stdout)["complete,cluster", 1, 2] == (pytest.approx(100 * 1 / 24, abs=0.05), 1, 1)
    # A search.json whose thresholds were edited by hand into ones that do not exist: named, no traceback.
    stored = json.loads((tmp_path / "own" / "search.json").read_text())
    (tmp_path / "own" / "search.json").write_text(json.dumps({**stored, "thresholds": {"complete_cosine": 0.9}}))
    broken = _bench_search("replay", str(tmp_path / "own"))
    assert broken.returncode == 2 and "its collapse thresholds {'complete_cosine': 0.9} are not valid" in broken.stderr
    assert "Traceback" not in broken.stderr
    # Bad input to noise: one line, exit 2 (before: exit 1, and a traceback for a --csv it cannot write).
    own = str(tmp_path / "own")
    for extra, message in [((), "is not a search's folder (no optuna.journal)"),
                           (("--csv", str(tmp_path / "no-such-folder" / "runs.csv")), "cannot write there"),
                           (("--ranks", "0", "--csv", str(tmp_path / "runs.csv")), "--ranks: ranks start at 1, got 0")]:
        refused = _bench_search("noise", own, *extra)
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        (tmp_path / "own" / "optuna.journal").touch()

    for extra, message in (
            (["--threshold", "complete_min_mean_cosine"], "--threshold takes NAME=VALUE"),
            (["--threshold", "complete_min_mean_cosine=high"], "'high' is not a number"),
            (["--threshold", "complete_cosine=0.9"], "unknown collapse threshold(s) complete_cosine; known: "),
            (["--threshold", "complete_min_mean_cosine=1.5"], "complete_min_mean_cosine must be in [-1, 1], got 1.5"),
    ):
        refused = _bench_search("replay", str(tmp_path / "default"), *extra)
        assert refused.returncode == 2 and message in refused.stderr, (extra, refused.stderr[-500:])
        assert "Traceback" not in refused.stderr
    refused = _bench_search("savings", "--storage-dir", str(tmp_path), "--threshold", "complete_min_mean_cosine=0.9")
    assert refused.returncode == 2 and "--threshold is for replay" in refused.stderr


def _bench_search_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_search", REPO / "benchmarks" / "bench_search.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _bench_search(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_search.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=REPO)


@pytest.mark.slow  # 13-15 s (about 12 processes); run when bench_search.py's savings or replay changes
def test_bench_search_savings_gives_both_searches_the_search_flags_and_names_them_by_tag(tmp_path):
    """``savings --search-flags=... --tag paper``: both searches get the extra hpsearch.run flags after the
    benchmark's own, and their runs are named METHOD-TRIALS[-Nep]-TAG-stop/-nostop; replay --tag reads
    the run without stopping. Flags the benchmark sets itself, a missing tag and a tag that is no folder
    name are refused (exit 2)."""
    from argparse import Namespace

    bench = _bench_search_module()
    args = Namespace(method="vicreg", trials=32, max_epochs=8, tag="paper", seed=0, storage_dir="/runs",
                     search_flags="--preset paper --gpus-per-trial 0.125")
    assert bench.run_stem(args) == "vicreg-32-8ep-paper"
    assert bench.run_stem(Namespace(method="vicreg", trials=64, max_epochs=None, tag=None)) == "vicreg-64"
    assert bench.savings_flags(args, "vicreg-32-8ep-paper-nostop", stop=False) == [
        "--trials", "32", "--name", "vicreg-32-8ep-paper-nostop", "--storage-dir", "/runs", "--seed", "0",
        "--max-epochs", "8", "--no-collapse-stop", "--preset", "paper", "--gpus-per-trial", "0.125"]
    assert bench.savings_flags(args, "vicreg-32-8ep-paper-stop", stop=True)[-5:] == [
        "8", "--preset", "paper", "--gpus-per-trial", "0.125"]

    # Finished tagged runs are reused, as untagged ones are; an untagged pair beside them is not read.
    from test_hpsearch import COMPLETE, HEALTHY

    objectives = [0.5, 0.6, 0.7, 0.4, 0.3, 0.2]
    progress = {number: [{**(COMPLETE if number == 3 else HEALTHY), "epoch": epoch, "step": 15 * epoch}
                         for epoch in range(1, 5)] for number in range(6)}
    _stored_search(tmp_path / "vicreg-6-4ep-paper-nostop", [4.0] * 6, objectives, progress, collapse_stop=False)
    _stored_search(tmp_path / "vicreg-6-4ep-paper-stop", [4.0, 4.0, 4.0, 3.0, 4.0, 4.0], objectives, {},
                   collapse_stop=True)
    (tmp_path / "vicreg-6-4ep-stop").write_text("not a search folder: never read")
    common = ["--method", "vicreg", "--trials", "6", "--max-epochs", "4", "--storage-dir", str(tmp_path), "--tag", "paper"]
    completed = _bench_search("savings", *common, "--search-flags=--preset paper")
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-2000:]
    assert "trial-epochs: with collapse stop 23.0, without 24.0: 4.2% saved (target >= 30%)" in completed.stdout
    replayed = _bench_search("replay", *common)
    assert replayed.returncode == 0, replayed.stdout[-2000:] + replayed.stderr[-2000:]
    assert "replaying stopping rules on vicreg-6-4ep-paper-nostop (6 trials, 4 epochs each)" in replayed.stdout

    for extra, message in (
            (["--search-flags=--preset paper"], "--search-flags changes the searches: name their runs with --tag"),
            (["--tag", "paper", "--search-flags=--seed=3 --preset paper"], "--search-flags: --seed is set by the benchmark"),
            (["--tag", "paper", "--search-flags=--trials 4"], "--search-flags: --trials is set by the benchmark"),
            (["--tag", "paper", "--search-flags=--trial 4"], "--search-flags: --trials is set by the benchmark"),
            (["--tag", "paper", "--search-flags=--preset 'paper"], "--search-flags: No closing quotation"),
            (["--tag", "a/b"], "--tag: letters, digits"),
    ):
        refused = _bench_search("savings", "--storage-dir", str(tmp_path), *extra)
        assert refused.returncode == 2 and message in refused.stderr, (extra, refused.stderr[-500:])
        assert "Traceback" not in refused.stderr
    refused = _bench_search("replay", "--storage-dir", str(tmp_path), "--tag", "paper", "--search-flags=--preset paper")
    assert refused.returncode == 2 and "--search-flags is for savings" in refused.stderr
    # A flag hpsearch.run refuses ends the benchmark with hpsearch.run's own message, before the second search.
    failed = _bench_search("savings", "--method", "vicreg", "--trials", "2", "--storage-dir", str(tmp_path / "bad"),
                           "--tag", "bad", "--search-flags=--preset nosuch")
    assert failed.returncode == 1 and "Traceback" not in failed.stderr, failed.stderr[-2000:]
    assert "vicreg-2-bad-stop: python -m hpsearch.run exited with 2 before its last trial finished" in failed.stderr
    assert "nosuch" in failed.stderr.splitlines()[-1]
    assert not (tmp_path / "bad" / "vicreg-2-bad-nostop.log").exists()


@pytest.mark.slow  # 17-19 s (about 10 processes); run when bench_search.py's checks or timing change
def test_bench_search_refuses_bad_input_in_one_line_and_times_only_the_default_search(tmp_path):
    """Before: a missing or foreign --seed-runs file, --trials -1 for overhead and the like ended in a
    traceback; report with no folder printed nothing; --trials 0 became 64; and timing reused any finished
    folder of the name it looks for, a 4-epoch search among them, as "the default vicreg search"."""
    from hpsearch.settings import SearchSettings

    _stored_search(tmp_path / "vicreg-6-nostop", [4.0] * 6, [0.5] * 6, {}, collapse_stop=False)
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for arguments, message in (
            (["replay", "--trials", "6", "--seed-runs", str(tmp_path / "missing.csv")],
             f"--seed-runs {tmp_path / 'missing.csv'}: cannot read it (No such file or directory)"),
            (["replay", "--trials", "6", "--seed-runs", str(tmp_path / "other.csv")],
             f"--seed-runs {tmp_path / 'other.csv'}: no trial, seed, objective column: pass files written by noise"),
            (["overhead", "--trials", "-1"], "argument --trials: expected a positive integer, got '-1'"),
            (["overhead", "--trials", "1"], "overhead needs --trials 2 or more"),
            (["replay", "--trials", "0"], "argument --trials: expected a positive integer, got '0'"),
            (["report"], "report takes the folders of finished searches"),
            (["timing", "--trials", "6", "--name", "vicreg-6-nostop"],
             f"{tmp_path / 'vicreg-6-nostop'} is not the default search (max_epochs=4, collapse_stop=False): pass "
             "--rerun, or --name for another folder"),
    ):
        refused = _bench_search(*arguments, "--storage-dir", str(tmp_path))
        assert refused.returncode == 2 and message in refused.stderr, (arguments, refused.stderr[-800:])
        assert "Traceback" not in refused.stderr
    # Its settings unreadable: said so (before the check, a traceback).
    folder = tmp_path / "vicreg-6-nostop"
    (folder / "search.json").write_text("{broken")
    refused = _bench_search("timing", "--trials", "6", "--name", "vicreg-6-nostop", "--storage-dir", str(tmp_path))
    assert refused.returncode == 2 and f"{folder / 'search.json'}: unreadable" in refused.stderr, refused.stderr[-800:]
    # The default search, finished: reused, its summary's seconds (60 s) reported as such; a setting older code
    # did not record is not held against it.
    SearchSettings(method="vicreg", trials=6).save(folder)
    settings = json.loads((folder / "search.json").read_text())
    del settings["reuse_actors"]
    (folder / "search.json").write_text(json.dumps(settings))
    timed = _bench_search("timing", "--trials", "6", "--name", "vicreg-6-nostop", "--storage-dir", str(tmp_path))
    assert timed.returncode == 0, timed.stderr[-2000:]
    assert "its summary's seconds, not the command's wall time" in timed.stdout
    assert "RESULT timing: 6-trial default vicreg search took 1.0 min (target <= 15 min: met)" in timed.stdout


@pytest.mark.slow
def test_bench_search_savings_runs_both_searches_with_the_search_flags(tmp_path):
    """A real savings benchmark of two one-trial searches with --search-flags: both searches store the
    flags' settings (2 steps of batch 8 per epoch) and the benchmark reports on them."""
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_search.py"), "savings", "--method", "byol", "--trials", "1",
         "--max-epochs", "1", "--tag", "tiny", "--storage-dir", str(tmp_path),
         "--search-flags=--steps-per-epoch 2 --batch-size 8 --probe-segments 64 --concurrency 1 --cpus-per-trial 1"],
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    for name in ("byol-1-1ep-tiny-stop", "byol-1-1ep-tiny-nostop"):
        settings = json.loads((tmp_path / name / "search.json").read_text())
        assert (settings["steps_per_epoch"], settings["batch_size"], settings["probe_segments"]) == (2, 8, 64)
        assert (settings["trials"], settings["max_epochs"], settings["seed"]) == (1, 1, 0)
        assert settings["collapse_stop"] == name.endswith("-stop")
    assert "RESULT savings byol: 0.0% of trial-epochs saved" in completed.stdout
