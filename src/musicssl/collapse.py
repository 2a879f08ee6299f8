"""Label-free collapse metrics and the collapse verdict.

Every metric takes embeddings as torch tensors ``(N samples, D dims)`` on any device, in any
floating dtype (computed in float32, also for float64 input: bf16 and fp16 are raised, float64 is
lowered; eigenvalue problems in float64, because the small singular values that RankMe and the
spectrum weigh are lost in float32 Gram matrices), and
returns a Python float. Inputs are detached; nothing here builds a graph.

The metrics (each function's docstring gives its definition and source):

- :func:`effective_rank`: RankMe (Garrido et al. 2023), exp of the entropy of the normalised
  singular values; D for isotropic data, 1 for rank-one data. Needs N well above D to reach D.
- :func:`l2_normalized_std`: SimSiam's mean per-dimension std of ``z / |z|``; 1/sqrt(D) healthy,
  0 at complete collapse (or 1 and 0 with ``scale_by_sqrt_dim=True``).
- :func:`alignment`, :func:`uniformity`: Wang & Isola (2020) on L2-normalised embeddings.
- :func:`mean_cosine_similarity`: mean cosine between different samples (or different tracks).
- :func:`cluster_occupancy`, :func:`assignment_entropy`, :func:`mean_sample_entropy`: for methods
  that assign samples to K prototypes (DINO and kin).
- :func:`teacher_student_cosine_gap`: 1 - mean cosine of teacher and student embeddings.
- :func:`spectrum`: sorted eigenvalues of the embedding covariance (Jing et al. 2022), for plots.

:func:`collapse_metrics` computes the whole set from a method's ``collapse_outputs`` dict, and
:func:`collapse_verdict` turns the set into one of :class:`CollapseType`'s values using the
documented :class:`CollapseThresholds`. :func:`collapse_diagnosis` also says which rule fired, and
:func:`collapse_findings` gives every kind of collapse whose rules fire, not only the first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CollapseThresholds",
    "CollapseType",
    "VERDICT_VERSION",
    "VERDICT_VERSIONS",
    "alignment",
    "assignment_entropy",
    "cluster_occupancy",
    "collapse_diagnosis",
    "collapse_findings",
    "first_finding",
    "collapse_metrics",
    "collapse_verdict",
    "effective_rank",
    "l2_normalized_std",
    "mean_cosine_similarity",
    "mean_sample_entropy",
    "spectrum",
    "teacher_student_cosine_gap",
    "uniformity",
]

# Keys of the ``outputs`` dict that :func:`collapse_metrics` understands (PretextMethod.collapse_outputs).
OUTPUT_KEYS = ("embedding", "projection", "assignment_probs", "teacher_embedding", "embedding_other_view")

# The metrics collapse_metrics derives from each output (set to NaN together when it is not finite).
_EMBEDDING_METRICS = (
    "rankme_embedding", "rankme_embedding_norm", "l2_std_embedding", "uniformity", "mean_cosine"
)  # fmt: skip
_PROJECTION_METRICS = ("rankme_projection", "rankme_projection_norm", "l2_std_projection")
_CLUSTER_METRICS = (
    "cluster_occupancy", "cluster_occupancy_attainable", "assignment_entropy", "effective_prototypes",
    "sample_entropy",
)  # fmt: skip

# Pairwise blocks of uniformity hold at most this many entries, so memory stays ~16 MB for any N.
_PAIRWISE_BLOCK_ENTRIES = 1 << 22


# ----------------------------------------------------------------------------------------------
# Input checks


def _embedding_matrix(z: Tensor, name: str = "z", min_samples: int = 2) -> Tensor:
    """``z`` detached and in float32 after checking it is a (samples, dims) matrix."""
    if not isinstance(z, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (samples, dims), got {type(z).__name__}")
    if z.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (samples, dims), got shape {tuple(z.shape)}; "
            "flatten extra axes (e.g. z.flatten(1)) or stack the batch first"
        )
    if z.shape[0] < min_samples:
        raise ValueError(f"{name} needs at least {min_samples} samples (rows), got {z.shape[0]}")
    if z.shape[1] < 1:
        raise ValueError(f"{name} has no dimensions (shape {tuple(z.shape)})")
    if z.is_complex():
        raise TypeError(f"{name} must be real, got dtype {z.dtype}")
    return z.detach().float()


def _all_finite(z: Tensor) -> bool:
    # A sum is NaN/inf whenever an entry is, and costs ~1/20 of isfinite().all() on 2M entries; only
    # when the sum is not finite (a bad entry, or an overflow of huge finite entries) check each one.
    if torch.isfinite(z.sum()):
        return True
    return bool(torch.isfinite(z).all())


def _float64_device(z: Tensor) -> torch.device:
    # Apple's MPS has no float64; the eigenvalue problems are small enough to do on the CPU there.
    return torch.device("cpu") if z.device.type == "mps" else z.device


def _same_shape(a: Tensor, b: Tensor, name_a: str, name_b: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape (the same samples, in the same order), "
            f"got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def _probability_matrix(assignment_probs: Tensor) -> Tensor:
    """Rows checked to be distributions over K >= 2 prototypes, in float32, renormalised.

    Renormalising removes the rounding of bf16/fp16 softmax outputs (row sums off by ~1e-3).
    """
    p = _embedding_matrix(assignment_probs, "assignment_probs", min_samples=1)
    if p.shape[1] < 2:
        raise ValueError(f"assignment_probs needs K >= 2 prototypes (columns), got shape {tuple(p.shape)}")
    smallest = float(p.min())
    if smallest < -1e-6:
        raise ValueError(
            f"assignment_probs has negative entries (min {smallest:.3g}); these look like logits: "
            "pass softmax(logits / temperature, dim=1)"
        )
    row_sums = p.sum(dim=1)
    low, high = float(row_sums.min()), float(row_sums.max())
    if low < 0.99 or high > 1.01:
        raise ValueError(
            f"assignment_probs rows must each sum to 1 (a softmax over the K prototypes); row sums "
            f"range from {low:.4g} to {high:.4g}: pass softmax(logits / temperature, dim=1)"
        )
    # clamp: a rounding-negative entry would make its p log p NaN
    return p.clamp_min(0.0).div_(row_sums.unsqueeze(1))


# ----------------------------------------------------------------------------------------------
# Spectra and effective rank


def _singular_values(z: Tensor) -> Tensor:
    """Singular values of a float32 (N, D) matrix, descending, in float64, length min(N, D).

    Eigenvalues of the smaller float64 Gram matrix: 2-4x faster than an SVD of the matrix on one CPU
    thread (22 ms vs 60 ms for 512 x 1024), and float64 keeps singular values down to ~1e-8 of the
    largest, where a float32 Gram matrix leaves a noise floor of up to ~3e-4 (RankMe of rank-one
    2048 x 512 data: 1.14 instead of 1.0008).
    """
    zd = z.to(_float64_device(z), torch.float64)
    gram = zd.T @ zd if zd.shape[0] >= zd.shape[1] else zd @ zd.T
    eigenvalues = torch.linalg.eigvalsh(gram)
    return eigenvalues.clamp_min(0.0).sqrt().flip(0)


def _rankme(singular_values: Tensor, eps: float) -> float:
    total = singular_values.sum()
    if float(total) <= 0.0:
        # An all-zero matrix spans no direction; 0 keeps it on the collapsed side of every threshold.
        return 0.0
    p = singular_values / total + eps
    return float(torch.exp(-(p * torch.log(p)).sum()))


def effective_rank(z: Tensor, eps: float = 1e-7, normalize: bool = False) -> float:
    """RankMe effective rank of embeddings ``z`` (N, D) (Garrido et al. 2023).

    With singular values s of ``z`` (not centred, as in the paper), p_k = s_k / sum(s) + eps and the
    rank is exp(-sum_k p_k log p_k): D for isotropic data (given N >> D), 1 for rank-one data, 0 for
    an all-zero matrix. ``normalize=True`` divides by min(N, D), the largest rank attainable, giving
    a value in [0, ~1]. NaN if ``z`` has NaN/inf entries.
    """
    z = _embedding_matrix(z)
    if not _all_finite(z):
        return math.nan
    rank = _rankme(_singular_values(z), eps)
    return rank / min(z.shape) if normalize else rank


def spectrum(z: Tensor) -> Tensor:
    """Eigenvalues (= singular values) of the covariance of ``z`` (N, D), descending, length D.

    The dimensional-collapse plot of Jing et al. (2022) is ``log(spectrum(z))`` against the index: a
    tail that drops towards zero marks collapsed dimensions. Samples are centred; the covariance
    divides by N - 1. Returned in float64 on the CPU, because a collapsed tail sits below float32
    resolution and the values go straight to plotting. With N <= D the covariance has rank at most
    N - 1: entries from index N on are exactly 0.
    """
    z = _embedding_matrix(z)
    if not _all_finite(z):
        raise ValueError("z has NaN or inf entries; the spectrum of a diverged embedding is undefined")
    centred = z - z.mean(dim=0, keepdim=True)
    values = _singular_values(centred).square() / (z.shape[0] - 1)
    padded = torch.zeros(z.shape[1], dtype=torch.float64, device=values.device)
    padded[: min(values.numel(), z.shape[1])] = values[: z.shape[1]]
    return padded.cpu()


# ----------------------------------------------------------------------------------------------
# Spread of L2-normalised embeddings


def _unit_rows(z: Tensor) -> Tensor:
    """``z / |z|`` row by row, zero rows kept zero. Each row is first divided by its largest entry: in
    float32 its squared norm overflows for entries of about 1e18 and more, and ``F.normalize`` alone then
    gives zero rows, and rows with a norm under its floor of 1e-12 come out far shorter than 1: embeddings
    with a perfectly good direction read as complete collapse."""
    largest = z.abs().amax(dim=1, keepdim=True)
    return F.normalize(z / largest.clamp_min(torch.finfo(z.dtype).tiny), dim=1)


def _l2_std(unit: Tensor, scale_by_sqrt_dim: bool) -> float:
    std = float(unit.std(dim=0, correction=1).mean())
    return std * math.sqrt(unit.shape[1]) if scale_by_sqrt_dim else std


def l2_normalized_std(z: Tensor, scale_by_sqrt_dim: bool = False) -> float:
    """Mean over dimensions of the per-dimension std (over samples) of ``z / |z|`` (SimSiam).

    About 1/sqrt(D) for healthy embeddings, 0 at complete collapse. ``scale_by_sqrt_dim=True``
    multiplies by sqrt(D): about 1 healthy, 0 collapsed, comparable across D. The std is the
    unbiased one (as in SimSiam's and lightly's code). Rows of zeros stay zero after normalising.
    """
    z = _embedding_matrix(z)
    if not _all_finite(z):
        return math.nan
    return _l2_std(_unit_rows(z), scale_by_sqrt_dim)


def alignment(z_a: Tensor, z_b: Tensor, alpha: float = 2.0) -> float:
    """E |u_a - u_b|^alpha over positive pairs (row i of ``z_a`` with row i of ``z_b``), u = z/|z|.

    Wang & Isola (2020); 0 when both views map to the same direction, at most 2^alpha.
    """
    a = _embedding_matrix(z_a, "z_a", min_samples=1)
    b = _embedding_matrix(z_b, "z_b", min_samples=1)
    _same_shape(a, b, "z_a", "z_b")
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if not (_all_finite(a) and _all_finite(b)):
        return math.nan
    distances = (_unit_rows(a) - _unit_rows(b)).norm(dim=1)
    return float(distances.pow(alpha).mean())


def _uniformity(unit: Tensor, t: float) -> float:
    """log of the mean over pairs i != j of exp(-t |u_i - u_j|^2), in row blocks of bounded size."""
    n = unit.shape[0]
    squared_norms = unit.square().sum(dim=1)
    block_rows = max(1, _PAIRWISE_BLOCK_ENTRIES // n)
    block_log_sums = []
    for start in range(0, n, block_rows):
        stop = min(n, start + block_rows)
        squared_distances = (
            squared_norms[start:stop, None] + squared_norms[None, :] - 2.0 * unit[start:stop] @ unit.T
        ).clamp_min(0.0)
        exponents = -t * squared_distances
        rows = torch.arange(stop - start, device=unit.device)
        exponents[rows, rows + start] = -math.inf  # a sample paired with itself is not a pair
        block_log_sums.append(torch.logsumexp(exponents.flatten(), dim=0))
    # Every unordered pair appears twice among the ordered ones, so the mean is the same.
    return float(torch.logsumexp(torch.stack(block_log_sums), dim=0)) - math.log(n * (n - 1))


def uniformity(z: Tensor, t: float = 2.0) -> float:
    """log E exp(-t |u_i - u_j|^2) over pairs of different samples, u = z/|z| (Wang & Isola 2020).

    Lower is more uniform: 0 at complete collapse; about -4 + log I_0(4) = -1.575 for points
    uniform on a circle and t = 2, tending to -2t = -4 for uniform points in high dimension.
    Computed with a log-sum-exp in row blocks: memory stays bounded for any N, time is O(N^2 D).
    """
    z = _embedding_matrix(z)
    if t <= 0:
        raise ValueError(f"t must be positive, got {t}")
    if not _all_finite(z):
        return math.nan
    return _uniformity(_unit_rows(z), t)


def _mean_cosine(unit: Tensor, groups: Tensor | None) -> float:
    # Sums of unit vectors give all pairwise cosines at once in O(N D): sum_{i != j} u_i.u_j =
    # |sum u|^2 - sum |u_i|^2. Float64 because the two terms nearly cancel when cosines are near 0.
    u = unit.to(_float64_device(unit), torch.float64)
    n = u.shape[0]
    total = u.sum(dim=0).square().sum()
    if groups is None:
        within = u.square().sum()
        pairs = n * (n - 1)
    else:
        _, sizes, group_sums = _group_sums(u, groups)
        within = group_sums.square().sum()
        pairs = int(n * n - float(sizes.square().sum()))
        if pairs == 0:
            raise ValueError("all samples are in one group: no pair from different groups to compare")
    return float((total - within) / pairs)


def _alignment_within_groups(unit: Tensor, groups: Tensor) -> float | None:
    """Alignment (alpha = 2) over the pairs i != j of one group (segments of one track: the multi-view
    methods' positive pairs), of the L2-normalised rows ``unit``; None when no group has two samples.

    In O(N D), as :func:`_mean_cosine`: sum over a group's ordered pairs of |u_i - u_j|^2 is
    2 (n_g - 1) sum |u_i|^2 - 2 (|sum u|^2 - sum |u_i|^2); in float64 (the terms nearly cancel when
    aligned)."""
    u = unit.to(_float64_device(unit), torch.float64)
    group_of_sample, sizes, group_sums = _group_sums(u, groups)
    pairs = float((sizes * (sizes - 1)).sum())
    if pairs == 0:
        return None
    squared_norms = u.square().sum(dim=1)
    norms_term = 2.0 * float(((sizes[group_of_sample] - 1) * squared_norms).sum())
    dots = float(group_sums.square().sum()) - float(squared_norms.sum())
    return max(0.0, (norms_term - 2.0 * dots) / pairs)


def _group_sums(u: Tensor, groups: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row's group number (0..G-1), the groups' sizes (float64) and the sums of their rows of ``u``."""
    _, group_of_sample = torch.unique(groups.to(u.device), return_inverse=True)
    sizes = torch.bincount(group_of_sample).to(torch.float64)
    group_sums = torch.zeros(sizes.shape[0], u.shape[1], dtype=u.dtype, device=u.device)
    group_sums.index_add_(0, group_of_sample, u)
    return group_of_sample, sizes, group_sums


def _check_groups(groups: Tensor | None, n: int) -> None:
    if groups is None:
        return
    if not isinstance(groups, Tensor) or groups.ndim != 1 or groups.shape[0] != n:
        shape = tuple(groups.shape) if isinstance(groups, Tensor) else type(groups).__name__
        raise ValueError(f"groups must be a 1-D tensor with one id per sample ({n}), got {shape}")
    if groups.is_floating_point() or groups.is_complex():
        raise TypeError(f"groups must hold integer ids (e.g. track numbers), got dtype {groups.dtype}")


def mean_cosine_similarity(z: Tensor, groups: Tensor | None = None) -> float:
    """Mean cosine similarity between different samples of ``z`` (N, D): the off-diagonal mean.

    With ``groups`` (one integer id per sample, e.g. the track each segment comes from), only pairs
    from different groups count, so segments of the same track do not make a healthy embedding look
    collapsed. Near 1 at complete collapse. Zero rows count as cosine 0.
    """
    z = _embedding_matrix(z)
    _check_groups(groups, z.shape[0])
    if not _all_finite(z):
        return math.nan
    return _mean_cosine(_unit_rows(z), groups)


def teacher_student_cosine_gap(student: Tensor, teacher: Tensor) -> float:
    """1 - mean cosine between student and teacher embeddings of the same inputs (row by row).

    0 when the teacher and student agree in direction; informative next to the other metrics (an
    EMA teacher that has drifted far from its student), not a collapse signal on its own.
    """
    s = _embedding_matrix(student, "student", min_samples=1)
    t = _embedding_matrix(teacher, "teacher", min_samples=1)
    _same_shape(s, t, "student", "teacher")
    if not (_all_finite(s) and _all_finite(t)):
        return math.nan
    return 1.0 - float((_unit_rows(s) * _unit_rows(t)).sum(dim=1).mean())


# ----------------------------------------------------------------------------------------------
# Clustering (prototype assignments)


def _used_prototypes(p: Tensor) -> int:
    # max().indices: the same first-index tie rule as argmax, at ~60% of its cost on the CPU.
    return int((torch.bincount(p.max(dim=1).indices, minlength=p.shape[1]) > 0).sum())


def _entropy(p: Tensor, dim: int) -> Tensor:
    """-sum p log p along ``dim`` with 0 log 0 = 0.

    The clamp sends 0 log 0 to 0 * log(tiny) = 0; torch.special.entr does the same but is ~4x
    slower on the CPU (11 ms vs 2.6 ms for 512 x 4096, one thread).
    """
    return -(p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(dim=dim)


def _occupancy(p: Tensor, relative_to_attainable: bool) -> float:
    n, k = p.shape
    return _used_prototypes(p) / (min(n, k) if relative_to_attainable else k)


def cluster_occupancy(assignment_probs: Tensor, relative_to_attainable: bool = False) -> float:
    """Fraction of the K prototypes that are the argmax for at least one of the N samples.

    Occupancy cannot exceed N/K, so with ``relative_to_attainable=True`` the count of used
    prototypes is divided by min(N, K) instead of K, which makes it comparable across probe sizes
    and K (1 when every sample, or every prototype, is distinct). Ties go to the lowest index.
    """
    if isinstance(assignment_probs, Tensor) and not _all_finite(assignment_probs):
        return math.nan
    return _occupancy(_probability_matrix(assignment_probs), relative_to_attainable)


def _assignment_entropy(p: Tensor, normalize: bool) -> float:
    entropy = float(_entropy(p.mean(dim=0), dim=0))
    return entropy / math.log(p.shape[1]) if normalize else entropy


def _sample_entropy(p: Tensor, normalize: bool) -> float:
    entropy = float(_entropy(p, dim=1).mean())
    return entropy / math.log(p.shape[1]) if normalize else entropy


def assignment_entropy(assignment_probs: Tensor, normalize: bool = True) -> float:
    """Entropy (nats) of the mean assignment over samples, divided by log K when ``normalize``.

    Near 0 at one-hot collapse (one prototype takes every sample); near 1 when prototypes are used
    evenly. Note that with N < K sharp assignments it cannot exceed log N / log K.
    """
    if isinstance(assignment_probs, Tensor) and not _all_finite(assignment_probs):
        return math.nan
    return _assignment_entropy(_probability_matrix(assignment_probs), normalize)


def mean_sample_entropy(assignment_probs: Tensor, normalize: bool = True) -> float:
    """Mean over samples of each sample's assignment entropy (nats), divided by log K when ``normalize``.

    Near 1 (raw: log K, e.g. 8.318 for K = 4096) at uniform collapse, where every sample is assigned
    uniformly to all prototypes and the loss is stuck at ln K.
    """
    if isinstance(assignment_probs, Tensor) and not _all_finite(assignment_probs):
        return math.nan
    return _sample_entropy(_probability_matrix(assignment_probs), normalize)


# ----------------------------------------------------------------------------------------------
# All metrics at once


def collapse_metrics(
    outputs: Mapping[str, Tensor],
    views: Sequence[Tensor] | None = None,
    groups: Tensor | None = None,
) -> dict[str, float]:
    """The label-free collapse metrics of one probe batch, as flat named floats for logging.

    ``outputs`` is a method's ``collapse_outputs`` dict; every key is optional, unknown keys are an
    error. All tensors describe the same N samples in the same order:

    - ``"embedding"`` (N, D) -> ``rankme_embedding``, ``rankme_embedding_norm``,
      ``l2_std_embedding`` (sqrt(D)-scaled), ``uniformity`` (t = 2), ``mean_cosine``
      (between different ``groups`` if given, e.g. tracks)
    - ``"projection"`` (N, P) -> ``rankme_projection``, ``rankme_projection_norm``,
      ``l2_std_projection`` (sqrt(P)-scaled)
    - ``"assignment_probs"`` (N, K), rows softmax over prototypes -> ``cluster_occupancy`` (of K),
      ``cluster_occupancy_attainable`` (of min(N, K)), ``assignment_entropy`` and
      ``sample_entropy`` (both / log K), ``effective_prototypes`` (exp of the mean assignment's
      entropy in nats: how many prototypes it effectively rests on, 1 to K)
    - ``"teacher_embedding"`` (N, D) with ``"embedding"`` -> ``teacher_student_gap``
    - ``"embedding_other_view"`` (N, D) with ``"embedding"``, or ``views=(z_a, z_b)`` ->
      ``alignment`` (alpha = 2); ``views`` wins when both are given. Without either, ``groups`` gives
      it: over the pairs of ``"embedding"`` rows of one group (two segments of one track, as the
      multi-view methods' positive pairs are), left out when no group has two rows

    ``nonfinite`` is 1.0 when any input or computed value is NaN/inf (the metrics of a non-finite
    input are NaN), else 0.0. Runs under ``torch.no_grad`` on the tensors' device.
    """
    unknown = sorted(set(outputs) - set(OUTPUT_KEYS))
    if unknown:
        raise ValueError(f"unknown collapse output(s) {unknown}; known keys are {list(OUTPUT_KEYS)}")
    if not outputs and views is None:
        raise ValueError(f"nothing to measure: give one or more of {list(OUTPUT_KEYS)} or views=(z_a, z_b)")
    if views is not None and len(views) != 2:
        raise ValueError(f"views must be a pair (z_a, z_b) of embeddings of two views, got {len(views)}")
    if ("teacher_embedding" in outputs or "embedding_other_view" in outputs) and "embedding" not in outputs:
        raise ValueError("teacher_embedding and embedding_other_view are compared with 'embedding': include it")
    sample_counts = {key: int(value.shape[0]) for key, value in outputs.items() if isinstance(value, Tensor)}
    if len(set(sample_counts.values())) > 1:
        raise ValueError(f"all outputs must have the same number of samples (rows), got {sample_counts}")

    metrics: dict[str, float] = {}
    nonfinite = False
    with torch.no_grad():
        if "embedding" in outputs:
            z = _embedding_matrix(outputs["embedding"], "embedding")
            _check_groups(groups, z.shape[0])
            if _all_finite(z):
                rank = _rankme(_singular_values(z), eps=1e-7)
                unit = _unit_rows(z)
                metrics["rankme_embedding"] = rank
                metrics["rankme_embedding_norm"] = rank / min(z.shape)
                metrics["l2_std_embedding"] = _l2_std(unit, scale_by_sqrt_dim=True)
                metrics["uniformity"] = _uniformity(unit, t=2.0)
                metrics["mean_cosine"] = _mean_cosine(unit, groups)
                if groups is not None and views is None and "embedding_other_view" not in outputs:
                    within = _alignment_within_groups(unit, groups)
                    if within is not None:
                        metrics["alignment"] = within
            else:
                nonfinite = True
                metrics.update(dict.fromkeys(_EMBEDDING_METRICS, math.nan))
        if "projection" in outputs:
            z = _embedding_matrix(outputs["projection"], "projection")
            if _all_finite(z):
                rank = _rankme(_singular_values(z), eps=1e-7)
                metrics["rankme_projection"] = rank
                metrics["rankme_projection_norm"] = rank / min(z.shape)
                metrics["l2_std_projection"] = _l2_std(_unit_rows(z), scale_by_sqrt_dim=True)
            else:
                nonfinite = True
                metrics.update(dict.fromkeys(_PROJECTION_METRICS, math.nan))
        if views is not None:
            metrics["alignment"] = alignment(views[0], views[1])
        elif "embedding_other_view" in outputs:
            metrics["alignment"] = alignment(outputs["embedding"], outputs["embedding_other_view"])
        if "teacher_embedding" in outputs:
            metrics["teacher_student_gap"] = teacher_student_cosine_gap(
                outputs["embedding"], outputs["teacher_embedding"]
            )
        if "assignment_probs" in outputs:
            raw = outputs["assignment_probs"]
            if isinstance(raw, Tensor) and not _all_finite(raw):
                nonfinite = True
                metrics.update(dict.fromkeys(_CLUSTER_METRICS, math.nan))
            else:
                p = _probability_matrix(raw)
                used = _used_prototypes(p)
                metrics["cluster_occupancy"] = used / p.shape[1]
                metrics["cluster_occupancy_attainable"] = used / min(p.shape)
                entropy = _assignment_entropy(p, normalize=False)
                metrics["assignment_entropy"] = entropy / math.log(p.shape[1])
                metrics["effective_prototypes"] = math.exp(entropy)
                metrics["sample_entropy"] = _sample_entropy(p, normalize=True)
    nonfinite = nonfinite or any(not math.isfinite(value) for value in metrics.values())
    metrics["nonfinite"] = 1.0 if nonfinite else 0.0
    return metrics


# ----------------------------------------------------------------------------------------------
# Verdict


class CollapseType(str, Enum):
    """What :func:`collapse_verdict` can say. Members compare equal to their string values."""

    NONE = "none"
    COMPLETE = "complete"  # every sample maps to (nearly) the same direction, or onto one line
    DIMENSIONAL = "dimensional"  # the embedding uses only a small fraction of its dimensions
    CLUSTER = "cluster"  # prototype assignments collapsed: one-hot (one takes all) or uniform
    PARTIAL = "partial"  # few prototypes are anyone's first choice, while the mean assignment is spread
    DIVERGED = "diverged"  # NaN/inf in the loss, the outputs or the metrics


@dataclass(frozen=True)
class CollapseThresholds:
    """Where :func:`collapse_verdict` draws its lines, each with its reason.

    The verdict describes the probe batch as it is now; a stopper should see a verdict persist over
    a few evaluations, and allow a warm-up, before acting on it. In particular a freshly
    initialised backbone in eval mode (BatchNorm running statistics still at 0 and 1) maps every
    input to nearly the same vector: the "cpu" preset gives mean cosine 0.9996 and a verdict of
    "complete" at step 0, which is the untrained running statistics, not collapse.
    """

    complete_max_l2_std: float = 0.1
    """Complete if the sqrt(D)-scaled std of L2-normalised embeddings is below this. It is 1 for an
    isotropic cloud and at most sqrt(1 - mean cosine), so 0.1 means the directions keep under ~1%
    of an isotropic cloud's variance: they agree to within a few degrees."""

    complete_max_effective_rank: float = 1.5
    """Complete if RankMe (absolute, not normalised) is below this: RankMe is 1 for a constant or
    rank-one matrix (every sample on one line, even with sign flips that the L2 std and the mean
    cosine do not see) and about 2 for two directions; 1.5 lies between. An absolute count because
    "one direction" does not scale with D."""

    complete_min_mean_cosine: float = 0.98
    """Complete if the mean cosine between different samples exceeds this. Healthy embeddings can
    carry a large shared offset (the "cone effect"): the randomly initialised "cpu" backbone gives
    0.75 with train-mode BatchNorm, and cosines above 0.9 are reported for deeper random networks
    (Liang et al. 2022), so the line sits above 0.95; complete collapse in BYOL/SimSiam drives it
    to 0.99 and beyond."""

    check_projection: bool = True
    """Also call it complete when the projection (head output) meets the L2-std or rank rule: a
    constant projection means the loss has found the trivial solution even if the backbone has not
    caught up yet. Only complete collapse is checked there: the projection is often dimensionally
    collapsed in healthy training (Jing et al. 2022), so its rank says little. Not for a method with
    prototypes (the cluster metrics present): its head output is the student's prototype scores,
    which share a large common component (the teacher's are centred before their softmax), so both
    rules read them as collapsed while they still vary with the input. Their (uncentred) RankMe sits
    near 1 (L2 std 0.23-0.40 in the 6-epoch clustering search's trials that the rank rule flagged,
    some of its best), and in 18-epoch trials their L2 std falls under 0.1 (0.058-0.097 in the best
    trial, whose teacher used 53-73 effective prototypes; benchmarks/README.md, "Search"). Constant
    scores show in the teacher's assignments, which the cluster rules judge. (Verdict version 2
    kept the L2-std rule there.)"""

    dimensional_max_rank_fraction: float = 0.1
    """Dimensional if RankMe / min(N, D) of the embedding is below this (and it is not complete):
    fewer than one in ten attainable dimensions in use, e.g. under 26 of 256 or 6.4 of 64. Isotropic
    Gaussian data gives 0.80 at N = D = 512 and 0.92 at N = 2D (finite-sample spread of the singular
    values), and the randomly initialised "cpu" backbone gives ~0.4 (train-mode BatchNorm), so 0.1
    is far from healthy values while still catching a rank-4 embedding in 64 dimensions."""

    cluster_min_occupancy: float = 0.1
    """Partial if fewer than this fraction of min(N, K) prototypes are anyone's argmax (partial
    prototype collapse: a handful of prototypes take all samples' first choice, while the one-hot
    rule does not fire). Relative to min(N, K) because with a probe of N < K samples at most N
    prototypes can be used: 0.1 is 52 of 4096 with N = 512, and 6.4 of 64 with N >= 64. A kind of
    its own, not "cluster": on 36-epoch clustering trials it fired on trials that scored like the
    rest, the best among them (benchmarks/README.md, "Six times longer: 36 epochs"), so the search records it by
    default and does not stop on it."""

    cluster_max_assignment_entropy: float = 0.1
    """Cluster if the entropy of the mean assignment over log K is below this (one-hot collapse:
    one prototype takes everything). 0.1 is ~1.5 effectively used prototypes at K = 64 and ~2.3 at
    K = 4096; ``cluster_min_effective_prototypes`` (3) is the stricter line for any K below 3**10."""

    cluster_min_effective_prototypes: float = 3.0
    """Cluster if the mean assignment effectively rests on fewer than this many prototypes
    (``effective_prototypes``, exp of its entropy: one-hot collapse onto one or two prototypes,
    whatever K), and on fewer than sqrt(K) (its entropy under half of log K: with K < 9 an even use
    of the prototypes is no collapse, e.g. 2 of K = 2). A count, not a fraction of log K: clustering
    without centring (K = 1024) rests on 1.1-2.8 effective prototypes at epochs 2-3 on seeds 0-2,
    0.02-0.15 of log K, where the fraction rule alone misses seeds 1 and 2 at epoch 3; the 10 best
    trials of a 36-epoch clustering search rested on 7.89 or more at every epoch after the first
    (benchmarks/README.md, "The verdict of 2026-12-02")."""

    cluster_min_sample_entropy: float = 0.97
    """Cluster if the mean per-sample entropy over log K exceeds this (uniform collapse: every
    sample spread evenly over all prototypes, loss stuck at ln K). 0.97 is still ~57 of 64 or ~3200
    of 4096 effective prototypes per sample, well above any sharp healthy assignment."""

    def __post_init__(self) -> None:
        fractions = {
            "complete_max_l2_std": self.complete_max_l2_std,
            "dimensional_max_rank_fraction": self.dimensional_max_rank_fraction,
            "cluster_min_occupancy": self.cluster_min_occupancy,
            "cluster_max_assignment_entropy": self.cluster_max_assignment_entropy,
            "cluster_min_sample_entropy": self.cluster_min_sample_entropy,
        }
        problems = [
            f"{name} must be in [0, 1], got {value}" for name, value in fractions.items() if not 0 <= value <= 1
        ]
        prototypes = self.cluster_min_effective_prototypes
        if not 0 <= prototypes < math.inf:
            problems.append(f"cluster_min_effective_prototypes must be a finite number >= 0, got {prototypes}")
        cosine, rank = self.complete_min_mean_cosine, self.complete_max_effective_rank
        if not -1 <= cosine <= 1:
            problems.append(f"complete_min_mean_cosine must be in [-1, 1], got {cosine}")
        if not 0 <= rank < math.inf:
            problems.append(f"complete_max_effective_rank must be a finite number >= 0, got {rank}")
        if problems:
            raise ValueError("invalid CollapseThresholds: " + "; ".join(problems))


# Metric keys whose NaN/inf means divergence; other keys in a logged dict are left alone.
_VERDICT_KEYS = (
    ("loss", "nonfinite", "alignment", "teacher_student_gap")
    + _EMBEDDING_METRICS
    + _PROJECTION_METRICS
    + _CLUSTER_METRICS
)


def _number(metrics: Mapping[str, object], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value.detach().float())
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"metric {key!r} must be a number, got {type(value).__name__}") from None


# The verdict's versions: 1 until 2026-12-02 ("cluster" also named partial prototype collapse, and
# one-hot collapse had no count rule), 2 until 2026-12-04 (the projection's L2-std rule also judged
# prototype scores), 3 since. A search started under an earlier version keeps it.
VERDICT_VERSIONS = (1, 2, 3)
VERDICT_VERSION = VERDICT_VERSIONS[-1]


def collapse_findings(
    metrics: Mapping[str, object], thresholds: CollapseThresholds = CollapseThresholds(),
    version: int = VERDICT_VERSION,
) -> dict[str, list[str]]:
    """Every kind of collapse whose rules fire on ``metrics``, with the reasons (the rules that fired),
    in the order of precedence of :func:`collapse_diagnosis`; empty if none fires.

    The kinds, in that order: "diverged" (any NaN/inf; then the only one, since other numbers mean
    nothing), "complete" (of the embedding), "cluster" (one-hot or uniform assignments), "complete"
    (of the projection, if ``check_projection``, for methods without prototypes; listed with the
    embedding's reasons when both fire), "partial" (few prototypes used), and
    "dimensional". A trial can show several at once: a rank-one embedding is also dimensionally
    collapsed, and prototypes can be partially collapsed on a low-rank embedding. Reasons read like
    ``"l2_std_embedding 0.031 < 0.1"``.

    Earlier versions, for searches started under them (:data:`VERDICT_VERSIONS`): ``version=2``, the
    verdict of 2026-12-02 to 2026-12-04, also applies the projection's L2-std rule to methods with
    prototypes; ``version=1``, the verdict of before 2026-12-02, does that too, has no "partial"
    (its rule is one of "cluster"'s, ranked with them) and no rule on the count of effective
    prototypes.
    """
    if version not in VERDICT_VERSIONS:
        raise ValueError(f"version must be one of {VERDICT_VERSIONS}, got {version!r}")
    values = {key: _number(metrics, key) for key in _VERDICT_KEYS}
    present = {key: value for key, value in values.items() if value is not None}
    if not set(present) - {"loss", "nonfinite"}:
        raise ValueError(
            "no collapse metrics to judge: pass the dict from collapse_metrics "
            f"(it has none of {[key for key in _VERDICT_KEYS if key not in ('loss', 'nonfinite')]})"
        )

    diverged = [f"{key} is {value}" for key, value in present.items() if not math.isfinite(value)]
    if present.get("nonfinite", 0.0) > 0.0:
        diverged.append("an input or output has NaN/inf (nonfinite = 1)")
    if diverged:
        return {CollapseType.DIVERGED.value: diverged}

    # (value + 0.0: a -0.0 reads "0")
    def below(key: str, limit: float) -> list[str]:
        value = present.get(key)
        return [f"{key} {value + 0.0:.4g} < {limit:.4g}"] if value is not None and value < limit else []

    def above(key: str, limit: float) -> list[str]:
        value = present.get(key)
        return [f"{key} {value + 0.0:.4g} > {limit:.4g}"] if value is not None and value > limit else []

    t = thresholds
    complete = (
        below("l2_std_embedding", t.complete_max_l2_std)
        + below("rankme_embedding", t.complete_max_effective_rank)
        + above("mean_cosine", t.complete_min_mean_cosine)
    )
    # One-hot (the mean assignment rests on one or two prototypes) and uniform (every sample spread
    # evenly over all of them).
    # The count rule applies below sqrt(K) too (an entropy under half of log K): with K = 2 or 3
    # prototypes in even use the mean assignment rests on fewer than 3, and that is no collapse.
    few = []
    if version > 1 and present.get("assignment_entropy", 0.0) < 0.5:
        few = below("effective_prototypes", t.cluster_min_effective_prototypes)
    cluster = (
        below("assignment_entropy", t.cluster_max_assignment_entropy)
        + few
        + above("sample_entropy", t.cluster_min_sample_entropy)
    )
    # A hand-made dict may carry only the occupancy of K.
    occupancy_key = "cluster_occupancy_attainable"
    if occupancy_key not in present:
        occupancy_key = "cluster_occupancy"
    partial = below(occupancy_key, t.cluster_min_occupancy)
    if version == 1:
        cluster, partial = partial + cluster, []

    # The projection's rules do not apply to a method with prototypes: its "projection" is the
    # student's prototype scores, which share a large common component, so that their (uncentred)
    # RankMe sits near 1 and their L2 std under 0.1 while they still vary with the input
    # (CollapseThresholds.check_projection). Scores that no longer depend on the input are uniform or
    # one-hot prototype collapse, which "cluster" names. Versions 1 and 2 kept the L2-std rule there,
    # ranked after the one-hot and uniform rules.
    has_prototypes = any(key in present for key in (occupancy_key, *_CLUSTER_METRICS))
    projection = []
    if t.check_projection and not has_prototypes:
        projection = below("l2_std_projection", t.complete_max_l2_std) + below(
            "rankme_projection", t.complete_max_effective_rank)
    elif t.check_projection and version < 3:
        projection = below("l2_std_projection", t.complete_max_l2_std)

    findings: dict[str, list[str]] = {}
    if complete:
        findings[CollapseType.COMPLETE.value] = complete + projection
    if cluster:
        findings[CollapseType.CLUSTER.value] = cluster
    if projection and not complete:
        findings[CollapseType.COMPLETE.value] = projection
    if partial:
        findings[CollapseType.PARTIAL.value] = partial
    dimensional = below("rankme_embedding_norm", t.dimensional_max_rank_fraction)
    if dimensional:
        findings[CollapseType.DIMENSIONAL.value] = dimensional
    return findings


def collapse_diagnosis(
    metrics: Mapping[str, object], thresholds: CollapseThresholds = CollapseThresholds(),
    version: int = VERDICT_VERSION,
) -> tuple[str, list[str]]:
    """The verdict of :func:`collapse_verdict` and the reasons for it (the rules that fired).

    The verdict is the first kind of :func:`collapse_findings`: diverged, complete (of the
    embedding), cluster (one-hot or uniform assignments), complete (of the projection), partial (few
    prototypes used), dimensional, else none. Reasons read like ``"l2_std_embedding 0.031 < 0.1"``;
    they are empty for "none". ``version``: an earlier verdict, for searches started under it
    (:func:`collapse_findings`).
    """
    return first_finding(collapse_findings(metrics, thresholds, version))


def first_finding(findings: Mapping[str, list[str]]) -> tuple[str, list[str]]:
    """The verdict and its reasons from :func:`collapse_findings`' result: its first kind, or "none"."""
    return next(iter(findings.items())) if findings else (CollapseType.NONE.value, [])


def collapse_verdict(
    metrics: Mapping[str, object], thresholds: CollapseThresholds = CollapseThresholds()
) -> str:
    """One of "none", "complete", "dimensional", "cluster", "partial", "diverged" (:class:`CollapseType` values).

    ``metrics`` is the dict from :func:`collapse_metrics`, optionally with the training ``"loss"``
    added (a NaN/inf loss means "diverged"); keys it does not know are ignored and missing ones
    skip their rules. See :class:`CollapseThresholds` for each line and
    :func:`collapse_diagnosis` for the reasons behind a verdict.
    """
    return collapse_diagnosis(metrics, thresholds)[0]
