"""Label-based scores of frozen embeddings: macro ROC-AUC, macro mAP, a linear probe, a bootstrap.

The study's downstream protocol scores multi-label tagging by macro ROC-AUC and macro average
precision (mAP), and reports the mean of 50 resamples of 50 % of the test set. Both metrics are
undefined for a tag whose test labels are all one class; such tags are skipped and reported rather
than silently scored (sklearn 1.9 gives AP = 0 with no positives, 1 with no negatives, and a NaN
ROC-AUC that poisons the macro average).

The probe is one-vs-rest L2-regularised logistic regression (scikit-learn, lbfgs) on standardised
features: the convex counterpart of the study's linear layer trained with sigmoid + BCE (here with a
bias and an L2 penalty), so its score depends on the embedding and not on an optimiser's schedule.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
from scipy.stats import rankdata
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

__all__ = [
    "MacroScore",
    "ProbeResult",
    "BootstrapResult",
    "scorable_tags",
    "macro_roc_auc",
    "macro_average_precision",
    "fit_linear_probe",
    "bootstrap",
]


class MacroScore(NamedTuple):
    """A macro-averaged metric: ``value`` over the scorable tags, ``per_tag`` with NaN where skipped.

    Unpacks as ``value, per_tag = macro_roc_auc(...)``; ``skipped`` lists the skipped tag indices.
    """

    value: float
    per_tag: np.ndarray

    @property
    def skipped(self) -> np.ndarray:
        """Indices of the tags that had no positive or no negative example."""
        return np.flatnonzero(np.isnan(self.per_tag))


def _check_labels(name: str, labels: np.ndarray) -> np.ndarray:
    """Validate multi-label targets and return them as bool ``(examples, tags)``; 1-D is one tag."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        labels = labels[:, None]
    if labels.ndim != 2 or labels.shape[0] == 0:
        raise ValueError(f"{name} must have shape (examples, tags) with at least one example, got {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{name} must hold binary labels (0/1 or bool), one column per tag")
    return labels.astype(bool)


