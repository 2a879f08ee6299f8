"""The collapse verdict on real training runs: configurations known to collapse are flagged within the
first epochs, by the trainer's verdict and by the search's stopping rule, and each method's tuned
defaults are not.

The slow cases train exactly as a search trial does (``hpsearch.trainable.build_train_config`` with
the search's default trial settings, pinned here: the embedded corpus, batch 32, 6 epochs of 15
steps, 256 probe segments, seed 0, one thread) and feed the search's :class:`CollapseMonitor` the
epoch records, as the trial's epoch-end hook does. With a grace of 1 epoch and a patience of 2, the
earliest the rule can fire is the end of epoch 3; every collapsing case must be stopped there.

After the last epoch a hook takes the method's collapse outputs on the probe set, and the test
recomputes the metrics from them with numpy, from their published definitions (tests/test_collapse.py), so the
logged numbers and the collapse signatures are checked against an independent computation.

Two collapsing cases also make the teacher follow the student quickly, because the collapse they
show needs a teacher that tracks the student. With the default EMA rate (0.996, cosine to 1) the
teacher moves only a sixth of the way towards the student in 90 steps (1 - prod(tau_k) = 0.167)
and stays close to its random initialisation, and regressing a near-random target does not
collapse in so short a run (measured: BYOL without predictor keeps projection RankMe ~19,
clustering without centring keeps ~40% of the prototypes in use). BYOL without predictor uses
``base_ema_rate=0`` (the target is the online network: SimSiam without predictor, which collapses
at once, Chen & He 2021); clustering without centring uses ``base_ema_rate=0.5``, past the fast end of
the clustering search space (0.9), and a learning rate of 3e-3.

Most collapsing cases lie outside the search spaces (a setting the space holds fixed, or a value past
a range's end). The last slow test trains a point inside each space, every sampled parameter given
(tests/test_study_spaces.py, ``COLLAPSING_POINTS``), so that each space is known to reach into collapse.

The fast smoke test pairs clustering with and without centring on the small tonal fixture.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from hpsearch.settings import TrialSettings
from hpsearch.stopping import COLLAPSE_TYPES, CollapseMonitor, CollapseStopRule
from hpsearch.trainable import build_train_config
from musicssl.train import TrainConfig, method_settings, train
from study_spaces import get_space
from test_study_spaces import COLLAPSING_POINTS, collapsing_trial_params  # the points, written out once

# The search's stopping rule, as the search applies it by default (stops on complete and cluster
# collapse), and the same rule told to stop on every type, dimensional and partial too
# (--stop-on complete,dimensional,cluster,partial).
STOP_RULE = CollapseStopRule()
STOP_RULE_EVERY_TYPE = CollapseStopRule(stop_on=COLLAPSE_TYPES)
EARLIEST_STOP_EPOCH = STOP_RULE.grace_epochs + STOP_RULE.patience_epochs
# The search's default trial settings (hpsearch.settings.TrialSettings), pinned so that the cases keep
# their meaning and their cost if the search's defaults move.
SEARCH_TRIAL = dict(max_epochs=6, steps_per_epoch=15, batch_size=32, probe_segments=256, seed=0, num_threads=1)

# The documented verdict thresholds (musicssl.collapse.CollapseThresholds), written out.
COMPLETE_MAX_L2_STD = 0.1
COMPLETE_MAX_RANKME = 1.5
COMPLETE_MIN_MEAN_COSINE = 0.98
DIMENSIONAL_MAX_RANK_FRACTION = 0.1
CLUSTER_MIN_OCCUPANCY = 0.1
CLUSTER_MAX_ASSIGNMENT_ENTROPY = 0.1
CLUSTER_MIN_EFFECTIVE_PROTOTYPES = 3.0
CLUSTER_MIN_SAMPLE_ENTROPY = 0.97


# ----------------------------------------------------------------------------------------------
# Metrics from their definitions, in numpy (float64)


def rankme(z: np.ndarray) -> float:
    """exp of the entropy of the normalised singular values (+1e-7), z not centred (Garrido et al. 2023)."""
    singular_values = np.linalg.svd(z, compute_uv=False)
    p = singular_values / singular_values.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def unit_rows(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def l2_std_scaled(z: np.ndarray) -> float:
    """SimSiam's mean per-dimension (unbiased) std of z / |z|, times sqrt(D)."""
    return float(unit_rows(z).std(axis=0, ddof=1).mean() * math.sqrt(z.shape[1]))


def mean_cosine_between_groups(z: np.ndarray, groups: np.ndarray) -> float:
    """Mean cosine over pairs of samples from different groups (probe tracks)."""
    u = unit_rows(z)
    cosines = u @ u.T
    different = groups[:, None] != groups[None, :]
    return float(cosines[different].mean())


