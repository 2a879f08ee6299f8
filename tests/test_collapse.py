"""Collapse metrics against their published definitions written out here in numpy/scipy, on
synthetic embeddings whose collapse is known by construction; the verdict on each kind of collapse;
closed forms for alignment and uniformity; low-precision inputs and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import pdist
from scipy.special import i0
from scipy.stats import entropy as scipy_entropy

from musicssl.collapse import (
    CollapseThresholds,
    CollapseType,
    alignment,
    assignment_entropy,
    cluster_occupancy,
    collapse_diagnosis,
    collapse_findings,
    collapse_metrics,
    collapse_verdict,
    effective_rank,
    l2_normalized_std,
    mean_cosine_similarity,
    mean_sample_entropy,
    spectrum,
    teacher_student_cosine_gap,
    uniformity,
)

# --------------------------------------------------------------------------------------------------
# Independent definitions (from the papers each metric's docstring cites), in float64 numpy


def rankme_reference(z: np.ndarray, eps: float = 1e-7) -> float:
    """Garrido et al. 2023: p_k = s_k / sum(s) + eps, rank = exp(-sum p_k log p_k)."""
    s = np.linalg.svd(np.asarray(z, dtype=np.float64), compute_uv=False)
    p = s / s.sum() + eps
    return float(np.exp(-np.sum(p * np.log(p))))


def unit_rows(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, dtype=np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def l2_std_reference(z: np.ndarray) -> float:
    """SimSiam: mean over dimensions of the (unbiased) std over samples of z / |z|."""
    return float(unit_rows(z).std(axis=0, ddof=1).mean())


def alignment_reference(a: np.ndarray, b: np.ndarray, alpha: float = 2.0) -> float:
    """Wang & Isola 2020: E |f(x) - f(y)|^alpha over positive pairs."""
    return float(np.mean(np.linalg.norm(unit_rows(a) - unit_rows(b), axis=1) ** alpha))


def uniformity_reference(z: np.ndarray, t: float = 2.0) -> float:
    """Wang & Isola 2020: log E exp(-t |f(x) - f(y)|^2) over distinct pairs (their pdist form)."""
    return float(np.log(np.mean(np.exp(-t * pdist(unit_rows(z), "sqeuclidean")))))


def mean_cosine_reference(z: np.ndarray, groups: np.ndarray | None = None) -> float:
    u = unit_rows(z)
    cosines = u @ u.T
    different = ~np.eye(len(u), dtype=bool) if groups is None else groups[:, None] != groups[None, :]
    return float(cosines[different].mean())


def occupancy_reference(p: np.ndarray) -> float:
    return len(np.unique(np.argmax(p, axis=1))) / p.shape[1]


def mean_assignment_entropy_reference(p: np.ndarray) -> float:
    return float(scipy_entropy(p.mean(axis=0)) / np.log(p.shape[1]))


def sample_entropy_reference(p: np.ndarray) -> float:
    return float(np.mean([scipy_entropy(row) for row in p]) / np.log(p.shape[1]))


def covariance_eigenvalues_reference(z: np.ndarray) -> np.ndarray:
    """Jing et al. 2022: eigenvalues of the embedding covariance, sorted descending."""
    return np.sort(np.linalg.eigvalsh(np.cov(np.asarray(z, dtype=np.float64), rowvar=False)))[::-1]


# --------------------------------------------------------------------------------------------------
# Synthetic embeddings


def gaussian(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def low_rank(n: int, d: int, rank: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=generator) @ torch.randn(rank, d, generator=generator)


def softmax_assignments(n: int, k: int, scale: float, seed: int = 0) -> torch.Tensor:
    logits = scale * torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return torch.softmax(logits, dim=1)


# --------------------------------------------------------------------------------------------------
# Effective rank and spectrum


def test_effective_rank_matches_the_definition_on_random_matrices() -> None:
    for n, d, seed in [(300, 40, 1), (50, 120, 2), (256, 256, 3)]:
        z = gaussian(n, d, seed) * torch.linspace(0.01, 3.0, d)  # uneven spectrum
        assert effective_rank(z) == pytest.approx(rankme_reference(z.numpy()), rel=1e-5)
        expected = rankme_reference(z.numpy())
        assert effective_rank(z, normalize=True) == pytest.approx(expected / min(n, d), rel=1e-5)


def test_effective_rank_of_isotropic_data_is_close_to_the_dimension() -> None:
    z = gaussian(2048, 64)
    rank = effective_rank(z)
    assert 0.97 * 64 < rank <= 64
    assert effective_rank(z, normalize=True) == pytest.approx(rank / 64)


def test_effective_rank_of_rank_four_and_rank_one_data() -> None:
    rank_four = low_rank(2048, 64, 4)
    assert effective_rank(rank_four) == pytest.approx(4.0, rel=0.1)
    assert effective_rank(rank_four) == pytest.approx(rankme_reference(rank_four.numpy()), rel=1e-3)
    assert effective_rank(low_rank(2048, 64, 1)) == pytest.approx(1.0, abs=1e-3)
    constant = torch.ones(100, 32) * torch.arange(32.0)
    assert effective_rank(constant) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.zeros(10, 8)) == 0.0


def test_spectrum_matches_covariance_eigenvalues() -> None:
    z = low_rank(500, 48, 6, seed=4) + 1e-3 * gaussian(500, 48, seed=5)
    values = spectrum(z).numpy()
    expected = covariance_eigenvalues_reference(z.numpy())
    assert values.shape == (48,)
    assert np.all(np.diff(values) <= 0)
    np.testing.assert_allclose(values[:6], expected[:6], rtol=1e-4)
    # The collapsed tail: 1e-6 (the noise variance) rather than float32 round-off, within 20%.
    np.testing.assert_allclose(values[6:], expected[6:], rtol=0.2)
    assert values[6:].max() < 1e-5 * values[0]
    # Fewer samples than dimensions: the covariance has rank N - 1, the rest is exactly zero.
    few = spectrum(gaussian(10, 30))
    assert few.shape == (30,) and torch.all(few[10:] == 0) and few[8] > 0


# --------------------------------------------------------------------------------------------------
# Spread, alignment and uniformity


def test_l2_normalized_std_matches_the_definition_and_scales_to_one() -> None:
    z = gaussian(2048, 64) + 0.3
    assert l2_normalized_std(z) == pytest.approx(l2_std_reference(z.numpy()), rel=1e-5)
    isotropic = gaussian(2048, 64)
    assert l2_normalized_std(isotropic) == pytest.approx(1 / math.sqrt(64), rel=0.03)
    assert l2_normalized_std(isotropic, scale_by_sqrt_dim=True) == pytest.approx(1.0, abs=0.03)
    assert l2_normalized_std(torch.ones(50, 16) * 3.0) == pytest.approx(0.0, abs=1e-6)


def test_alignment_matches_the_definition_and_known_values() -> None:
    a, b = gaussian(400, 32, 1), gaussian(400, 32, 2)
    assert alignment(a, a) == pytest.approx(0.0, abs=1e-10)
    assert alignment(a, 5.0 * a) == pytest.approx(0.0, abs=1e-10)  # scale does not matter
    assert alignment(a, -a) == pytest.approx(4.0, rel=1e-6)  # antipodal: |u - (-u)|^2 = 4
    assert alignment(a, b) == pytest.approx(alignment_reference(a.numpy(), b.numpy()), rel=1e-5)
    assert alignment(a, b, alpha=1.0) == pytest.approx(
        alignment_reference(a.numpy(), b.numpy(), alpha=1.0), rel=1e-5
    )
    # Every pair rotated by theta on the circle: |u_a - u_b|^2 = 2 - 2 cos(theta).
    angles = torch.rand(300, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 * math.pi
    theta = 0.7
    on_circle = torch.stack([angles.cos(), angles.sin()], dim=1)
    rotated = torch.stack([(angles + theta).cos(), (angles + theta).sin()], dim=1)
    assert alignment(on_circle, rotated) == pytest.approx(2 - 2 * math.cos(theta), rel=1e-5)


def test_uniformity_matches_the_definition_and_closed_forms() -> None:
    z = gaussian(300, 16) + 0.5
    assert uniformity(z) == pytest.approx(uniformity_reference(z.numpy()), abs=1e-5)
    assert uniformity(z, t=0.5) == pytest.approx(uniformity_reference(z.numpy(), t=0.5), abs=1e-5)
    # Uniform on the circle: E exp(-2 |x - y|^2) = E exp(-4 + 4 cos(phi)) = exp(-4) I_0(4).
    n = 2000
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    circle = torch.stack([angles.cos(), angles.sin()], dim=1)
    assert uniformity(circle) == pytest.approx(math.log(i0(4.0)) - 4.0, abs=5e-3)
    # Uniform on a high-dimensional sphere: cos ~ N(0, 1/d), so uniformity ~ -4 + 8/d.
    # Seeds 0-4 give -3.98401 to -3.98461; the 8/d term (0.0156) is far outside that tolerance.
    assert uniformity(gaussian(1024, 512)) == pytest.approx(-4.0 + 8.0 / 512, abs=0.002)
    # Complete collapse: every distance 0.
    assert uniformity(torch.ones(64, 8)) == pytest.approx(0.0, abs=1e-6)


def test_uniformity_in_blocks_matches_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    import musicssl.collapse as collapse

    z = gaussian(257, 12, seed=9)
    whole = uniformity(z)
    monkeypatch.setattr(collapse, "_PAIRWISE_BLOCK_ENTRIES", 257 * 10)  # blocks of 10 rows, last one 7
    assert uniformity(z) == pytest.approx(whole, abs=1e-6)
    assert whole == pytest.approx(uniformity_reference(z.numpy()), abs=1e-5)


def test_mean_cosine_similarity_over_samples_and_over_groups() -> None:
    z = gaussian(120, 24, 3) + 0.4
    assert mean_cosine_similarity(z) == pytest.approx(mean_cosine_reference(z.numpy()), abs=1e-6)
    groups = torch.arange(120) // 4  # 30 tracks of 4 segments each
    assert mean_cosine_similarity(z, groups) == pytest.approx(
        mean_cosine_reference(z.numpy(), groups.numpy()), abs=1e-6
    )
    # Segments identical within a track, orthogonal across tracks: 1 overall-ish, 0 across tracks.
    tracks = torch.eye(30).repeat_interleave(4, dim=0)
    assert mean_cosine_similarity(tracks, groups) == pytest.approx(0.0, abs=1e-9)
    assert mean_cosine_similarity(tracks) == pytest.approx(30 * 4 * 3 / (120 * 119))
    assert mean_cosine_similarity(torch.ones(10, 3)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one group"):
        mean_cosine_similarity(z, torch.zeros(120, dtype=torch.long))


def test_teacher_student_gap() -> None:
    s, t = gaussian(200, 16, 1), gaussian(200, 16, 2)
    expected = 1 - np.mean(np.sum(unit_rows(s.numpy()) * unit_rows(t.numpy()), axis=1))
    assert teacher_student_cosine_gap(s, t) == pytest.approx(expected, abs=1e-6)
    assert teacher_student_cosine_gap(s, 2 * s) == pytest.approx(0.0, abs=1e-6)
    assert teacher_student_cosine_gap(s, -s) == pytest.approx(2.0, abs=1e-6)


@pytest.mark.parametrize("scale", [1e20, 1e-20])
def test_the_spread_metrics_hold_for_embeddings_far_from_unit_scale(scale: float) -> None:
    """Embeddings with entries of 1e20 (a run blowing up, still finite in float32) or 1e-20: in float32 a
    row's squared norm overflows or falls under F.normalize's floor, so normalising gave zero (or far too
    short) rows, and healthy isotropic embeddings read as complete collapse (L2 std 0, uniformity 0). The
    references compute in float64, where neither happens."""
    base = gaussian(256, 64, 5) + 0.2
    z = base * scale
    assert torch.isfinite(z).all()
    reference = z.double().numpy()
    groups = torch.arange(256) // 2
    assert l2_normalized_std(z) == pytest.approx(l2_std_reference(reference), rel=1e-4)
    assert uniformity(z) == pytest.approx(uniformity_reference(reference), abs=1e-4)
    assert mean_cosine_similarity(z, groups) == pytest.approx(
        mean_cosine_reference(reference, groups.numpy()), abs=1e-5)
    other = gaussian(256, 64, 6) * scale
    assert alignment(z, other) == pytest.approx(alignment_reference(reference, other.double().numpy()), rel=1e-4)
    expected_gap = 1 - np.mean(np.sum(unit_rows(reference) * unit_rows(other.double().numpy()), axis=1))
    assert teacher_student_cosine_gap(z, other) == pytest.approx(expected_gap, abs=1e-5)
    metrics = collapse_metrics({"embedding": z, "projection": gaussian(256, 128, 7) * scale}, groups=groups)
    assert metrics["l2_std_embedding"] == pytest.approx(l2_std_reference(reference) * 8, rel=1e-4)
    assert metrics["l2_std_projection"] > 0.9
    assert collapse_diagnosis(metrics)[0] != "complete"
    # A zero row stays a zero row (cosine 0 with every other).
    with_zero = torch.cat([torch.zeros(1, 64), z[1:]])
    units = np.vstack([np.zeros((1, 64)), unit_rows(reference[1:])])
    cosines = units @ units.T
    assert mean_cosine_similarity(with_zero) == pytest.approx(cosines[~np.eye(256, dtype=bool)].mean(), abs=1e-5)


# --------------------------------------------------------------------------------------------------
# Clustering metrics


def test_clustering_metrics_match_the_definitions() -> None:
    p = softmax_assignments(300, 50, scale=2.0)
    assert cluster_occupancy(p) == pytest.approx(occupancy_reference(p.numpy()))
    assert assignment_entropy(p) == pytest.approx(mean_assignment_entropy_reference(p.numpy()), rel=1e-5)
    assert mean_sample_entropy(p) == pytest.approx(sample_entropy_reference(p.numpy()), rel=1e-5)
    assert mean_sample_entropy(p, normalize=False) == pytest.approx(
        sample_entropy_reference(p.numpy()) * math.log(50), rel=1e-5
    )
    assert assignment_entropy(p, normalize=False) == pytest.approx(
        mean_assignment_entropy_reference(p.numpy()) * math.log(50), rel=1e-5
    )


def test_uniform_assignments_have_entropy_log_k() -> None:
    uniform = torch.full((512, 4096), 1 / 4096)
    assert mean_sample_entropy(uniform, normalize=False) == pytest.approx(8.318, abs=1e-3)  # ln 4096
    assert mean_sample_entropy(uniform) == pytest.approx(1.0, abs=1e-5)
    assert assignment_entropy(uniform) == pytest.approx(1.0, abs=1e-5)


def test_tied_assignments_count_one_prototype_not_one_per_sample() -> None:
    # Every sample spread evenly: each row's argmax is a tie, which always goes to the same (lowest)
    # prototype, so one of K is used, not a random one per sample.
    uniform = torch.full((100, 64), 1 / 64)
    assert cluster_occupancy(uniform) == 1 / 64
    assert cluster_occupancy(uniform, relative_to_attainable=True) == 1 / 64  # min(N, K) = 64
    assert cluster_occupancy(torch.full((16, 64), 1 / 64), relative_to_attainable=True) == 1 / 16
    # A tie between prototypes 5 and 9 in every row: the same one for all of them.
    tied = torch.zeros(10, 64)
    tied[:, [9, 5]] = 0.5
    assert cluster_occupancy(tied) == 1 / 64


def test_occupancy_relative_to_what_the_probe_can_reach() -> None:
    # 512 samples on 4096 prototypes, each sample its own prototype: 1/8 of K, all of min(N, K).
    p = F.one_hot(torch.arange(512) * 8, 4096).float()
    assert cluster_occupancy(p) == pytest.approx(512 / 4096)
    assert cluster_occupancy(p, relative_to_attainable=True) == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# collapse_metrics and the verdict on each kind of collapse


def test_collapse_metrics_returns_the_documented_keys_and_values() -> None:
    embedding, projection = gaussian(256, 32, 1), gaussian(256, 48, 2)
    probs, teacher, other = softmax_assignments(256, 64, 3.0), gaussian(256, 32, 3), gaussian(256, 32, 4)
    metrics = collapse_metrics(
        {
            "embedding": embedding,
            "projection": projection,
            "assignment_probs": probs,
            "teacher_embedding": teacher,
            "embedding_other_view": other,
        }
    )
    assert set(metrics) == {
        "rankme_embedding", "rankme_embedding_norm", "rankme_projection", "rankme_projection_norm",
        "l2_std_embedding", "l2_std_projection", "uniformity", "alignment", "mean_cosine",
        "cluster_occupancy", "cluster_occupancy_attainable", "assignment_entropy", "effective_prototypes",
        "sample_entropy", "teacher_student_gap", "nonfinite",
    }  # fmt: skip
    assert all(isinstance(value, float) for value in metrics.values())
    e, pr = embedding.numpy(), projection.numpy()
    assert metrics["rankme_embedding"] == pytest.approx(rankme_reference(e), rel=1e-5)
    assert metrics["rankme_embedding_norm"] == pytest.approx(rankme_reference(e) / 32, rel=1e-5)
    assert metrics["rankme_projection_norm"] == pytest.approx(rankme_reference(pr) / 48, rel=1e-5)
    assert metrics["l2_std_embedding"] == pytest.approx(l2_std_reference(e) * math.sqrt(32), rel=1e-5)
    assert metrics["l2_std_projection"] == pytest.approx(l2_std_reference(pr) * math.sqrt(48), rel=1e-5)
    assert metrics["uniformity"] == pytest.approx(uniformity_reference(e), abs=1e-5)
    assert metrics["alignment"] == pytest.approx(alignment_reference(e, other.numpy()), rel=1e-5)
    assert metrics["mean_cosine"] == pytest.approx(mean_cosine_reference(e), abs=1e-6)
    assert metrics["cluster_occupancy"] == pytest.approx(occupancy_reference(probs.numpy()))
    assert metrics["cluster_occupancy_attainable"] == pytest.approx(occupancy_reference(probs.numpy()))
    assert metrics["sample_entropy"] == pytest.approx(sample_entropy_reference(probs.numpy()), rel=1e-5)
    assert metrics["rankme_projection"] == pytest.approx(rankme_reference(pr), rel=1e-5)
    assert metrics["assignment_entropy"] == pytest.approx(mean_assignment_entropy_reference(probs.numpy()), rel=1e-5)
    # The mean assignment's perplexity, exp of its entropy in nats (scipy's entropy of the mean row).
    assert metrics["effective_prototypes"] == pytest.approx(math.exp(scipy_entropy(probs.numpy().mean(axis=0))), rel=1e-5)
    t = teacher.numpy().astype(np.float64)
    cosines = (e * t).sum(1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(t, axis=1))
    assert metrics["teacher_student_gap"] == pytest.approx(1.0 - cosines.mean(), abs=1e-6)
    assert metrics["nonfinite"] == 0.0
    # Fewer samples than dimensions: the normalised rank is of min(N, D), the largest rank attainable.
    few = collapse_metrics({"embedding": embedding[:20], "projection": projection[:20]})
    assert few["rankme_embedding_norm"] == pytest.approx(rankme_reference(e[:20]) / 20, rel=1e-5)
    assert few["rankme_projection_norm"] == pytest.approx(rankme_reference(pr[:20]) / 20, rel=1e-5)
    # Likewise the attainable occupancy: 512 samples can use at most 512 of 4096 prototypes, so each on
    # its own prototype is full occupancy (1.0), although only 1/8 of all prototypes are used.
    spread = torch.nn.functional.one_hot(torch.arange(512) * 8, 4096).float()
    spread_metrics = collapse_metrics({"assignment_probs": spread})
    assert spread_metrics["cluster_occupancy_attainable"] == pytest.approx(1.0)
    assert spread_metrics["cluster_occupancy"] == pytest.approx(512 / 4096)
    # views= overrides the dict's other view: the same view twice aligns perfectly (0), the dict's other
    # view does not (its alignment is the one measured above).
    with_views = collapse_metrics({"embedding": embedding, "embedding_other_view": other}, views=(embedding, embedding))
    assert with_views["alignment"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["alignment"] > 0.1


def test_collapse_metrics_uses_groups_for_mean_cosine() -> None:
    z = torch.eye(16).repeat_interleave(4, dim=0)
    groups = torch.arange(64) // 4
    assert collapse_metrics({"embedding": z}, groups=groups)["mean_cosine"] == pytest.approx(0.0, abs=1e-9)


def test_collapse_metrics_align_the_segments_of_one_track_without_a_second_view() -> None:
    # The probe set holds several segments of each track, two crops of one track being the multi-view methods'
    # positive pairs: alignment is measured over those pairs (before, it was documented and never logged).
    generator = torch.Generator().manual_seed(3)
    z = torch.randn(50, 12, generator=generator)
    groups = torch.tensor([7] * 5 + [2] * 1 + [9] * 12 + list(range(100, 132)))  # sizes 5, 1, 12 and 32 alone
    u, g = unit_rows(z.numpy().astype(np.float64)), groups.numpy()
    pairs = [(i, j) for i in range(50) for j in range(50) if i != j and g[i] == g[j]]
    expected = np.mean([np.sum((u[i] - u[j]) ** 2) for i, j in pairs])  # Wang & Isola over the positive pairs
    metrics = collapse_metrics({"embedding": z}, groups=groups)
    assert metrics["alignment"] == pytest.approx(expected, rel=1e-6)  # rows normalised in float32
    assert metrics["alignment"] == pytest.approx(alignment_reference(z.numpy()[[i for i, _ in pairs]],
                                                                     z.numpy()[[j for _, j in pairs]]), rel=1e-5)
    # Each track's segments on one direction of their own: perfectly aligned (0); a track's segments spread
    # over orthogonal directions: |u_i - u_j|^2 = 2.
    assert collapse_metrics({"embedding": torch.eye(16).repeat_interleave(4, dim=0)},
                            groups=torch.arange(64) // 4)["alignment"] == pytest.approx(0.0, abs=1e-12)
    assert collapse_metrics({"embedding": torch.eye(16)}, groups=torch.arange(16) // 4)["alignment"] == pytest.approx(2.0)
    # No track with two segments: no pair, no alignment (not a NaN, which the verdict would take for divergence).
    assert "alignment" not in collapse_metrics({"embedding": z}, groups=torch.arange(50))
    assert "alignment" not in collapse_metrics({"embedding": z})  # no groups: nothing says which rows pair
    # A second view, given, is what is aligned.
    other = torch.randn(50, 12, generator=generator)
    assert collapse_metrics({"embedding": z}, views=(z, other), groups=groups)["alignment"] == pytest.approx(
        alignment_reference(z.numpy(), other.numpy()), rel=1e-5)


def test_healthy_isotropic_embeddings_are_not_collapsed() -> None:
    metrics = collapse_metrics({"embedding": gaussian(2048, 64, 1), "projection": gaussian(2048, 128, 2)})
    assert metrics["rankme_embedding"] > 0.97 * 64
    assert metrics["l2_std_embedding"] == pytest.approx(1.0, abs=0.03)
    assert abs(metrics["mean_cosine"]) < 0.01
    assert collapse_diagnosis(metrics) == ("none", [])


def test_rank_four_embedding_is_dimensional_collapse() -> None:
    metrics = collapse_metrics({"embedding": low_rank(2048, 64, 4), "projection": gaussian(2048, 128)})
    assert metrics["rankme_embedding"] == pytest.approx(4.0, rel=0.1)
    verdict, reasons = collapse_diagnosis(metrics)
    assert verdict == "dimensional" == CollapseType.DIMENSIONAL
    assert reasons == [f"rankme_embedding_norm {metrics['rankme_embedding_norm']:.4g} < 0.1"]


def test_rank_one_and_constant_embeddings_are_complete_collapse() -> None:
    rank_one = collapse_metrics({"embedding": low_rank(2048, 64, 1)})
    assert rank_one["rankme_embedding"] == pytest.approx(1.0, abs=1e-3)
    verdict, reasons = collapse_diagnosis(rank_one)
    assert verdict == "complete"
    # Signs flip along the line, so only the rank sees it.
    assert reasons == [f"rankme_embedding {rank_one['rankme_embedding']:.4g} < 1.5"]

    constant = collapse_metrics({"embedding": torch.full((512, 64), 0.3)})
    assert constant["l2_std_embedding"] == pytest.approx(0.0, abs=1e-6)
    assert constant["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert collapse_verdict(constant) == "complete"
    # Near-constant with small noise: RankMe stays large (it weighs the noise's singular values),
    # the spread of directions does not.
    noisy = collapse_metrics({"embedding": torch.full((512, 64), 1.0) + 0.01 * gaussian(512, 64)})
    assert noisy["rankme_embedding"] > 1.5
    assert collapse_verdict(noisy) == "complete"
    assert collapse_verdict(collapse_metrics({"embedding": torch.zeros(64, 8)})) == "complete"


def test_constant_projection_is_complete_collapse_unless_disabled() -> None:
    metrics = collapse_metrics({"embedding": gaussian(512, 64), "projection": torch.ones(512, 128)})
    assert collapse_verdict(metrics) == "complete"
    assert collapse_verdict(metrics, CollapseThresholds(check_projection=False)) == "none"


def test_nonfinite_inputs_and_loss_are_divergence() -> None:
    z = gaussian(256, 32)
    z[3, 5] = math.nan
    metrics = collapse_metrics({"embedding": z, "projection": gaussian(256, 16)})
    assert metrics["nonfinite"] == 1.0
    assert math.isnan(metrics["rankme_embedding"])
    assert math.isfinite(metrics["rankme_projection"])
    assert collapse_verdict(metrics) == "diverged"
    inf_probs = softmax_assignments(256, 8, 1.0)
    inf_probs[0, 0] = math.inf
    with_inf = collapse_metrics({"embedding": gaussian(256, 32), "assignment_probs": inf_probs})
    assert collapse_verdict(with_inf) == "diverged"
    # A non-finite teacher (a finite student): its gap is NaN, and the flag says so.
    student = gaussian(64, 16)
    with_nan_teacher = collapse_metrics({"embedding": student, "teacher_embedding": torch.full_like(student, math.nan)})
    assert math.isnan(with_nan_teacher["teacher_student_gap"]) and with_nan_teacher["nonfinite"] == 1.0
    healthy = collapse_metrics({"embedding": gaussian(256, 32)})
    assert collapse_verdict({**healthy, "loss": math.nan}) == "diverged"
    assert collapse_verdict({**healthy, "loss": torch.tensor(math.inf)}) == "diverged"
    assert collapse_verdict({**healthy, "loss": 1.25}) == "none"
    assert math.isnan(effective_rank(z)) and math.isnan(l2_normalized_std(z)) and math.isnan(uniformity(z))


@pytest.mark.parametrize(
    ("name", "probs", "expected"),
    [
        ("uniform", torch.full((512, 64), 1 / 64), "cluster"),
        ("one-hot to one prototype", F.one_hot(torch.full((512,), 7), 64).float(), "cluster"),
        ("healthy spread", softmax_assignments(512, 64, scale=4.0), "none"),
        ("healthy spread, K = 4096 > N", softmax_assignments(512, 4096, scale=6.0), "none"),
    ],
)
def test_cluster_verdicts(name: str, probs: torch.Tensor, expected: str) -> None:
    metrics = collapse_metrics({"embedding": gaussian(512, 64), "assignment_probs": probs})
    assert collapse_verdict(metrics) == expected, (name, metrics)


def test_five_of_sixty_four_prototypes_is_partial_prototype_collapse() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 64, generator=generator)
    logits[:, [5, 20, 41, 50, 60]] += 8.0  # five prototypes win every sample, in a spread of ways
    probs = torch.softmax(logits, dim=1)
    metrics = collapse_metrics({"embedding": gaussian(512, 64), "assignment_probs": probs})
    assert metrics["cluster_occupancy"] == pytest.approx(5 / 64)
    # Not one-hot: the mean assignment rests on about five prototypes; only occupancy sees it.
    assert metrics["assignment_entropy"] > 0.1 and metrics["effective_prototypes"] > 4.5
    verdict, reasons = collapse_diagnosis(metrics)
    assert verdict == "partial" == CollapseType.PARTIAL
    assert reasons == [f"cluster_occupancy_attainable {5 / 64:.4g} < 0.1"]
    assert collapse_findings(metrics) == {"partial": reasons}
    # Its line moves with cluster_min_occupancy: 5 of 64 is above 0.07.
    assert collapse_verdict(metrics, CollapseThresholds(cluster_min_occupancy=0.07)) == "none"


def test_a_mean_assignment_on_two_prototypes_is_one_hot_collapse_whatever_k() -> None:
    # 512 samples split between two of 256 prototypes, each sample sharp on its own: the mean
    # assignment's entropy is log 2, 0.125 of log 256, above the fraction line (0.1), but it
    # effectively rests on 2 prototypes, under the count line (3).
    logits = torch.full((512, 256), -10.0)
    logits[:256, 3] = logits[256:, 9] = 10.0
    metrics = collapse_metrics({"embedding": gaussian(512, 64), "assignment_probs": torch.softmax(logits, dim=1)})
    assert metrics["effective_prototypes"] == pytest.approx(2.0, rel=1e-3)
    assert metrics["assignment_entropy"] == pytest.approx(math.log(2) / math.log(256), rel=1e-3)
    findings = collapse_findings(metrics)
    assert findings["cluster"] == [f"effective_prototypes {metrics['effective_prototypes']:.4g} < 3"]
    assert list(findings) == ["cluster", "partial"]  # and 2 of 256 used is partial collapse too
    # Without the count rule, only the partial collapse is left.
    assert collapse_verdict(metrics, CollapseThresholds(cluster_min_effective_prototypes=0.0)) == "partial"
    with pytest.raises(ValueError, match="cluster_min_effective_prototypes must be a finite number >= 0"):
        CollapseThresholds(cluster_min_effective_prototypes=math.inf)


@pytest.mark.parametrize("k", [2, 3])
def test_a_few_prototypes_in_even_use_are_not_one_hot_collapse(k: int) -> None:
    # With K = 2 or 3 the mean assignment cannot rest on 3 prototypes; used evenly it is healthy
    # (the count rule also asks for fewer than sqrt(K)), while one prototype taking all is not.
    even = torch.softmax(torch.randn(512, k, generator=torch.Generator().manual_seed(1)) * 4, dim=1)
    metrics = collapse_metrics({"embedding": gaussian(512, 64), "assignment_probs": even})
    assert metrics["effective_prototypes"] < 3 and metrics["assignment_entropy"] > 0.9
    assert collapse_verdict(metrics) == "none"
    all_on_one = F.one_hot(torch.zeros(512, dtype=torch.long), k).float()
    one_hot = collapse_metrics({"embedding": gaussian(512, 64), "assignment_probs": all_on_one})
    assert collapse_verdict(one_hot) == "cluster"


def test_version_1_is_the_verdict_before_partial_and_the_count_rule() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 64, generator=generator)
    logits[:, [5, 20, 41, 50, 60]] += 8.0
    five = collapse_metrics({"embedding": gaussian(512, 64), "projection": torch.ones(512, 64),
                             "assignment_probs": torch.softmax(logits, dim=1)})
    # Today: partial collapse (the projection's rules do not judge prototype scores). In version 2
    # the constant prototype scores (complete) came before it; in version 1 the occupancy rule was
    # one of "cluster"'s, checked before the projection's.
    occupancy = f"cluster_occupancy_attainable {5 / 64:.4g} < 0.1"
    assert collapse_findings(five) == {"partial": [occupancy]}
    assert collapse_findings(five, version=2) == {"complete": ["l2_std_projection 0 < 0.1"], "partial": [occupancy]}
    assert collapse_findings(five, version=1) == {"cluster": [occupancy], "complete": ["l2_std_projection 0 < 0.1"]}
    assert collapse_diagnosis(five, version=1) == ("cluster", [occupancy])
    # Two prototypes (0.125 of log 256): only today's count rule calls it one-hot.
    logits = torch.full((512, 256), -10.0)
    logits[:256, 3] = logits[256:, 9] = 10.0
    two = collapse_metrics({"embedding": gaussian(512, 64), "assignment_probs": torch.softmax(logits, dim=1)})
    assert collapse_findings(two, version=1) == {"cluster": [f"cluster_occupancy_attainable {2 / 256:.4g} < 0.1"]}
    with pytest.raises(ValueError, match=r"version must be one of \(1, 2, 3\), got 4"):
        collapse_findings(two, version=4)


def test_findings_list_every_kind_that_fires_in_order_of_precedence() -> None:
    # A rank-4 embedding (dimensional) whose 512 samples pick 3 of 64 prototypes (partial), and
    # constant prototype scores, which the projection's rules no longer judge (version 2 called them
    # complete, first): the verdict is the first.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(512, 64, generator=generator)
    logits[:, [5, 20, 41]] += 8.0
    outputs = {"embedding": low_rank(2048, 64, 4)[:512], "projection": torch.ones(512, 64),
               "assignment_probs": torch.softmax(logits, dim=1)}
    metrics = collapse_metrics(outputs)
    findings = collapse_findings(metrics)
    assert list(findings) == ["partial", "dimensional"]
    assert findings["partial"] == [f"cluster_occupancy_attainable {3 / 64:.4g} < 0.1"]
    assert findings["dimensional"] == [f"rankme_embedding_norm {metrics['rankme_embedding_norm']:.4g} < 0.1"]
    assert collapse_diagnosis(metrics) == ("partial", findings["partial"])
    assert collapse_findings(metrics, version=2) == {"complete": ["l2_std_projection 0 < 0.1"], **findings}
    # Without the assignments the constant projection is complete collapse, before dimensional.
    del outputs["assignment_probs"]
    metrics = collapse_metrics(outputs)
    assert list(collapse_findings(metrics)) == ["complete", "dimensional"]
    assert collapse_findings(metrics)["complete"][0] == "l2_std_projection 0 < 0.1"
    # A collapsed embedding lists the projection's reasons with its own.
    both = collapse_findings(collapse_metrics({"embedding": torch.ones(512, 64), "projection": torch.ones(512, 64)}))
    assert list(both) == ["complete", "dimensional"]
    assert "l2_std_embedding 0 < 0.1" in both["complete"] and "l2_std_projection 0 < 0.1" in both["complete"]
    # With one-hot assignments: complete (the embedding's rules), then "cluster" (and, with every
    # sample on one prototype, "partial" too).
    one_hot = F.one_hot(torch.full((512,), 7), 64).float()
    both = collapse_metrics({"embedding": torch.ones(512, 64), "projection": torch.ones(512, 64),
                             "assignment_probs": one_hot})
    findings = collapse_findings(both)
    assert list(findings) == ["complete", "cluster", "partial", "dimensional"]
    assert "l2_std_embedding 0 < 0.1" in findings["complete"]
    assert not any(reason.startswith("l2_std_projection") for reason in findings["complete"])
    assert findings["cluster"] == ["assignment_entropy 0 < 0.1", "effective_prototypes 1 < 3"]
    # NaN anywhere: diverged alone.
    assert collapse_findings({**both, "loss": math.nan}) == {"diverged": ["loss is nan"]}
    assert collapse_findings(collapse_metrics({"embedding": gaussian(512, 64)})) == {}


def test_thresholds_move_the_verdict() -> None:
    metrics = collapse_metrics({"embedding": low_rank(2048, 64, 4)})
    assert collapse_verdict(metrics) == "dimensional"
    assert collapse_verdict(metrics, CollapseThresholds(dimensional_max_rank_fraction=0.05)) == "none"
    with pytest.raises(AttributeError):
        CollapseThresholds().complete_max_l2_std = 0.5  # type: ignore[misc]
    with pytest.raises(ValueError, match="cluster_min_occupancy must be in"):
        CollapseThresholds(cluster_min_occupancy=5.0)


def test_verdict_order_complete_before_cluster() -> None:
    uniform = torch.full((512, 64), 1 / 64)
    metrics = collapse_metrics({"embedding": torch.ones(512, 64), "assignment_probs": uniform})
    assert collapse_verdict(metrics) == "complete"


def test_uniform_prototype_collapse_with_constant_scores_reads_cluster_not_complete() -> None:
    # Clustering's uniform collapse: the embedding still varies, the prototype scores (the method's
    # "projection") no longer do, and every sample is spread evenly over the prototypes.
    uniform = torch.full((512, 64), 1 / 64)
    metrics = collapse_metrics(
        {"embedding": gaussian(512, 64), "projection": torch.ones(512, 64), "assignment_probs": uniform}
    )
    verdict, reasons = collapse_diagnosis(metrics)
    assert verdict == "cluster"
    assert "sample_entropy 1 > 0.97" in reasons  # (ties: argmax puts everyone on one prototype too)
    assert "complete" not in collapse_findings(metrics)
    assert collapse_findings(metrics, version=2)["complete"] == ["l2_std_projection 0 < 0.1"]
    # Spread (teacher) assignments and student scores on one line through the origin (RankMe 1, but
    # not constant: L2 std far above 0.1): the rank rule is not applied to prototype scores. Before
    # 2026-12-01, it called such trials "complete" and would have stopped 4 of the 5 best trials of
    # the clustering search benchmark (benchmarks/README.md, "Search").
    direction = torch.nn.functional.normalize(gaussian(1, 64)[0], dim=0)
    on_a_line = gaussian(512, 1) * direction
    spread = torch.softmax(gaussian(512, 64) * 3, dim=1)
    healthy = collapse_metrics({"embedding": gaussian(512, 64), "projection": on_a_line, "assignment_probs": spread})
    assert healthy["rankme_projection"] < 1.5 and healthy["l2_std_projection"] > 0.5
    assert healthy["cluster_occupancy_attainable"] > 0.5
    assert collapse_diagnosis(healthy) == ("none", [])
    # Without prototypes the same scores are complete collapse (every sample on one line).
    assert collapse_diagnosis({k: v for k, v in healthy.items()
                               if k not in ("assignment_entropy", "effective_prototypes", "sample_entropy")
                               and not k.startswith("cluster_")}
                              ) == ("complete", [f"rankme_projection {healthy['rankme_projection']:.4g} < 1.5"])
    # Without assignments the same constant scores are complete collapse of the projection.
    del metrics["sample_entropy"], metrics["assignment_entropy"], metrics["effective_prototypes"]
    metrics = {k: v for k, v in metrics.items() if not k.startswith("cluster_")}
    verdict, reasons = collapse_diagnosis(metrics)
    assert verdict == "complete"
    assert reasons[0].startswith("l2_std_projection 0 < 0.1")


def test_prototype_scores_with_a_large_common_component_are_not_complete_collapse() -> None:
    """Student prototype scores that share a large common component: normalised, every row points
    almost the same way (L2 std under 0.1, as in the best trial of the 18-epoch clustering search,
    0.058-0.097), yet the scores still vary with the input and the teacher's assignments spread over
    many prototypes. Version 3 leaves the projection's rules out for methods with prototypes; version
    2's L2-std rule called it complete."""
    common = 10.0 * F.normalize(gaussian(1, 64, 3)[0], dim=0)
    varying = gaussian(512, 64, 4)
    scores = common + 0.08 * varying
    spread = torch.softmax(gaussian(512, 64, 5) * 3, dim=1)
    metrics = collapse_metrics({"embedding": gaussian(512, 64), "projection": scores, "assignment_probs": spread})
    # The L2 std (SimSiam's, scaled by sqrt(64)) is under the line; the scores less their mean are not
    # constant at all: their own L2 std is that of isotropic noise (near 1) and their rank full.
    std = l2_std_reference(scores.numpy()) * 8
    assert metrics["l2_std_projection"] == pytest.approx(std, rel=1e-5) and 0.02 < std < 0.1
    centred = (scores - scores.mean(dim=0)).numpy()
    assert l2_std_reference(centred) * 8 > 0.9 and rankme_reference(centred) > 40
    assert metrics["effective_prototypes"] > 30 and metrics["cluster_occupancy_attainable"] > 0.5
    assert collapse_diagnosis(metrics) == ("none", [])
    assert collapse_diagnosis(metrics, version=2) == ("complete", [f"l2_std_projection {std:.4g} < 0.1"])