def _check_labels_and_scores(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and return ``(labels as bool (n, tags), scores as float64 (n, tags))``."""
    labels = _check_labels("y_true", y_true)
    scores = np.asarray(y_score, dtype=np.float64)
    if scores.ndim == 1:
        scores = scores[:, None]
    if labels.shape != scores.shape:
        raise ValueError(
            f"y_true and y_score must both have shape (examples, tags); got {np.shape(y_true)} and {np.shape(y_score)}"
        )
    if not np.isfinite(scores).all():
        raise ValueError("y_score contains NaN or inf; check the model's outputs")
    return labels, scores


def scorable_tags(y_true: np.ndarray) -> np.ndarray:
    """Boolean mask of the tags (columns) with at least one positive and one negative example."""
    labels = np.asarray(y_true)
    if labels.ndim == 1:
        labels = labels[:, None]
    positives = (labels == 1).sum(axis=0)
    return (positives > 0) & (positives < labels.shape[0])


def _macro(per_tag: np.ndarray, metric_name: str) -> MacroScore:
    if np.isnan(per_tag).all():
        raise ValueError(
            f"macro {metric_name} is undefined: no tag has both positive and negative examples in y_true"
        )
    return MacroScore(float(np.nanmean(per_tag)), per_tag)


def macro_roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> MacroScore:
    """Macro ROC-AUC over the tags with both classes in ``y_true``; others are NaN in ``per_tag``.

    Per tag, ROC-AUC is the Mann-Whitney statistic from mid-ranks (ties count one half), which is
    exactly the area under sklearn's ROC curve. Equals
    ``sklearn.metrics.roc_auc_score(y_true, y_score, average="macro")`` when every tag is scorable.
    """
    labels, scores = _check_labels_and_scores(y_true, y_score)
    mask = scorable_tags(labels)
    per_tag = np.full(labels.shape[1], np.nan)
    if mask.any():
        positive = labels[:, mask]
        ranks = rankdata(scores[:, mask], axis=0)  # average ranks for ties
        n_positive = positive.sum(axis=0)
        n_negative = positive.shape[0] - n_positive
        rank_sum = np.where(positive, ranks, 0.0).sum(axis=0)
        per_tag[mask] = (rank_sum - n_positive * (n_positive + 1) / 2.0) / (n_positive * n_negative)
    return _macro(per_tag, "ROC-AUC")


def _average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn's average precision for one tag: sum over distinct thresholds of
    (recall step) x (precision), with tied scores entering together."""
    order = np.argsort(-scores, kind="mergesort")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # last position of each group of tied scores: the points of the precision-recall curve
    group_end = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_positives = np.cumsum(sorted_labels)[group_end]
    predicted_positives = group_end + 1
    recall_step = np.diff(np.r_[0, true_positives]) / true_positives[-1]
    return float(np.sum(recall_step * true_positives / predicted_positives))


def macro_average_precision(y_true: np.ndarray, y_score: np.ndarray) -> MacroScore:
    """Macro average precision (mAP) over the tags with both classes in ``y_true``.

    Tags with no positive (AP undefined) or no negative (AP trivially 1) are skipped, NaN in
    ``per_tag``, by the same rule as :func:`macro_roc_auc`. Equals
    ``sklearn.metrics.average_precision_score(y_true, y_score, average="macro")`` when every tag is
    scorable.
    """
    labels, scores = _check_labels_and_scores(y_true, y_score)
    mask = scorable_tags(labels)
    per_tag = np.full(labels.shape[1], np.nan)
    for tag in np.flatnonzero(mask):
        per_tag[tag] = _average_precision(labels[:, tag], scores[:, tag])
    return _macro(per_tag, "average precision")


@dataclass(frozen=True)
class ProbeResult:
    """Scores of a linear probe on the evaluation set.

    ``roc_auc`` and ``average_precision`` are macro averages over ``per_tag_*`` without the
    ``skipped_tags`` (tags with one class in the evaluation labels). ``constant_tags`` had one class
    in the training labels: their prediction is that class's constant, so they score ROC-AUC 0.5 and
    AP = prevalence when scorable. ``scores`` are the predicted probabilities, ready for
    :func:`bootstrap`.
    """

    roc_auc: float
    average_precision: float
    per_tag_roc_auc: np.ndarray
    per_tag_average_precision: np.ndarray
    skipped_tags: np.ndarray
    constant_tags: np.ndarray
    unconverged_tags: np.ndarray
    scores: np.ndarray = field(repr=False)
    fit_seconds: float


def _check_features(name: str, features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2:
        raise ValueError(f"{name} must have shape (examples, features), got {features.shape}")
    if not np.isfinite(features).all():
        raise ValueError(f"{name} contains NaN or inf; check the embeddings (a collapsed or diverged model?)")
    return features


def fit_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    *,
    c: float = 1.0,
    max_iter: int = 500,
    standardize: bool = True,
    seed: int = 0,
    blas_threads: int | None = 1,
) -> ProbeResult:
    """Fit one logistic regression per tag on ``train_x`` and score it on ``valid_x``.

    ``c`` is sklearn's inverse L2 strength (the loss is ``c * sum(log-loss) + |w|^2 / 2``).
    With ``standardize`` the features are centred and scaled by the training set's statistics, so
    the result does not depend on the embedding's scale. A tag with a single class in ``train_y`` is
    predicted as that constant and listed in ``constant_tags``; tags whose fit hit ``max_iter`` are
    listed in ``unconverged_tags`` (one warning for all of them). ``seed`` goes to sklearn's
    ``random_state``; lbfgs itself is deterministic.

    ``blas_threads`` caps BLAS threads during the fit (``None``: leave the library default). One is
    fastest for probe-sized problems: OpenBLAS threads on matrices of a few hundred rows cost more than
    they give, 13x more on a busy 2-core machine (0.3 s vs 4 s for 420 x 512 x 40 tags). Raise it for
    hundreds of thousands of rows.
    """
    train_x = _check_features("train_x", train_x)
    valid_x = _check_features("valid_x", valid_x)
    train_labels = _check_labels("train_y", train_y)
    valid_labels = _check_labels("valid_y", valid_y)
    if train_x.shape[0] != train_labels.shape[0] or valid_x.shape[0] != valid_labels.shape[0]:
        raise ValueError(
            f"features and labels disagree on the number of examples: train {train_x.shape[0]} vs "
            f"{train_labels.shape[0]}, valid {valid_x.shape[0]} vs {valid_labels.shape[0]}"
        )
    if train_x.shape[1] != valid_x.shape[1] or train_labels.shape[1] != valid_labels.shape[1]:
        raise ValueError(
            f"train and valid disagree: features {train_x.shape[1]} vs {valid_x.shape[1]}, "
            f"tags {train_labels.shape[1]} vs {valid_labels.shape[1]}"
        )
    if c <= 0:
        raise ValueError(f"c (inverse regularisation strength) must be positive, got {c}")

    start = time.perf_counter()
    if standardize:
        scaler = StandardScaler().fit(train_x)
        train_x, valid_x = scaler.transform(train_x), scaler.transform(valid_x)
    n_tags = train_labels.shape[1]
    scores = np.empty((valid_x.shape[0], n_tags))
    constant, unconverged = [], []
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        for tag in range(n_tags):
            target = train_labels[:, tag]
            if target.all() or not target.any():
                scores[:, tag] = float(target[0])
                constant.append(tag)
                continue
            model = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)  # collected below, one warning in all
                model.fit(train_x, target)
            if model.n_iter_.max() >= max_iter:
                unconverged.append(tag)
            scores[:, tag] = model.predict_proba(valid_x)[:, 1]
    fit_seconds = time.perf_counter() - start
    if unconverged:
        warnings.warn(
            f"logistic regression hit max_iter={max_iter} for {len(unconverged)} of {n_tags} tags "
            f"({unconverged[:10]}...); raise max_iter or lower c",
            ConvergenceWarning,
            stacklevel=2,
        )

    roc_auc = macro_roc_auc(valid_labels, scores)
    average_precision = macro_average_precision(valid_labels, scores)
    return ProbeResult(
        roc_auc=roc_auc.value,
        average_precision=average_precision.value,
        per_tag_roc_auc=roc_auc.per_tag,
        per_tag_average_precision=average_precision.per_tag,
        skipped_tags=roc_auc.skipped,
        constant_tags=np.asarray(constant, dtype=np.int64),
        unconverged_tags=np.asarray(unconverged, dtype=np.int64),
        scores=scores,
        fit_seconds=fit_seconds,
    )