def entropy(p: np.ndarray, axis: int) -> np.ndarray:
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(axis=axis)


def independent_metrics(outputs: dict[str, np.ndarray], groups: np.ndarray) -> dict[str, float]:
    """The collapse metrics the trainer logs, recomputed from the method's outputs with numpy."""
    z = outputs["embedding"]
    metrics = {
        "rankme_embedding": rankme(z),
        "rankme_embedding_norm": rankme(z) / min(z.shape),
        "l2_std_embedding": l2_std_scaled(z),
        "mean_cosine": mean_cosine_between_groups(z, groups),
    }
    if "projection" in outputs:
        metrics["rankme_projection"] = rankme(outputs["projection"])
        metrics["l2_std_projection"] = l2_std_scaled(outputs["projection"])
    if "assignment_probs" in outputs:
        p = outputs["assignment_probs"]
        p = p / p.sum(axis=1, keepdims=True)
        n, k = p.shape
        metrics["cluster_occupancy_attainable"] = len(np.unique(p.argmax(axis=1))) / min(n, k)
        metrics["assignment_entropy"] = float(entropy(p.mean(axis=0), axis=0) / math.log(k))
        metrics["effective_prototypes"] = float(np.exp(entropy(p.mean(axis=0), axis=0)))
        metrics["sample_entropy"] = float(entropy(p, axis=1).mean() / math.log(k))
    return metrics


# ----------------------------------------------------------------------------------------------
# One real run


SHOWN = ("rankme_embedding_norm", "l2_std_embedding", "mean_cosine", "rankme_projection", "l2_std_projection",
         "cluster_occupancy_attainable", "assignment_entropy", "effective_prototypes", "sample_entropy")


@dataclass
class Run:
    """A finished run, the search's monitor fed its epoch records, and its last collapse outputs."""

    result: Any
    monitor: CollapseMonitor
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    groups: np.ndarray | None = None

    @property
    def verdicts(self) -> list[str]:
        """The trainer's verdict at the end of each epoch (epoch 1 first)."""
        return [record["verdict"] for record in self.result.epochs]

    def independent(self) -> dict[str, float]:
        return independent_metrics(self.outputs, self.groups)

    def logged(self, name: str) -> float:
        return float(self.result.final[f"collapse_{name}"])

    def describe(self) -> str:
        """The verdict and the main metrics of every epoch, for assertion messages."""
        return "\n".join(
            f"epoch {record['epoch']}: {record['verdict']}, "
            + ", ".join(f"{name} {record['collapse_' + name]:.4g}" for name in SHOWN if "collapse_" + name in record)
            for record in self.result.epochs
        )


def run(config: TrainConfig, data, rule: CollapseStopRule = STOP_RULE) -> Run:
    """Train ``config`` with the search's monitor and an output capture as epoch-end hooks; the
    monitor ends the run when its rule fires, as in a search trial."""
    monitor = CollapseMonitor(rule)
    finished = Run(result=None, monitor=monitor)

    def judge(module, record: dict) -> None:
        monitor.update(record["epoch"], record["step"], record)
        if monitor.fired:
            module.trainer.should_stop = True

    def capture_last_outputs(module, record: dict) -> None:
        if record["epoch"] == config.max_epochs or module.trainer.should_stop:
            outputs = module.method.collapse_outputs(module.probe_mels)
            finished.outputs = {name: value.detach().double().cpu().numpy() for name, value in outputs.items()}
            finished.groups = module.probe_groups.cpu().numpy()

    finished.result = train(config, data=data, epoch_end_hooks=[judge, capture_last_outputs], progress_bar=False)
    return finished


def replayed_monitor(finished: Run, rule: CollapseStopRule) -> CollapseMonitor:
    """A monitor with ``rule`` fed a finished run's epoch records, as the search would have fed it."""
    monitor = CollapseMonitor(rule)
    for record in finished.result.epochs:
        monitor.update(record["epoch"], record["step"], record)
    return monitor


def search_trial_config(method: str, params: dict[str, Any]) -> TrainConfig:
    """The TrainConfig a search trial of ``method`` with sampled ``params`` would train; a setting that
    the space holds fixed (clustering's centring, BYOL's predictor), which a search refuses to sample,
    replaces the held value afterwards."""
    held = {name: value for name, value in params.items() if name in get_space(method).fixed}
    sampled = {name: value for name, value in params.items() if name not in held}
    config = build_train_config(TrialSettings(method=method, **SEARCH_TRIAL), sampled)
    config.method_params.update(held)
    method_settings(config)  # checked as build_train_config checks the sampled ones
    return config