# --------------------------------------------------------------------------------------------------
# Precision, devices and bad input


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_input_is_computed_in_float32(dtype: torch.dtype) -> None:
    # Magnitudes around 300: squared norms (~6e6) overflow float16 if computed in it.
    z = (300.0 * gaussian(512, 64)).to(dtype)
    exact = z.double().numpy()
    metrics = collapse_metrics({"embedding": z, "projection": z})
    assert metrics["nonfinite"] == 0.0
    assert metrics["rankme_embedding"] == pytest.approx(rankme_reference(exact), rel=1e-4)
    assert metrics["l2_std_embedding"] == pytest.approx(l2_std_reference(exact) * 8, rel=1e-4)
    assert metrics["uniformity"] == pytest.approx(uniformity_reference(exact), abs=1e-4)
    assert metrics["mean_cosine"] == pytest.approx(mean_cosine_reference(exact), abs=1e-5)
    assert collapse_verdict(metrics) == "none"
    probs = softmax_assignments(512, 256, 3.0).to(dtype)  # row sums off by rounding
    exact_probs = probs.double().numpy()
    exact_probs /= exact_probs.sum(axis=1, keepdims=True)
    assert mean_sample_entropy(probs) == pytest.approx(sample_entropy_reference(exact_probs), rel=1e-4)