@dataclass(frozen=True)
class BootstrapResult:
    """Spread of a macro metric over random subsets of the test set.

    ``low``/``high`` bound the central 95 % of ``values`` (percentiles 2.5 and 97.5); ``std`` uses
    ``ddof=1``. ``tags`` are the tags passed to the metric (those scorable on the full set);
    ``rejected`` counts the draws thrown away because one of those tags lost all its positives or
    all its negatives (always 0 with ``on_missing_class="skip_tag"``).
    """

    mean: float
    std: float
    low: float
    high: float
    values: np.ndarray = field(repr=False)
    tags: np.ndarray = field(repr=False)
    rejected: int
    fraction: float
    seed: int

    def around(self, full: float, n_rows: int, bounds: tuple[float, float] | None = (0.0, 1.0)) -> tuple[float, float]:
        """A 95 % interval for ``full``, the metric on all ``n_rows`` test rows: the resamples' 2.5th and
        97.5th percentiles less their mean (which takes off the subsets' shift: average precision reads
        higher on fewer rows), scaled from a subset's spread to the whole set's and added to ``full``.

        A subset of m of n rows drawn without replacement spreads as sigma^2 (1/m - 1/n), the whole set
        as a classical bootstrap of it does, sigma^2 / n: the scale is sqrt(m / (n - m)), 1 for half
        the rows (the study's fraction). NaN for subsets of every row (no spread to scale).

        The ends are kept within ``bounds``, the values the metric can take (ROC-AUC's and average precision's
        [0, 1] by default; None for none): moved onto a score near 1, the spread can reach past it."""
        subset = int(round(self.fraction * n_rows))
        if subset >= n_rows or not math.isfinite(full):
            return (math.nan, math.nan)
        scale = math.sqrt(subset / (n_rows - subset))
        low, high = full + scale * (self.low - self.mean), full + scale * (self.high - self.mean)
        if bounds is not None:
            low, high = min(max(low, bounds[0]), bounds[1]), min(max(high, bounds[0]), bounds[1])
        return (low, high)


MetricName = Literal["roc_auc", "average_precision"]
_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], MacroScore]] = {
    "roc_auc": macro_roc_auc,
    "average_precision": macro_average_precision,
}


