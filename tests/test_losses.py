"""The five pure losses against the original authors' definitions, written out independently here in
float64 numpy loops (facebookresearch/vicreg, facebookresearch/barlowtwins, SimCLR, BYOL,
facebookresearch/dino), plus closed-form values, gradient flow and the stop-gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from musicssl.pretext.barlow_twins import barlow_twins
from musicssl.pretext.byol import byol
from musicssl.pretext.clustering import dino
from musicssl.pretext.contrastive import nt_xent
from musicssl.pretext.vicreg import vicreg

TOLERANCE = 1e-5


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def random_pair(batch: int = 12, dim: int = 7, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, dim, generator=generator) * scale
    b = a + 0.5 * torch.randn(batch, dim, generator=generator) * scale
    return a, b


def relative_close(actual: torch.Tensor, expected: float) -> bool:
    return abs(float(actual) - expected) <= TOLERANCE * max(1.0, abs(expected))


# --------------------------------------------------------------------------------------------------
# Reference definitions (loops over the formulas in the papers / authors' code)


def reference_vicreg(x: np.ndarray, y: np.ndarray, inv_w: float, var_w: float, cov_w: float) -> dict[str, float]:
    """facebookresearch/vicreg main_vicreg.py, VICReg.forward, as loops."""
    n, d = x.shape
    invariance = sum((x[i, k] - y[i, k]) ** 2 for i in range(n) for k in range(d)) / (n * d)
    variance = 0.0
    covariance = 0.0
    for z in (x, y):
        means = [sum(z[i, k] for i in range(n)) / n for k in range(d)]
        centred = [[z[i, k] - means[k] for k in range(d)] for i in range(n)]
        hinge = 0.0
        for k in range(d):
            unbiased_var = sum(centred[i][k] ** 2 for i in range(n)) / (n - 1)
            hinge += max(0.0, 1.0 - math.sqrt(unbiased_var + 1e-4))
        variance += hinge / d / 2
        off_diagonal = 0.0
        for k in range(d):
            for m in range(d):
                if k != m:
                    cov = sum(centred[i][k] * centred[i][m] for i in range(n)) / (n - 1)
                    off_diagonal += cov**2
        covariance += off_diagonal / d
    loss = inv_w * invariance + var_w * variance + cov_w * covariance
    return {"loss": loss, "invariance": invariance, "variance": variance, "covariance": covariance}


def reference_barlow_twins(a: np.ndarray, b: np.ndarray, lambd: float) -> dict[str, float]:
    """facebookresearch/barlowtwins main.py: BatchNorm1d(affine=False) in training mode, c / batch size."""
    n, d = a.shape

    def standardise(z: np.ndarray) -> np.ndarray:
        mean = z.sum(axis=0) / n
        biased_var = ((z - mean) ** 2).sum(axis=0) / n
        return (z - mean) / np.sqrt(biased_var + 1e-5)

    za, zb = standardise(a), standardise(b)
    on_diagonal = 0.0
    off_diagonal = 0.0
    for k in range(d):
        for m in range(d):
            c = sum(za[i, k] * zb[i, m] for i in range(n)) / n
            if k == m:
                on_diagonal += (c - 1.0) ** 2
            else:
                off_diagonal += c**2
    return {"loss": on_diagonal + lambd * off_diagonal, "on_diagonal": on_diagonal, "off_diagonal": off_diagonal}


def reference_nt_xent(a: np.ndarray, b: np.ndarray, temperature: float) -> float:
    """SimCLR (Chen et al. 2020, eq. 1): l(i, j) = -log exp(s_ij / t) / sum_{k != i} exp(s_ik / t), mean of 2N rows."""
    n = a.shape[0]
    rows = np.concatenate([a, b])
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    total = 0.0
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        denominator = sum(math.exp(float(rows[i] @ rows[k]) / temperature) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(rows[i] @ rows[positive]) / temperature) / denominator)
    return total / (2 * n)


def reference_byol(p: np.ndarray, z: np.ndarray) -> float:
    """BYOL (Grill et al. 2020, eq. 2): || p/|p| - z/|z| ||^2 = 2 - 2 cos, averaged over the batch."""
    total = 0.0
    for i in range(p.shape[0]):
        difference = p[i] / np.linalg.norm(p[i]) - z[i] / np.linalg.norm(z[i])
        total += float(difference @ difference)
    return total / p.shape[0]


def reference_dino(student: np.ndarray, teacher: np.ndarray, center: np.ndarray, t_s: float, t_t: float) -> float:
    """facebookresearch/dino DINOLoss for one (teacher view, student view) pair."""
    total = 0.0
    for i in range(student.shape[0]):
        q = np.exp((teacher[i] - center) / t_t - np.max((teacher[i] - center) / t_t))
        q = q / q.sum()
        s = student[i] / t_s
        log_p = s - (np.max(s) + math.log(np.exp(s - np.max(s)).sum()))
        total += float(-(q * log_p).sum())
    return total / student.shape[0]


# --------------------------------------------------------------------------------------------------
# VICReg


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 1.0, 1.0), (0.5, 3.0, 0.04)])
@pytest.mark.parametrize("scale", [0.3, 1.5])
def test_vicreg_matches_reference(weights: tuple[float, float, float], scale: float) -> None:
    a, b = random_pair(scale=scale, seed=int(10 * scale))
    result = vicreg(a, b, *weights)
    expected = reference_vicreg(as_numpy(a), as_numpy(b), *weights)
    assert set(result) == {"loss", "invariance", "variance", "covariance"}
    for key, value in expected.items():
        assert relative_close(result[key], value), (key, float(result[key]), value)


def test_vicreg_default_weights_are_25_25_1() -> None:
    a, b = random_pair(seed=3)
    expected = reference_vicreg(as_numpy(a), as_numpy(b), 25.0, 25.0, 1.0)
    assert relative_close(vicreg(a, b)["loss"], expected["loss"])


def test_vicreg_known_values() -> None:
    # Identical views: no invariance term. Whitened features with std 2: no variance or covariance term.
    generator = torch.Generator().manual_seed(1)
    centred = torch.randn(32, 6, generator=generator, dtype=torch.float64)
    centred = centred - centred.mean(dim=0)
    q, _ = torch.linalg.qr(centred)  # orthonormal columns with zero mean: covariance q^T q / (n-1) = I / (n-1)
    z = (q * 2.0 * math.sqrt(31)).float()
    result = vicreg(z, z.clone())
    assert float(result["invariance"]) == 0.0
    assert float(result["variance"]) == 0.0
    assert float(result["covariance"]) < 1e-9
    # Constant (fully collapsed) embeddings: std = sqrt(1e-4) = 0.01, so variance = 2 * (1 - 0.01) / 2.
    constant = torch.ones(8, 5)
    collapsed = vicreg(constant, constant)
    assert relative_close(collapsed["variance"], 0.99)
    assert relative_close(collapsed["loss"], 25.0 * 0.99)


# --------------------------------------------------------------------------------------------------
# Barlow Twins


@pytest.mark.parametrize("lambd", [0.0051, 1.0 / 7, 0.0])
def test_barlow_twins_matches_reference(lambd: float) -> None:
    a, b = random_pair(batch=16, dim=6, seed=5)
    result = barlow_twins(a, b, lambd)
    expected = reference_barlow_twins(as_numpy(a), as_numpy(b), lambd)
    assert set(result) == {"loss", "on_diagonal", "off_diagonal"}
    for key, value in expected.items():
        assert relative_close(result[key], value), (key, float(result[key]), value)


def test_barlow_twins_matches_authors_torch_code() -> None:
    # facebookresearch/barlowtwins main.py, verbatim apart from names: nn.BatchNorm1d(affine=False).
    a, b = random_pair(batch=24, dim=9, seed=6)
    bn = nn.BatchNorm1d(9, affine=False)
    c = bn(a).T @ bn(b)
    c.div_(24)
    on_diag = torch.diagonal(c).add_(-1).pow_(2).sum()
    off_diag = c.flatten()[:-1].view(8, 10)[:, 1:].flatten().pow_(2).sum()
    assert relative_close(barlow_twins(a, b)["loss"], float(on_diag + 0.0051 * off_diag))


def test_barlow_twins_perfectly_correlated_decorrelated_views_give_zero() -> None:
    generator = torch.Generator().manual_seed(2)
    centred = torch.randn(64, 8, generator=generator, dtype=torch.float64)
    q, _ = torch.linalg.qr(centred - centred.mean(dim=0))
    z = (q * math.sqrt(64)).float()  # zero mean, biased variance 1, uncorrelated features
    result = barlow_twins(z, 3.0 * z + 1.0)  # standardisation removes the affine map
    # c = I * var / (var + eps): on-diagonal 8 * (1e-5)^2 ~ 1e-9
    assert float(result["loss"]) < 1e-6
    assert float(result["off_diagonal"]) < 1e-9


# --------------------------------------------------------------------------------------------------
# NT-Xent


@pytest.mark.parametrize("temperature", [0.1, 0.5, 1.0])
def test_nt_xent_matches_reference(temperature: float) -> None:
    a, b = random_pair(batch=10, dim=5, seed=7)
    result = nt_xent(a, b, temperature)
    assert set(result) == {"loss", "positive_similarity", "negative_similarity"}
    assert relative_close(result["loss"], reference_nt_xent(as_numpy(a), as_numpy(b), temperature))
    na = as_numpy(a) / np.linalg.norm(as_numpy(a), axis=1, keepdims=True)
    nb = as_numpy(b) / np.linalg.norm(as_numpy(b), axis=1, keepdims=True)
    assert relative_close(result["positive_similarity"], float((na * nb).sum(axis=1).mean()))
    # Negatives: every ordered pair of the 2N rows except a row with itself and with its positive.
    rows = np.concatenate([na, nb])
    n = len(na)
    negatives = [float(rows[i] @ rows[j]) for i in range(2 * n) for j in range(2 * n) if j not in (i, (i + n) % (2 * n))]
    assert len(negatives) == 2 * n * (2 * n - 2)
    assert relative_close(result["negative_similarity"], float(np.mean(negatives)))


def test_nt_xent_default_temperature_is_0_1() -> None:
    a, b = random_pair(batch=6, dim=4, seed=8)
    assert relative_close(nt_xent(a, b)["loss"], reference_nt_xent(as_numpy(a), as_numpy(b), 0.1))


@pytest.mark.parametrize("n, temperature", [(4, 0.1), (8, 0.5)])
def test_nt_xent_orthogonal_negatives_closed_form(n: int, temperature: float) -> None:
    # Positives identical (cos 1), every negative orthogonal (cos 0): each row's loss is
    # -log(e^{1/t} / (e^{1/t} + 2n - 2)) = log(1 + (2n - 2) e^{-1/t}).
    z = torch.eye(n, 2 * n) * 3.0
    result = nt_xent(z, z.clone(), temperature)
    expected = math.log(1.0 + (2 * n - 2) * math.exp(-1.0 / temperature))
    assert relative_close(result["loss"], expected)
    assert relative_close(result["positive_similarity"], 1.0)
    assert abs(float(result["negative_similarity"])) < 1e-7


# --------------------------------------------------------------------------------------------------
# BYOL


def test_byol_matches_reference() -> None:
    p, z = random_pair(batch=9, dim=6, seed=9)
    result = byol(p, z)
    assert relative_close(result["loss"], reference_byol(as_numpy(p), as_numpy(z)))
    assert relative_close(result["loss"], 2.0 - 2.0 * float(result["cosine_similarity"]))


def test_byol_known_values() -> None:
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert relative_close(byol(p, 5.0 * p)["loss"], 0.0)  # aligned
    assert relative_close(byol(p, -p)["loss"], 4.0)  # opposite
    assert relative_close(byol(p, p.flip(1))["loss"], 2.0)  # orthogonal


# --------------------------------------------------------------------------------------------------
# DINO


@pytest.mark.parametrize("t_s, t_t", [(0.1, 0.04), (0.2, 0.07), (1.0, 1.0)])
def test_dino_matches_reference(t_s: float, t_t: float) -> None:
    generator = torch.Generator().manual_seed(11)
    student = torch.randn(10, 16, generator=generator)
    teacher = torch.randn(10, 16, generator=generator)
    center = 0.3 * torch.randn(16, generator=generator)
    result = dino(student, teacher, center, t_s, t_t)
    expected = reference_dino(as_numpy(student), as_numpy(teacher), as_numpy(center), t_s, t_t)
    assert relative_close(result["loss"], expected)
    # The logged entropies: of the centred, sharpened teacher and of the student, each its own.
    def entropy(logits: np.ndarray) -> float:
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        return float(-(probs * np.log(probs)).sum(axis=1).mean())

    assert relative_close(result["teacher_entropy"], entropy((as_numpy(teacher) - as_numpy(center)) / t_t))
    assert relative_close(result["student_entropy"], entropy(as_numpy(student) / t_s))


def test_dino_defaults_are_0_1_and_0_04() -> None:
    generator = torch.Generator().manual_seed(12)
    student, teacher = torch.randn(2, 5, 8, generator=generator)
    center = torch.zeros(8)
    expected = reference_dino(as_numpy(student), as_numpy(teacher), as_numpy(center), 0.1, 0.04)
    assert relative_close(dino(student, teacher, center)["loss"], expected)


def test_dino_student_equal_to_teacher_gives_the_entropy() -> None:
    generator = torch.Generator().manual_seed(13)
    logits = torch.randn(6, 10, generator=generator)
    result = dino(logits, logits.clone(), torch.zeros(10), student_temp=0.5, teacher_temp=0.5)
    probs = np.exp(as_numpy(logits) / 0.5)
    probs /= probs.sum(axis=1, keepdims=True)
    entropy = float(-(probs * np.log(probs)).sum(axis=1).mean())
    assert relative_close(result["loss"], entropy)
    assert relative_close(result["teacher_entropy"], entropy)
    assert relative_close(result["student_entropy"], entropy)


def test_dino_uniform_collapse_is_log_k() -> None:
    # A run stuck at uniform assignments has loss ln K (8.318 for K = 4096, the study's default).
    logits = torch.full((4, 4096), 0.7)
    result = dino(logits, logits.clone(), torch.zeros(4096))
    assert relative_close(result["loss"], math.log(4096))
    assert float(result["loss"]) == pytest.approx(8.318, abs=5e-4)  # ln 4096, to the digits quoted


def test_dino_centering_is_subtracted() -> None:
    # A centre equal to the teacher's logits makes the teacher uniform: loss = mean -log_softmax / K.
    generator = torch.Generator().manual_seed(14)
    student = torch.randn(3, 5, generator=generator)
    teacher = torch.randn(1, 5, generator=generator).expand(3, 5).contiguous()
    result = dino(student, teacher, teacher[0])
    log_p = torch.log_softmax(student.double() / 0.1, dim=1)
    assert relative_close(result["loss"], float(-(log_p.mean(dim=1)).mean()))
    assert relative_close(result["teacher_entropy"], math.log(5))


# --------------------------------------------------------------------------------------------------
# Gradients, stop-gradients, precision and input checks


def test_symmetric_losses_send_gradients_to_both_inputs() -> None:
    for loss_fn in (vicreg, barlow_twins, nt_xent):
        a, b = random_pair(batch=8, dim=5, seed=15)
        a.requires_grad_(True)
        b.requires_grad_(True)
        loss_fn(a, b)["loss"].backward()
        for grad in (a.grad, b.grad):
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, loss_fn.__name__


def test_byol_has_no_gradient_into_the_target() -> None:
    p, z = random_pair(batch=8, dim=5, seed=16)
    p.requires_grad_(True)
    z.requires_grad_(True)
    byol(p, z)["loss"].backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


def test_dino_has_no_gradient_into_teacher_or_centre() -> None:
    generator = torch.Generator().manual_seed(17)
    student = torch.randn(4, 6, generator=generator, requires_grad=True)
    teacher = torch.randn(4, 6, generator=generator, requires_grad=True)
    center = torch.randn(6, generator=generator, requires_grad=True)
    dino(student, teacher, center)["loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None and center.grad is None


def test_losses_compute_in_float32_under_bfloat16_autocast() -> None:
    a, b = random_pair(batch=16, dim=6, seed=18)
    a16, b16 = a.bfloat16(), b.bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        result = vicreg(a16, b16)
        barlow = barlow_twins(a16, b16)
    expected = reference_vicreg(as_numpy(a16.float()), as_numpy(b16.float()), 25.0, 25.0, 1.0)
    assert result["loss"].dtype == torch.float32
    assert relative_close(result["loss"], expected["loss"])
    expected_barlow = reference_barlow_twins(as_numpy(a16.float()), as_numpy(b16.float()), 0.0051)
    assert relative_close(barlow["loss"], expected_barlow["loss"])


def test_nt_xent_byol_and_dino_compute_in_float32_under_bfloat16_autocast() -> None:
    a, b = random_pair(batch=16, dim=6, seed=19)
    a16, b16 = a.bfloat16(), b.bfloat16()
    center = torch.linspace(-0.2, 0.2, 6).bfloat16()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        contrastive = nt_xent(a16, b16, 0.1)
        bootstrap = byol(a16, b16)
        clustering = dino(a16, b16, center, 0.1, 0.04)
    x, y, c = as_numpy(a16.float()), as_numpy(b16.float()), as_numpy(center.float())
    for result, expected in ((contrastive, reference_nt_xent(x, y, 0.1)), (bootstrap, reference_byol(x, y)),
                             (clustering, reference_dino(x, y, c, 0.1, 0.04))):
        assert result["loss"].dtype == torch.float32
        assert relative_close(result["loss"], expected)


@pytest.mark.parametrize("loss_fn", [vicreg, barlow_twins, nt_xent, byol])
def test_mismatched_or_bad_shapes_are_rejected(loss_fn) -> None:
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(torch.randn(4, 3, 2), torch.randn(4, 3, 2))


@pytest.mark.parametrize("loss_fn", [vicreg, barlow_twins, nt_xent])
def test_batch_statistics_need_two_rows(loss_fn) -> None:
    with pytest.raises(ValueError, match="at least 2 rows"):
        loss_fn(torch.randn(1, 3), torch.randn(1, 3))


def test_dino_rejects_wrong_centre_and_temperature() -> None:
    with pytest.raises(ValueError, match="one entry per prototype"):
        dino(torch.randn(2, 4), torch.randn(2, 4), torch.zeros(5))
    with pytest.raises(ValueError, match="temperatures must be > 0"):
        dino(torch.randn(2, 4), torch.randn(2, 4), torch.zeros(4), teacher_temp=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        nt_xent(torch.randn(2, 4), torch.randn(2, 4), temperature=-1.0)