def assert_logged_metrics_match_definitions(finished: Run) -> dict[str, float]:
    """The final logged metrics equal the numpy recomputation from the last outputs; returns the latter."""
    independent = finished.independent()
    for name, value in independent.items():
        assert finished.logged(name) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    return independent


def is_healthy(metrics: dict[str, float]) -> bool:
    """No rule of the documented verdict fires on ``metrics`` (numbers from independent_metrics)."""
    # The projection's rules apply to methods without prototypes only.
    prototypes = "assignment_entropy" in metrics
    complete = (
        metrics["l2_std_embedding"] < COMPLETE_MAX_L2_STD
        or metrics["rankme_embedding"] < COMPLETE_MAX_RANKME
        or metrics["mean_cosine"] > COMPLETE_MIN_MEAN_COSINE
        or (not prototypes and metrics.get("l2_std_projection", 1.0) < COMPLETE_MAX_L2_STD)
        or (not prototypes and metrics.get("rankme_projection", 2.0) < COMPLETE_MAX_RANKME)
    )
    cluster = (
        metrics.get("assignment_entropy", 1.0) < CLUSTER_MAX_ASSIGNMENT_ENTROPY
        # The count rule, also below sqrt(K): the mean assignment's entropy under half of log K.
        or (metrics.get("effective_prototypes", math.inf) < CLUSTER_MIN_EFFECTIVE_PROTOTYPES
            and metrics.get("assignment_entropy", 0.0) < 0.5)
        or metrics.get("sample_entropy", 0.0) > CLUSTER_MIN_SAMPLE_ENTROPY
    )
    partial = metrics.get("cluster_occupancy_attainable", 1.0) < CLUSTER_MIN_OCCUPANCY
    dimensional = metrics["rankme_embedding_norm"] < DIMENSIONAL_MAX_RANK_FRACTION
    return not (complete or cluster or partial or dimensional)


# ----------------------------------------------------------------------------------------------
# Fast smoke test: the tonal fixture, clustering with and without centring


def smoke_config(method: str = "clustering", learning_rate: float = 1e-3, **method_params) -> TrainConfig:
    return TrainConfig(
        method=method, preset="cpu", max_epochs=2, steps_per_epoch=20, batch_size=32, probe_segments=128,
        num_threads=1, seed=0, learning_rate=learning_rate, final_probe=False, method_params=method_params,
    )


def test_clustering_defaults_read_healthy_and_clustering_without_centring_collapsed(tonal_data):
    """Two 40-step runs at learning rate 3e-3: the defaults read "none" at the end, and without the
    centre (and with the teacher the student itself, EMA rate 0) one prototype takes most samples:
    "cluster". (Measured, seeds 0-2: the mean assignment rests on 1.0-2.0 effective prototypes at
    epochs 1 and 2; with the centre, 61 and 164 on seed 0. A teacher at EMA 0.5 is slower to get
    there: 3.4 at epoch 2 on seed 0 on one machine, above the rule's 3, and 2.6 on another.)"""
    healthy = run(smoke_config(learning_rate=3e-3), tonal_data)
    collapsed = run(smoke_config(learning_rate=3e-3, base_ema_rate=0.0, use_centering=False), tonal_data)

    assert healthy.result.verdict == "none", healthy.describe()
    healthy_metrics = assert_logged_metrics_match_definitions(healthy)
    assert is_healthy(healthy_metrics)

    assert collapsed.result.verdict == "cluster", collapsed.describe()
    collapsed_metrics = assert_logged_metrics_match_definitions(collapsed)
    # One-hot collapse: the mean assignment rests on one or two prototypes (the "cluster" rule), and
    # the argmax lands on a handful of them (which alone would read "partial").
    assert collapsed_metrics["effective_prototypes"] < CLUSTER_MIN_EFFECTIVE_PROTOTYPES
    assert collapsed_metrics["cluster_occupancy_attainable"] < CLUSTER_MIN_OCCUPANCY
    assert collapsed_metrics["cluster_occupancy_attainable"] < healthy_metrics["cluster_occupancy_attainable"] / 3
    # The backbone itself is not collapsed: only the prototype assignments are.
    assert collapsed_metrics["rankme_embedding_norm"] > DIMENSIONAL_MAX_RANK_FRACTION


