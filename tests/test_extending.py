"""A sixth pretext task is two files and nothing else (README, "Adding a pretext task").

The README's two example files are written into a copy of ``musicssl`` and ``study_spaces``, put first on
``PYTHONPATH``, and the commands run on them in processes of their own (a search's Ray workers too), so the
example and the promise stay true as the code changes.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_FILES = ("src/musicssl/pretext/simsiam.py", "study_spaces/simsiam.py")


def readme_files() -> dict[str, str]:
    """The README's python blocks whose first line is ``# <path>``, by that path."""
    blocks = re.findall(r"^```python\n# (\S+)\n(.*?)^```$", (REPO / "README.md").read_text(), re.M | re.S)
    files = dict(blocks)
    assert len(files) == len(blocks), f"two README blocks for one file: {[path for path, _ in blocks]}"
    return files


def test_the_readme_holds_the_two_files_and_no_more():
    assert sorted(readme_files()) == sorted(EXAMPLE_FILES)


def extend(root: Path, files: dict[str, str]) -> dict[str, str]:
    """The environment of a checkout with ``files`` added: a copy, under ``root``, of the two packages a
    method extends (the other top-level packages are unchanged and come from the install)."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "src" / "musicssl", root / "src" / "musicssl", ignore=ignore)
    shutil.copytree(REPO / "study_spaces", root / "study_spaces", ignore=ignore)
    for path, text in files.items():
        assert not (root / path).exists(), f"{path} would replace a file of the project"
        (root / path).write_text(text)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)]),
            "RAY_AUTH_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def extended(tmp_path_factory) -> dict[str, str]:
    """The environment of a checkout with the README's method added."""
    return extend(tmp_path_factory.mktemp("extended"), readme_files())


