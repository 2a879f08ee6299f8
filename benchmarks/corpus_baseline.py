"""Baseline tagging difficulty of the embedded corpus: a linear probe on log-mel statistics.

Each track becomes 256 numbers: the mean and standard deviation over time of each of its 128 log-mel
bands (musicssl.audio.LogMel on the peak-normalised track, the study's front-end). A one-vs-rest
logistic regression (scikit-learn) is trained on the train split, its inverse regularisation C
chosen on the valid split, and scored on the test split: macro ROC-AUC and mAP per tag group.

The corpus is meant to be neither trivial (a group at ROC-AUC ~1.0 means a spectral shortcut gives
its tags away) nor hopeless (~0.5 means the tags are not in the audio). Roughly 0.65-0.92 per group
is the target for this hand-made-features baseline; learned embeddings should beat it.

    python benchmarks/corpus_baseline.py                      # default corpus (built if missing)
    python benchmarks/corpus_baseline.py --corpus DIR         # any folder with a tracks.csv
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from musicssl.audio import LogMel, load_audio
from musicssl.corpus import ensure_corpus
from musicssl.data.index import TrackIndex, TrackIndexError, tag_group

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def track_features(index: TrackIndex, front_end: LogMel) -> np.ndarray:
    """Mean and std over time of each log-mel band, per track: shape (tracks, 2 * n_mels)."""
    features = []
    with torch.inference_mode():
        for path in index.paths:
            audio = load_audio(path)
            audio = audio / max(float(np.abs(audio).max()), 1e-8)
            mel = front_end(torch.from_numpy(audio)).numpy()
            features.append(np.concatenate([mel.mean(axis=1), mel.std(axis=1)]))
    return np.stack(features)


def fit_probes(train_x: np.ndarray, train_y: np.ndarray, c: float) -> list[LogisticRegression | float]:
    """One logistic regression per tag; a tag with one class in training gets its constant rate."""
    probes: list[LogisticRegression | float] = []
    for column in range(train_y.shape[1]):
        labels = train_y[:, column]
        if labels.min() == labels.max():
            probes.append(float(labels[0]))
            continue
        probes.append(LogisticRegression(C=c, max_iter=5000).fit(train_x, labels))
    return probes


def predict(probes: list[LogisticRegression | float], x: np.ndarray) -> np.ndarray:
    return np.stack(
        [np.full(len(x), probe) if isinstance(probe, float) else probe.predict_proba(x)[:, 1] for probe in probes], axis=1
    )


def scores_by_group(labels: np.ndarray, scores: np.ndarray, tag_names: list[str]) -> dict[str, tuple[float, float, int]]:
    """Macro ROC-AUC and mAP per tag group (and ``all``) over the tags with both classes present."""
    per_tag: dict[str, list[tuple[float, float]]] = {}
    for column, tag in enumerate(tag_names):
        truth = labels[:, column]
        if truth.min() == truth.max():
            continue
        auc = roc_auc_score(truth, scores[:, column])
        ap = average_precision_score(truth, scores[:, column])
        per_tag.setdefault(tag_group(tag), []).append((auc, ap))
        per_tag.setdefault("all", []).append((auc, ap))
    return {group: (float(np.mean([v[0] for v in values])), float(np.mean([v[1] for v in values])), len(values)) for group, values in per_tag.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=None, help="corpus folder (default: ensure_corpus() default, 600 x 30 s, seed 0)")
    parser.add_argument("--per-tag", action="store_true", help="also print ROC-AUC and AP of every tag")
    args = parser.parse_args()
    corpus = args.corpus if args.corpus is not None else ensure_corpus()
    try:
        index = TrackIndex.from_csv(corpus / "tracks.csv")
    except (OSError, TrackIndexError) as error:  # a wrong folder: one line, exit 2
        parser.error(f"--corpus {corpus}: {error}")
    started = time.perf_counter()
    front_end = LogMel()
    features = track_features(index, front_end)
    feature_seconds = time.perf_counter() - started
    labels = index.labels()
    splits = index.tracks["split"].to_numpy()
    train, valid, test = (splits == name for name in ("train", "valid", "test"))
    scaler = StandardScaler().fit(features[train])
    x = scaler.transform(features)

    best_c, best_auc = C_GRID[0], -1.0
    for c in C_GRID:
        valid_auc = scores_by_group(labels[valid], predict(fit_probes(x[train], labels[train], c), x[valid]), index.tag_names)["all"][0]
        if valid_auc > best_auc:
            best_c, best_auc = c, valid_auc
    test_scores = predict(fit_probes(x[train], labels[train], best_c), x[test])
    table = scores_by_group(labels[test], test_scores, index.tag_names)

    print(f"corpus: {corpus} ({len(index)} tracks: {train.sum()} train / {valid.sum()} valid / {test.sum()} test)")
    print(f"features: mean+std of 128 log-mel bands per track ({feature_seconds:.1f} s); probe: logistic regression, C={best_c} (valid)")
    print()
    print("| tag group | tags | macro ROC-AUC | macro mAP | positive rate |")
    print("|---|---|---|---|---|")
    groups = index.tag_groups
    for group in [*groups, "all"]:
        if group not in table:
            continue
        auc, ap, count = table[group]
        columns = [index.tag_names.index(tag) for tag in (groups[group] if group != "all" else index.tag_names)]
        rate = float(labels[test][:, columns].mean())
        print(f"| {group} | {count} | {auc:.3f} | {ap:.3f} | {rate:.3f} |")
    if args.per_tag:
        print()
        print("| tag | test positives | ROC-AUC | AP |")
        print("|---|---|---|---|")
        for column, tag in enumerate(index.tag_names):
            truth = labels[test][:, column]
            if truth.min() != truth.max():
                auc = roc_auc_score(truth, test_scores[:, column])
                ap = average_precision_score(truth, test_scores[:, column])
                print(f"| {tag} | {int(truth.sum())} | {auc:.3f} | {ap:.3f} |")


if __name__ == "__main__":
    main()