def test_vicreg_without_its_regularisers_reads_dimensional_and_byol_without_predictor_complete(tonal_data):
    """The two other kinds of collapse in 40-step runs (learning rate 3e-3; measured on seeds 0-2: both
    read collapsed at both epochs, embedding RankMe / 128 at 0.03-0.05, BYOL's projection L2 std at
    0.03-0.08). VICReg with variance and covariance weights 0.001 keeps its embedding spread but on a
    few dimensions; BYOL with no predictor and its target the online network maps every input to one
    direction after the projector, while the backbone's embedding stays spread."""
    dimensional = run(smoke_config("vicreg", 3e-3, var_weight=0.001, cov_weight=0.001), tonal_data)
    assert dimensional.result.verdict == "dimensional", dimensional.describe()
    metrics = assert_logged_metrics_match_definitions(dimensional)
    assert metrics["rankme_embedding_norm"] < DIMENSIONAL_MAX_RANK_FRACTION
    assert metrics["l2_std_embedding"] > COMPLETE_MAX_L2_STD and metrics["rankme_embedding"] > COMPLETE_MAX_RANKME

    complete = run(smoke_config("byol", 3e-3, use_predictor=False, base_ema_rate=0.0), tonal_data)
    assert complete.result.verdict == "complete", complete.describe()
    metrics = assert_logged_metrics_match_definitions(complete)
    assert metrics["l2_std_projection"] < COMPLETE_MAX_L2_STD
    assert metrics["l2_std_embedding"] > COMPLETE_MAX_L2_STD


# ----------------------------------------------------------------------------------------------
# Slow: real search trials on the embedded corpus


@pytest.fixture(scope="module")
def corpus_data(tmp_path_factory):
    """The embedded corpus with the CPU preset's mel cache, built for these tests in a cache of their
    own (about a minute): what the machine's ~/.cache holds plays no part."""
    from musicssl.data.cache import LogMelConfig
    from musicssl.data.pipeline import prepare_data
    from musicssl.models import Backbone

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MUSICSSL_CACHE", str(tmp_path_factory.mktemp("cache")))
        return prepare_data("corpus", LogMelConfig(n_mels=Backbone(preset="cpu").config.n_mels), verbose=False)