def python(code: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def test_the_new_method_is_found_by_both_registries_and_its_loss_is_simsiams(extended, tmp_path):
    """In a process of its own: the registries list it, the search space maps a trial onto its settings, the
    cpu preset sizes its heads, and the training loss on two and three views is SimSiam's written out: the
    mean over every ordered pair of views of minus the cosine of one view's prediction and the other's
    projection (Chen & He, 2021, eq. 2; both directions for two views), with no gradient through the
    projection (the gradients of the heads and the backbone are those of the formula with it detached)."""
    code = """
        import torch, musicssl, study_spaces
        from musicssl.pretext.base import Progress
        from musicssl.pretext.registry import available_methods
        from musicssl.train import ConfigError, TrainConfig, build_method, check_config
        from study_spaces import available_spaces, get_space

        assert musicssl.__file__.startswith({root!r}), musicssl.__file__
        assert "simsiam" in available_methods() and "simsiam" in available_spaces()
        training, settings = get_space("simsiam").split({{"predictor_hidden_dim": 64, "learning_rate": 1e-3}})
        assert training == {{"learning_rate": 1e-3}} and settings == {{"predictor_hidden_dim": 64}}, (training, settings)

        torch.manual_seed(0)
        method = build_method(TrainConfig(method="simsiam", preset="cpu"))
        # the cpu preset's sizes: 256-d embedding, hidden 512, projection 1024, predictor 128
        assert method.projector.dims == (256, 512, 512, 1024) and method.predictor.dims == (1024, 128, 1024)
        assert not method.ema_teacher and not method.assigns_prototypes

        def cosine(a, b):
            return (a * b).sum(1) / (a.pow(2).sum(1).sqrt() * b.pow(2).sum(1).sqrt())

        def gradients():
            grads = [parameter.grad.clone() for parameter in method.parameters()]
            method.zero_grad()
            return grads

        for count in (2, 3):
            views = [torch.randn(4, 64, 126) for _ in range(count)]
            loss = method.training_loss(views, Progress(0, 10, 5))["loss"]
            loss.backward()
            trained = gradients()
            z = [method.projector(method.backbone(view)) for view in views]  # BatchNorm per view, as in training
            p = [method.predictor(projection) for projection in z]
            pairs = [(i, j) for i in range(count) for j in range(count) if i != j]
            expected = -sum(cosine(p[i], z[j].detach()).mean() for i, j in pairs) / len(pairs)
            expected.backward()
            assert torch.allclose(loss, expected, atol=1e-6), (count, loss, expected)
            # all parameters' gradients as one vector (a bias before a BatchNorm has a gradient of rounding only)
            a, b = torch.cat([g.flatten() for g in trained]), torch.cat([g.flatten() for g in gradients()])
            assert float((a - b).norm() / b.norm()) < 1e-5, (count, float((a - b).norm() / b.norm()))

        import musicssl.pretext.simsiam as module
        a, b = torch.randn(8, 16, requires_grad=True), torch.randn(8, 16, requires_grad=True)
        module.simsiam(a, b)["loss"].backward()
        assert a.grad is not None and b.grad is None
        try:
            check_config(TrainConfig(method="simsiam", precision="bf16-true"), devices=False)
        except ConfigError as error:
            assert "holds the weights in bfloat16" in str(error), error  # no EMA teacher named
        else:
            raise AssertionError("bf16-true accepted")
        module.SimSiam.ema_teacher = True  # the class says it, not a list of names in the trainer
        try:
            check_config(TrainConfig(method="simsiam", precision="bf16-true"), devices=False)
        except ConfigError as error:
            assert "holds the weights and simsiam's EMA teacher in bfloat16" in str(error), error
        else:
            raise AssertionError("bf16-true accepted")
        print("ok")
    """.format(root=extended["PYTHONPATH"].split(os.pathsep)[0])
    done = python(code, extended, tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def test_a_search_space_that_breaks_the_contract_is_one_line_naming_it(tmp_path):
    """Before: a space module that ``study_spaces`` refuses as it loads it (here a lambda for its space, which
    Ray Tune cannot pickle) ended ``hpsearch.run`` in a traceback. Now one line names the module and what to
    change, exit 2, before Ray starts."""
    files = {**readme_files(), "study_spaces/simsiam.py": 'METHOD = "simsiam"\nFIXED = {}\nspace = lambda trial: None\n'}
    env = extend(tmp_path / "checkout", files)
    done = subprocess.run([sys.executable, "-m", "hpsearch.run", "simsiam", "--trials", "1", "--storage-dir",
                           str(tmp_path / "runs")], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "python -m hpsearch.run: error: study_spaces.simsiam: space must be a named module-level function "
        "space(trial) -> dict | None"), done.stderr
    assert not (tmp_path / "runs").exists()


def test_a_method_setting_named_like_a_training_setting_is_refused_by_training_and_search(tmp_path):
    """Before: a Config field named like a training setting (here a teacher's ``warmup_epochs``) went to the
    method under ``--set`` and to the training in a search, silently. Now both commands refuse the method in
    one line that names the field and says to rename it, exit 2."""
    files = readme_files()
    path = "src/musicssl/pretext/simsiam.py"
    files[path] = files[path].replace("    predictor_hidden_dim: int = 512\n",
                                      "    predictor_hidden_dim: int = 512\n    warmup_epochs: float = 10.0\n")
    assert "warmup_epochs" in files[path]
    env = extend(tmp_path / "checkout", files)
    expected = ("error: musicssl.pretext.simsiam: SimSiamConfig has field(s) ['warmup_epochs'] named like training "
                "settings (musicssl.train.TrainConfig), which --set and a search could not tell apart; rename them "
                "in the method")
    for command in (["musicssl.train", "simsiam", "--max-epochs", "1", "--out", str(tmp_path / "run")],
                    ["hpsearch.run", "simsiam", "--trials", "1", "--storage-dir", str(tmp_path / "runs")]):
        done = subprocess.run([sys.executable, "-m", *command], capture_output=True, text=True, env=env, cwd=tmp_path,
                              timeout=300)
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
        assert expected in done.stderr.strip().splitlines()[-1], done.stderr[-3000:]
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_every_command_runs_the_new_method(extended, tonal_dataset, tmp_path):
    """``musicssl.train``, ``hpsearch.run`` (two trials on local Ray), ``analysis.sensitivity`` on that
    search and ``analysis.downstream`` on its best backbone, each in a process of its own, as a user who
    added the README's two files runs them."""
    env = {**extended, "MUSICSSL_CACHE": str(tmp_path / "cache")}
    data = ["--data", str(tonal_dataset / "tracks.csv")]
    tiny = ["--max-epochs", "2", "--steps-per-epoch", "3", "--batch-size", "8"]

    def run(*arguments: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", *arguments], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=900)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (arguments[0], done.stderr[-3000:])
        return done

    trained = run("musicssl.train", "simsiam", *data, *tiny, "--threads", "1", "--set", "probe_segments=32",
                  "--set", "predictor_hidden_dim=64", "--out", str(tmp_path / "run"))
    assert "simsiam: 2 epochs, 6 steps" in trained.stdout, trained.stdout[-2000:]
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"] == "simsiam" and config["method_config"]["predictor_hidden_dim"] == 64
    with open(tmp_path / "run" / "metrics.csv", newline="") as handle:
        epochs = list(csv.DictReader(handle))
    # minus a mean cosine; the collapse metrics of its embedding and projection each epoch
    assert [row["epoch"] for row in epochs] == ["1", "2"] and all(-1 <= float(row["train_loss"]) <= 1 for row in epochs)
    assert all(float(row["collapse_rankme_embedding"]) >= 1 and float(row["collapse_rankme_projection"]) >= 1
               for row in epochs), epochs
    assert (tmp_path / "run" / "backbone.pt").is_file()

    searched = run("hpsearch.run", "simsiam", "--trials", "2", "--concurrency", "2", *data, *tiny,
                   "--probe-segments", "32", "--probe-segments-per-track", "1", "--storage-dir",
                   str(tmp_path / "searches"), "--name", "simsiam-test")
    assert "simsiam: 2/2 trials finished" in searched.stdout, searched.stdout[-3000:]
    folder = tmp_path / "searches" / "simsiam-test"
    with open(folder / "trials.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 and {row["outcome"] for row in rows} <= {"complete", "collapsed", "diverged"}
    assert all(64 <= int(row["param_predictor_hidden_dim"]) <= 1024 for row in rows), rows
    assert all(0 < float(row["probe_map"]) <= 1 for row in rows if row["outcome"] == "complete")
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method"] == "simsiam" and summary["trials_finished"] == 2, summary
    assert 0 < summary["best_value"] <= 1 and set(summary["best_params"]) == {
        "predictor_hidden_dim", "learning_rate", "weight_decay"}, summary
    best = json.loads((folder / "best_config.json").read_text())
    assert best["train_config"]["method_params"]["predictor_hidden_dim"] == summary["best_params"]["predictor_hidden_dim"]
    assert (folder / "best_backbone.pt").is_file()

    run("analysis.sensitivity", str(folder), "--out", str(tmp_path / "report.html"))
    [experiment] = json.loads((tmp_path / "report.json").read_text())["experiments"]
    assert experiment["method"] == "simsiam" and experiment["trials"] == 2
    assert "predictor_hidden_dim" in experiment["sampled_parameters"], experiment["sampled_parameters"]

    evaluated = run("analysis.downstream", str(folder), "--no-baselines", "--classifiers", "linear",
                    "--fractions", "1", "--bootstrap", "20", "--no-cache", "--out", str(tmp_path / "evaluation"))
    assert re.search(r"\| simsiam \| linear \| 0\.\d{4} \[", evaluated.stdout), evaluated.stdout[-3000:]