def bootstrap(
    y_true: np.ndarray,
    y_score: np.ndarray,
    metric: MetricName | Callable[[np.ndarray, np.ndarray], float | MacroScore],
    n_resamples: int = 50,
    fraction: float = 0.5,
    seed: int = 0,
    on_missing_class: Literal["redraw", "skip_tag"] = "redraw",
    max_rejections: int | None = None,
) -> BootstrapResult:
    """Evaluate ``metric`` on ``n_resamples`` random subsets of ``fraction`` of the test rows.

    A subset has ``round(fraction * N)`` rows, Python's rounding (halves to even: 0.5 x 33 rows gives
    16); the limited-data subsets of ``analysis.downstream`` round halves up instead.

    This is the study's protocol (50 resamples of 50 % of the test set): rows are drawn WITHOUT
    replacement within a resample, independently across resamples. With ``fraction = 0.5`` the
    variance of a mean over the subset approximately equals that of a mean over a classical
    with-replacement bootstrap of the full set (it is ``N / (N - 1)`` times that for N test rows), so
    ``std`` is comparable with a usual bootstrap standard error.

    Skipping rule: the tags scored are fixed up front as those with both classes in the full
    ``y_true`` (the rest cannot be scored by any subset; they are left out of ``tags``). With
    ``on_missing_class="redraw"`` (default) a draw in which one of these tags has no positive or no
    negative example is rejected and redrawn, so every value averages the same tags; rejections are
    counted in the result, and more than ``max_rejections`` (default ``100 * n_resamples``) raise,
    since the rarest tag then has too few positives for this ``fraction``. Test sets of the real
    datasets have tens of positives per tag and never trigger it. With ``"skip_tag"`` every draw is
    kept and the metric's own per-tag skipping applies (the built-in metrics skip such tags, so
    values may average different tag subsets); use it for small test sets with very rare tags.

    ``metric`` is ``"roc_auc"``, ``"average_precision"`` or a callable ``(y_true, y_score)`` returning
    a float or a :class:`MacroScore`.
    """
    labels, scores = _check_labels_and_scores(y_true, y_score)
    if isinstance(metric, str) and metric not in _METRICS:
        raise ValueError(f"metric must be one of {sorted(_METRICS)} or a callable, got {metric!r}")
    metric_function = _METRICS[metric] if isinstance(metric, str) else metric
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    n_rows = labels.shape[0]
    subset_size = int(round(fraction * n_rows))
    if subset_size < 2:
        raise ValueError(f"fraction={fraction} of {n_rows} rows leaves {subset_size}; need at least 2 rows")
    tags = np.flatnonzero(scorable_tags(labels))
    if len(tags) == 0:
        raise ValueError("no tag has both positive and negative examples in y_true; nothing to bootstrap")
    # the metric sees 0/1 integers, as sklearn's metrics expect
    labels, scores = labels[:, tags].astype(np.int64), scores[:, tags]
    if on_missing_class not in ("redraw", "skip_tag"):
        raise ValueError(f"on_missing_class must be 'redraw' or 'skip_tag', got {on_missing_class!r}")
    max_rejections = 100 * n_resamples if max_rejections is None else max_rejections

    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    rejected = 0
    accepted = 0
    while accepted < n_resamples:
        rows = rng.choice(n_rows, size=subset_size, replace=False)
        if on_missing_class == "redraw" and not scorable_tags(labels[rows]).all():
            rejected += 1
            if rejected > max_rejections:
                positives = labels.sum(axis=0)
                raise ValueError(
                    f"more than {max_rejections} subsets of {subset_size} rows left a tag without positives "
                    f"or negatives (rarest tag: {positives.min()} positives in {n_rows} rows); use a larger "
                    "fraction, drop the rarest tags, or pass on_missing_class='skip_tag'"
                )
            continue
        result = metric_function(labels[rows], scores[rows])
        values[accepted] = result.value if isinstance(result, MacroScore) else float(result)
        accepted += 1

    low, high = np.percentile(values, [2.5, 97.5])
    return BootstrapResult(
        mean=float(values.mean()),
        std=float(values.std(ddof=1)) if n_resamples > 1 else 0.0,
        low=float(low),
        high=float(high),
        values=values,
        tags=tags,
        rejected=rejected,
        fraction=fraction,
        seed=seed,
    )