METHODS = ("vicreg", "contrastive", "barlow_twins", "byol", "clustering")
HEALTHY_CASES = {
    **{f"{method}_defaults": (method, {}) for method in METHODS},
    # The partner of byol_without_predictor below: the same instant target, but with the predictor
    # (SimSiam's setting) it does not collapse, so the predictor is what the collapse case removes.
    "byol_target_is_online_network": ("byol", {"base_ema_rate": 0.0}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case_name", list(HEALTHY_CASES))
def test_healthy_configuration_is_never_stopped_as_collapsed(case_name, corpus_data):
    """Each method's defaults (and the BYOL control) train as a search trial without the stopping rule
    firing, and read "none" from the earliest epoch the rule could act on (epoch 3) to the end."""
    method, params = HEALTHY_CASES[case_name]
    # The strictest rule: the defaults are not even flagged as dimensionally collapsed.
    finished = run(search_trial_config(method, params), corpus_data, STOP_RULE_EVERY_TYPE)
    assert not finished.monitor.fired, (finished.monitor.stop_reasons, finished.describe())
    epochs_after = SEARCH_TRIAL["max_epochs"] - EARLIEST_STOP_EPOCH + 1
    assert finished.verdicts[EARLIEST_STOP_EPOCH - 1:] == ["none"] * epochs_after, finished.describe()
    # The search recomputes the verdict from the logged record; it agrees with the trainer's.
    assert finished.monitor.verdicts == finished.verdicts
    assert is_healthy(assert_logged_metrics_match_definitions(finished))


@dataclass(frozen=True)
class CollapseCase:
    method: str
    params: dict[str, Any]
    verdicts: frozenset[str]  # the verdicts the collapse may read as, from epoch 2 on
    rule: CollapseStopRule = STOP_RULE  # the rule that stops it (the search's default unless dimensional)


COLLAPSE_CASES = {
    # Invariance alone is minimised by a low-rank embedding: dimensional collapse.
    # The search's default rule records it and goes on; --stop-on ...,dimensional stops it.
    "vicreg_variance_and_covariance_near_zero": CollapseCase(
        "vicreg", {"var_weight": 0.01, "cov_weight": 0.01}, frozenset({"dimensional"}), STOP_RULE_EVERY_TYPE),
    # A teacher far softer than its student (no sharpening) gives near-uniform targets: uniform
    # collapse, seen as near-uniform assignments ("cluster"; the student's logits also become
    # constant, which the projection's L2-std rule called "complete" until 2026-12-04, after "cluster").
    # (With a teacher at 0.5, 10 times the student, the sample entropy hovered around its threshold,
    # 0.97, from epoch 2 on once each view passed the network on its own; at 1.0 it reads 0.98-0.998.)
    "clustering_teacher_far_hotter_than_student": CollapseCase(
        "clustering",
        {"teacher_temperature": 1.0, "teacher_temperature_start": 1.0, "teacher_warmup_epochs": 0.0,
         "student_temperature": 0.05},
        frozenset({"cluster"})),
    # Sharpening without centring: one prototype wins every sample (one-hot collapse). With a teacher at EMA
    # 0.5 and learning rate 3e-3: `CL CL CL` on seeds 0-2 (corpus version 2). With the space's fastest
    # teacher, EMA 0.9, the first epochs read partial (seed 0: P P P CL, seed 1: P P CL; on version 1 seed 0
    # read CL from epoch 1), and the default rule stops it at epoch 4-5.
    "clustering_without_centring": CollapseCase(
        "clustering", {"use_centering": False, "base_ema_rate": 0.5, "learning_rate": 3e-3}, frozenset({"cluster"})),
    # No predictor, target = online network: the projector maps everything to one direction.
    "byol_without_predictor": CollapseCase(
        "byol", {"use_predictor": False, "base_ema_rate": 0.0}, frozenset({"complete"})),
}


@pytest.mark.slow
@pytest.mark.parametrize("case_name", list(COLLAPSE_CASES))
def test_collapsing_configuration_is_flagged_and_stopped_at_the_earliest_epoch(case_name, corpus_data):
    """Each collapsing configuration reads collapsed from epoch 2 on and the search's rule stops it
    at epoch 3, the first epoch it may; the final metrics show the collapse's own signature."""
    case = COLLAPSE_CASES[case_name]
    finished = run(search_trial_config(case.method, case.params), corpus_data, case.rule)
    monitor = finished.monitor
    if "dimensional" in case.verdicts:
        # The search's default rule sees the same verdicts and does not stop on them.
        default = replayed_monitor(finished, STOP_RULE)
        assert default.verdicts == monitor.verdicts and not default.fired
    # The search's rule stops the trial at the first epoch it may act on, with the expected type.
    assert monitor.stop_epoch == EARLIEST_STOP_EPOCH, (monitor.verdicts, finished.describe())
    assert monitor.collapse_type in case.verdicts
    assert monitor.collapse_epoch <= STOP_RULE.grace_epochs + 1
    # The trainer's verdict: collapsed from epoch 2 on, and the search's recomputation agrees.
    assert set(finished.verdicts[1:]) <= case.verdicts, finished.describe()
    assert monitor.verdicts == finished.verdicts
    metrics = assert_logged_metrics_match_definitions(finished)
    assert not is_healthy(metrics)
    # The collapse signature of each case, from the independently computed metrics.
    signatures = {
        "vicreg_variance_and_covariance_near_zero":
            lambda m: m["rankme_embedding_norm"] < DIMENSIONAL_MAX_RANK_FRACTION,
        "clustering_teacher_far_hotter_than_student": lambda m: m["sample_entropy"] > CLUSTER_MIN_SAMPLE_ENTROPY,
        "clustering_without_centring":
            lambda m: m["effective_prototypes"] < CLUSTER_MIN_EFFECTIVE_PROTOTYPES
            and m["cluster_occupancy_attainable"] < CLUSTER_MIN_OCCUPANCY,
        "byol_without_predictor":
            lambda m: m["l2_std_projection"] < COMPLETE_MAX_L2_STD and m["l2_std_embedding"] > COMPLETE_MAX_L2_STD,
    }
    assert signatures[case_name](metrics), metrics


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(COLLAPSING_POINTS))
def test_every_search_space_holds_a_setting_that_collapses_within_a_trial(method, corpus_data):
    """The spaces reach into collapse: each one's collapsing point (test_study_spaces.py), trained as the
    search would train it, reads collapsed from epoch 2 on and a rule stopping every type stops it at epoch
    3; the default rule (complete and cluster only) stops those that read complete or cluster collapse."""
    _, verdicts = COLLAPSING_POINTS[method]
    config = search_trial_config(method, collapsing_trial_params(method))
    finished = run(config, corpus_data, STOP_RULE_EVERY_TYPE)
    assert set(finished.verdicts[1:]) <= verdicts, finished.describe()
    assert finished.monitor.stop_epoch == EARLIEST_STOP_EPOCH, (finished.monitor.verdicts, finished.describe())
    assert finished.monitor.collapse_type in verdicts
    default = replayed_monitor(finished, STOP_RULE)
    assert default.fired == (set(finished.verdicts[1:EARLIEST_STOP_EPOCH]) <= set(STOP_RULE.stop_on))
    assert not is_healthy(assert_logged_metrics_match_definitions(finished))