def test_rows_that_sum_near_1_are_read_as_the_distributions_they_round() -> None:
    """Rows summing to 1.008 and 0.995 (within the accepted rounding) are renormalised before their entropy:
    [0.504, 0.504] is the uniform row, entropy ln 2 of ln 2 = 1 (as given, 0.9965). Written out, not scipy's
    entropy, which renormalises its input itself."""
    probs = torch.tensor([[0.504, 0.504], [0.6, 0.395]])
    assert mean_sample_entropy(probs[:1]) == pytest.approx(1.0, abs=1e-6)
    rows = probs.double().numpy() / probs.double().numpy().sum(axis=1, keepdims=True)
    entropies = -(rows * np.log(rows)).sum(axis=1) / np.log(2)
    assert mean_sample_entropy(probs) == pytest.approx(entropies.mean(), rel=1e-6)
    # The mean assignment, of the renormalised rows: its perplexity.
    mean_row = rows.mean(axis=0)
    assert collapse_metrics({"assignment_probs": probs})["effective_prototypes"] == pytest.approx(
        math.exp(-(mean_row * np.log(mean_row)).sum()), rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_metrics_on_gpu_match_cpu() -> None:
    outputs = {
        "embedding": gaussian(512, 64),
        "projection": low_rank(512, 256, 8),
        "assignment_probs": softmax_assignments(512, 128, 3.0),
    }
    on_cpu = collapse_metrics(outputs)
    on_gpu = collapse_metrics({key: value.cuda() for key, value in outputs.items()})
    for key, value in on_cpu.items():
        assert on_gpu[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_bad_input_gets_a_clear_error() -> None:
    with pytest.raises(ValueError, match="2-D"):
        effective_rank(torch.randn(10))
    with pytest.raises(ValueError, match="at least 2 samples"):
        l2_normalized_std(torch.randn(1, 8))
    with pytest.raises(TypeError, match="torch.Tensor"):
        effective_rank(np.zeros((4, 4)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="softmax"):
        cluster_occupancy(torch.randn(16, 8))  # logits, not probabilities
    with pytest.raises(ValueError, match="sum to 1"):
        mean_sample_entropy(torch.rand(16, 8) + 0.1)
    with pytest.raises(ValueError, match="K >= 2"):
        assignment_entropy(torch.ones(16, 1))
    with pytest.raises(ValueError, match="same shape"):
        alignment(torch.randn(8, 4), torch.randn(9, 4))
    with pytest.raises(ValueError, match="unknown collapse output"):
        collapse_metrics({"embeddings": torch.randn(8, 4)})
    with pytest.raises(ValueError, match="same number of samples"):
        collapse_metrics({"embedding": torch.randn(8, 4), "projection": torch.randn(9, 4)})
    with pytest.raises(ValueError, match="include it"):
        collapse_metrics({"teacher_embedding": torch.randn(8, 4)})
    with pytest.raises(ValueError, match="no collapse metrics"):
        collapse_verdict({"loss": 1.0})
    with pytest.raises(ValueError, match="one id per sample"):
        mean_cosine_similarity(torch.randn(8, 4), torch.arange(7))


# Healthy embedding metrics for hand-made verdict inputs: spread, full rank, no shared direction.
_HEALTHY_EMBEDDING = {"l2_std_embedding": 0.7, "mean_cosine": 0.3, "rankme_embedding": 30.0,
                      "rankme_embedding_norm": 0.5}


def test_the_complete_rules_are_strict_and_the_mean_cosine_rule_stands_alone():
    # A threshold at the end of its range switches its rule off: a constant embedding (std 0, cosine 1)
    # is not below a std limit of 0 nor above a cosine limit of 1.
    constant = {**_HEALTHY_EMBEDDING, "l2_std_embedding": 0.0, "mean_cosine": 1.0}
    assert collapse_findings(constant, CollapseThresholds(complete_max_l2_std=0.0, complete_min_mean_cosine=1.0)) == {}
    # L2 std is at most sqrt(1 - mean cosine): a cone with mean cosine 0.986 can keep std 0.118 and
    # RankMe 14.9, which only the mean-cosine rule (default 0.98) calls complete.
    cone = {**_HEALTHY_EMBEDDING, "l2_std_embedding": 0.118, "mean_cosine": 0.986, "rankme_embedding": 14.9}
    assert collapse_diagnosis(cone) == ("complete", ["mean_cosine 0.986 > 0.98"])
    assert collapse_findings({**cone, "mean_cosine": 0.975}) == {}


def test_the_count_rule_asks_for_fewer_than_3_effective_prototypes_and_fewer_than_sqrt_k():
    """One-hot collapse by count: the mean assignment rests on fewer than min(3, sqrt(K)) prototypes
    (entropy under half of log K). 2.98 effective prototypes: collapse of K = 9 (sqrt 3), not of K = 8
    (sqrt 2.83: even use of 3 of 8 prototypes is no collapse)."""
    def assignments(effective: float, k: int) -> dict:
        return {**_HEALTHY_EMBEDDING, "assignment_entropy": math.log(effective) / math.log(k),
                "effective_prototypes": effective, "sample_entropy": 0.3, "cluster_occupancy_attainable": 0.5}

    assert collapse_findings(assignments(2.98, 9)) == {"cluster": ["effective_prototypes 2.98 < 3"]}
    assert collapse_findings(assignments(2.98, 8)) == {}
    assert collapse_findings(assignments(3.01, 100)) == {}


def test_a_nonfinite_flag_alone_is_divergence_and_thresholds_outside_their_ranges_are_refused():
    assert collapse_diagnosis({**_HEALTHY_EMBEDDING, "nonfinite": 1.0})[0] == "diverged"
    assert collapse_diagnosis({**_HEALTHY_EMBEDDING, "alignment": math.nan})[0] == "diverged"
    with pytest.raises(ValueError, match=r"complete_min_mean_cosine must be in \[-1, 1\], got 2"):
        CollapseThresholds(complete_min_mean_cosine=2)
    with pytest.raises(ValueError, match="complete_max_effective_rank must be a finite number >= 0, got -1"):
        CollapseThresholds(complete_max_effective_rank=-1)
