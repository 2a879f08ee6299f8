"""The five registered pretext methods with a tiny backbone: multi-view losses against the pair
averages documented in each class (computed here from the reference formulas in tests/test_losses.py),
EMA teachers and schedules against their formulas, the DINO centre, collapse outputs, parameter
separation, input checks and a few optimiser steps that must reduce the loss."""

from __future__ import annotations

import copy
import dataclasses
import math
from itertools import combinations, permutations

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from musicssl.pretext.base import PretextMethod, Progress
from musicssl.pretext.registry import available_methods, get_method
from test_losses import (  # the reference definitions, written out once
    as_numpy,
    reference_barlow_twins,
    reference_byol,
    reference_dino,
    reference_nt_xent,
    reference_vicreg,
)

N_MELS, FRAMES, EMBEDDING_DIM, BATCH = 4, 6, 16, 8
METHODS = ["barlow_twins", "byol", "clustering", "contrastive", "vicreg"]
EMA_METHODS = ["byol", "clustering"]

# Heads scaled down with the tiny backbone, as a CPU run scales them with its 256-d embedding.
SMALL_HEADS = {
    "contrastive": {"hidden_dim": 32, "projection_dim": 24},
    "byol": {"hidden_dim": 32, "projection_dim": 24, "predictor_hidden_dim": 12},
    "clustering": {"hidden_dim": 32, "bottleneck_dim": 8, "num_prototypes": 20},
    "barlow_twins": {"hidden_dim": 32, "projection_dim": 24},
    "vicreg": {"hidden_dim": 32, "projection_dim": 24},
}


class TinyBackbone(nn.Module):
    """(B, n_mels, frames) -> (B, embedding_dim): flatten and a two-layer MLP."""

    def __init__(self, embedding_dim: int = EMBEDDING_DIM) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(N_MELS * FRAMES, 32), nn.ReLU(), nn.Linear(32, embedding_dim)
        )

    def forward(self, mels: Tensor) -> Tensor:
        return self.net(mels)


def build(name: str, seed: int = 0, **overrides) -> PretextMethod:
    torch.manual_seed(seed)
    method_class = get_method(name)
    config = method_class.Config(**{**SMALL_HEADS[name], **overrides})
    return method_class(TinyBackbone(), config)


def make_views(n_views: int, seed: int = 1, batch: int = BATCH) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, N_MELS, FRAMES, generator=generator)
    return [base + 0.3 * torch.randn(batch, N_MELS, FRAMES, generator=generator) for _ in range(n_views)]


PROGRESS = Progress(step=30, total_steps=100, steps_per_epoch=10)


def expected_ema_rate(base: float, step: int, total: int) -> float:
    """BYOL: tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / total) + 1.0) / 2.0


# --------------------------------------------------------------------------------------------------
# Registry and configuration


def test_registry_lists_exactly_the_five_methods() -> None:
    assert available_methods() == METHODS
    for name in METHODS:
        method_class = get_method(name)
        assert method_class.name == name
        assert issubclass(method_class, PretextMethod)
        assert dataclasses.is_dataclass(method_class.Config)


# The defaults, from the study's public code (its loss settings and heads): the study's heads,
# temperatures and EMA rates; for Barlow Twins and VICReg the original papers' weights (lambda 0.0051;
# 25/25/1), not the study's "feature_stats" variants (means of the diagonal and off-diagonal terms;
# 1/1/1 with covariance on batch-normalised features), which the trainer does not implement.
DEFAULTS = {
    "contrastive": {"temperature": 0.1, "hidden_dim": 1024, "projection_dim": 2048},
    "byol": {
        "base_ema_rate": 0.996,
        "hidden_dim": 1024,
        "projection_dim": 2048,
        "predictor_hidden_dim": 256,
        "use_predictor": True,
        "predictor_lr_scale": 1.0,  # the study trains the predictor at the encoder's learning rate
    },
    "clustering": {
        "num_prototypes": 4096,
        "hidden_dim": 1024,
        "bottleneck_dim": 256,
        "student_temperature": 0.1,
        "teacher_temperature": 0.04,
        "teacher_temperature_start": 0.02,
        "teacher_warmup_epochs": 10.0,
        "center_momentum": 0.9,
        "base_ema_rate": 0.996,
        "use_centering": True,
    },
    "barlow_twins": {"lambd": 0.0051, "hidden_dim": 1024, "projection_dim": 2048},
    "vicreg": {"inv_weight": 25.0, "var_weight": 25.0, "cov_weight": 1.0, "hidden_dim": 1024, "projection_dim": 2048},
}


@pytest.mark.parametrize("name", METHODS)
def test_config_defaults_are_the_documented_settings_and_plain_typed(name: str) -> None:
    config = get_method(name).Config()
    assert dataclasses.asdict(config) == DEFAULTS[name]
    for field in dataclasses.fields(config):
        assert field.type in ("int", "float", "bool"), (field.name, field.type)


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("contrastive", {"temperature": 0.0}, "temperature must be > 0"),
        ("byol", {"base_ema_rate": 1.5}, r"base_ema_rate must be in \[0, 1\]"),
        ("clustering", {"num_prototypes": 1}, "num_prototypes must be at least 2"),
        ("clustering", {"teacher_temperature": -0.1}, "teacher_temperature must be > 0"),
        ("clustering", {"center_momentum": 2.0}, "center_momentum must be in"),
        ("barlow_twins", {"lambd": -1.0}, "lambd must be >= 0"),
        ("vicreg", {"hidden_dim": 0}, "hidden_dim must be a positive integer"),
        # NaN passed "x < 0" and "x <= 0" tests (a run that diverged at its first step); inf ended in
        # int(inf)'s OverflowError; 2.5 dims were truncated to 2.
        ("vicreg", {"var_weight": math.nan}, "var_weight must be >= 0, got nan"),
        ("barlow_twins", {"lambd": math.inf}, "lambd must be >= 0, got inf"),
        ("contrastive", {"temperature": math.nan}, "temperature must be > 0, got nan"),
        ("clustering", {"teacher_warmup_epochs": math.nan}, "teacher_warmup_epochs must be >= 0, got nan"),
        ("clustering", {"center_momentum": math.nan}, r"center_momentum must be in \[0, 1\], got nan"),
        ("clustering", {"num_prototypes": math.inf}, r"num_prototypes must be at least 2 \(a whole number\), got inf"),
        ("byol", {"predictor_lr_scale": math.inf}, "predictor_lr_scale must be > 0, got inf"),
        ("byol", {"hidden_dim": 2.5}, "hidden_dim must be a positive integer, got 2.5"),
        ("vicreg", {"projection_dim": True}, "projection_dim must be a positive integer, got True"),
    ],
)
def test_bad_config_values_are_rejected(name: str, bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        get_method(name).Config(**bad)


def test_default_heads_have_the_study_sizes() -> None:
    backbone = TinyBackbone(embedding_dim=1024)
    assert get_method("vicreg")(backbone).projector.dims == (1024, 1024, 1024, 2048)
    byol_method = get_method("byol")(TinyBackbone(embedding_dim=1024))
    assert byol_method.predictor.dims == (2048, 256, 2048)
    assert get_method("clustering")(TinyBackbone(embedding_dim=1024)).head.dims == (1024, 1024, 1024, 256, 4096)


def test_heads_scale_with_the_backbone() -> None:
    method_class = get_method("barlow_twins")
    method = method_class(TinyBackbone(embedding_dim=256), method_class.Config(hidden_dim=512, projection_dim=1024))
    assert method.projector.dims == (256, 512, 512, 1024)


def test_bad_backbone_and_config_are_rejected() -> None:
    with pytest.raises(ValueError, match="embedding_dim"):
        get_method("vicreg")(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="VICRegConfig"):
        get_method("vicreg")(TinyBackbone(), get_method("contrastive").Config())


@pytest.mark.parametrize("name", METHODS)
def test_bad_views_are_rejected(name: str) -> None:
    method = build(name)
    with pytest.raises(ValueError, match="at least 2 views"):
        method.training_loss(make_views(1), PROGRESS)
    with pytest.raises(ValueError, match="same shape"):
        method.training_loss([make_views(1)[0], make_views(1, batch=BATCH - 1)[0]], PROGRESS)
    with pytest.raises(TypeError, match="sequence of V tensors"):
        method.training_loss(torch.stack(make_views(2)), PROGRESS)


# --------------------------------------------------------------------------------------------------
# training_loss


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("name", METHODS)
def test_training_loss_is_finite_and_backpropagates(name: str, n_views: int) -> None:
    method = build(name)
    result = method.training_loss(make_views(n_views), PROGRESS)
    expected_terms = {
        "contrastive": {"positive_similarity", "negative_similarity"},
        "byol": {"cosine_similarity", "ema_rate"},
        "clustering": {"teacher_entropy", "student_entropy", "teacher_temperature", "ema_rate"},
        "barlow_twins": {"on_diagonal", "off_diagonal"},
        "vicreg": {"invariance", "variance", "covariance"},
    }[name]
    assert set(result) == {"loss"} | expected_terms
    for key, value in result.items():
        assert value.dim() == 0 and torch.isfinite(value), key
        assert value.requires_grad == (key == "loss"), key
    result["loss"].backward()
    student = {id(p) for p in method.student_parameters()}
    for parameter_name, parameter in method.named_parameters():
        if id(parameter) in student:
            assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), parameter_name
        else:
            assert parameter.grad is None, parameter_name
    backbone_grads = [p.grad.abs().sum() for p in method.backbone.parameters()]
    assert sum(backbone_grads) > 0


def projections_of(method: PretextMethod, views: list[Tensor]) -> list[np.ndarray]:
    """The student's head outputs per view, one pass per view as in the study's code: in training mode
    BatchNorm normalises each view with its own batch statistics."""
    outputs = []
    with torch.no_grad():
        for view in views:
            head = method.head if hasattr(method, "head") else method.projector
            output = head(method.backbone(view))
            if hasattr(method, "predictor"):
                output = method.predictor(output)
            outputs.append(as_numpy(output))
    return outputs


def teacher_outputs(method: PretextMethod, views: list[Tensor]) -> list[Tensor]:
    """The EMA teacher's head outputs, one pass per view."""
    head = method.teacher_head if hasattr(method, "teacher_head") else method.teacher_projector
    with torch.no_grad():
        return [head(method.teacher_backbone(view)) for view in views]


def make_the_teacher_unlike_the_student(method: PretextMethod, seed: int = 7) -> None:
    """``build`` makes the EMA teacher an exact copy of the student: a test that compares a loss or an
    output with the teacher's could not tell which network the code read. Perturbed, it can."""
    generator = torch.Generator().manual_seed(seed)
    head = method.teacher_head if hasattr(method, "teacher_head") else method.teacher_projector
    with torch.no_grad():
        for module in (method.teacher_backbone, head):
            for parameter in module.parameters():
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    student_head = method.head if hasattr(method, "head") else method.projector
    mels = make_views(1, seed=11)[0]
    with torch.no_grad():
        assert not torch.allclose(head(method.teacher_backbone(mels)), student_head(method.backbone(mels)), atol=1e-3)


# Settings other than the defaults, for each method's loss: a method that read a default in place of its
# setting (what a search tunes) would still match the reference at the defaults.
NON_DEFAULT_SETTINGS = {
    "contrastive": {"temperature": 0.5},
    "barlow_twins": {"lambd": 0.2},
    "vicreg": {"inv_weight": 1.0, "var_weight": 3.0, "cov_weight": 0.04},
    "clustering": {"student_temperature": 0.3, "teacher_temperature": 0.07, "teacher_temperature_start": 0.05,
                   "teacher_warmup_epochs": 5.0},
}


@pytest.mark.parametrize("settings", ["default", "other"])
@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("name", ["contrastive", "barlow_twins", "vicreg"])
def test_symmetric_methods_average_the_reference_loss_over_unordered_pairs(name: str, n_views: int,
                                                                            settings: str) -> None:
    method = build(name, **(NON_DEFAULT_SETTINGS[name] if settings == "other" else {}))
    views = make_views(n_views)
    z = projections_of(method, views)
    config = method.config
    if settings == "other":
        assert all(getattr(config, key) == value for key, value in NON_DEFAULT_SETTINGS[name].items())
    reference = {
        "contrastive": lambda a, b: reference_nt_xent(a, b, config.temperature),
        "barlow_twins": lambda a, b: reference_barlow_twins(a, b, config.lambd)["loss"],
        "vicreg": lambda a, b: reference_vicreg(a, b, config.inv_weight, config.var_weight, config.cov_weight)["loss"],
    }[name]
    expected = np.mean([reference(z[i], z[j]) for i, j in combinations(range(n_views), 2)])
    actual = method.training_loss(views, PROGRESS)["loss"].item()
    assert abs(actual - expected) <= 1e-5 * max(1.0, abs(expected))


@pytest.mark.parametrize("n_views", [2, 3])
@pytest.mark.parametrize("use_predictor", [True, False])
def test_byol_averages_ordered_pairs_against_the_teacher(n_views: int, use_predictor: bool) -> None:
    method = build("byol", use_predictor=use_predictor)
    make_the_teacher_unlike_the_student(method)
    if not use_predictor:
        assert isinstance(method.predictor, nn.Identity)
    views = make_views(n_views)
    predictions = projections_of(method, views)
    targets = teacher_outputs(method, views)
    expected = np.mean(
        [reference_byol(predictions[i], as_numpy(targets[j])) for i, j in permutations(range(n_views), 2)]
    )
    result = method.training_loss(views, PROGRESS)
    assert abs(result["loss"].item() - expected) <= 1e-5
    assert abs(float(result["ema_rate"]) - expected_ema_rate(0.996, 30, 100)) < 1e-7


@pytest.mark.parametrize("settings", ["default", "other"])
@pytest.mark.parametrize("n_views", [2, 3])
def test_clustering_follows_dinos_loss_over_different_views(n_views: int, settings: str) -> None:
    other = settings == "other"
    method = build("clustering", **(NON_DEFAULT_SETTINGS["clustering"] if other else {}))
    make_the_teacher_unlike_the_student(method)
    method.center.copy_(torch.linspace(-0.2, 0.3, 20))
    views = make_views(n_views)
    student = projections_of(method, views)
    teacher = teacher_outputs(method, views)
    progress = Progress(step=25, total_steps=1000, steps_per_epoch=10)  # epoch 2.5 of the warm-up
    # Student temperature, teacher temperature from its start to its end over the warm-up, written out.
    student_temperature, start, end, warmup = (0.3, 0.05, 0.07, 5.0) if other else (0.1, 0.02, 0.04, 10.0)
    teacher_temperature = start + (end - start) * 2.5 / warmup
    center = as_numpy(method.center)
    # facebookresearch/dino DINOLoss: sum over teacher view iq and student view v != iq, divided by the count.
    terms = [
        reference_dino(student[v], as_numpy(teacher[iq]), center, student_temperature, teacher_temperature)
        for iq in range(n_views)
        for v in range(n_views)
        if v != iq
    ]
    result = method.training_loss(views, progress)
    assert abs(result["loss"].item() - np.mean(terms)) <= 1e-5 * max(1.0, abs(np.mean(terms)))
    assert abs(float(result["teacher_temperature"]) - teacher_temperature) < 1e-7


# --------------------------------------------------------------------------------------------------
# Schedules, EMA teachers and the centre


@pytest.mark.parametrize("step", [0, 10, 25, 50, 95, 100, 120])
def test_schedules_match_their_formulas(step: int) -> None:
    method = build("clustering", base_ema_rate=0.99)
    progress = Progress(step=step, total_steps=100, steps_per_epoch=5)
    epoch = step / 5
    expected_temperature = 0.02 + 0.02 * min(1.0, epoch / 10)
    assert abs(method.teacher_temperature(progress) - expected_temperature) < 1e-12
    assert abs(method.ema_rate(progress) - expected_ema_rate(0.99, min(step, 100), 100)) < 1e-12
    byol_method = build("byol", base_ema_rate=0.9)
    assert abs(byol_method.ema_rate(progress) - expected_ema_rate(0.9, min(step, 100), 100)) < 1e-12


def test_no_warmup_uses_the_final_teacher_temperature() -> None:
    method = build("clustering", teacher_warmup_epochs=0.0)
    assert method.teacher_temperature(Progress(0, 100, 10)) == 0.04
    assert float(method.current_teacher_temperature) == pytest.approx(0.04)


@pytest.mark.parametrize("step", [0, 40, 100])
@pytest.mark.parametrize("name", EMA_METHODS)
def test_ema_teacher_moves_towards_the_student_by_the_scheduled_rate(name: str, step: int) -> None:
    method = build(name, base_ema_rate=0.9)
    student_modules = {"byol": ("backbone", "projector"), "clustering": ("backbone", "head")}[name]
    pairs = []
    for module_name in student_modules:
        student = getattr(method, module_name)
        teacher = getattr(method, f"teacher_{module_name}")
        with torch.no_grad():
            for parameter in student.parameters():
                parameter.add_(torch.randn_like(parameter))  # as if the optimiser had moved the student
        pairs += list(zip(teacher.parameters(), student.parameters()))
    before = [teacher.detach().clone() for teacher, _ in pairs]
    assert all(not torch.equal(old, student) for old, (_, student) in zip(before, pairs) if old.numel() > 1)
    method.after_optimizer_step(Progress(step=step, total_steps=100, steps_per_epoch=10))
    rate = expected_ema_rate(0.9, step, 100)
    for old, (teacher, student) in zip(before, pairs):
        torch.testing.assert_close(teacher, rate * old + (1.0 - rate) * student, rtol=0, atol=1e-6)
    if step == 100:  # rate 1: the teacher is frozen at the end of training
        for old, (teacher, _) in zip(before, pairs):
            assert torch.equal(teacher, old)


@pytest.mark.parametrize("name", EMA_METHODS)
def test_teacher_starts_as_a_copy_and_is_excluded_from_the_optimiser(name: str) -> None:
    method = build(name)
    teacher_ids = {id(p) for n, p in method.named_parameters() if n.startswith("teacher_")}
    assert teacher_ids and all(not p.requires_grad for n, p in method.named_parameters() if n.startswith("teacher_"))
    student_ids = {id(p) for p in method.student_parameters()}
    assert not student_ids & teacher_ids
    assert len(student_ids) + len(teacher_ids) == len(list(method.parameters()))
    for student, teacher in zip(method.backbone.parameters(), method.teacher_backbone.parameters()):
        assert torch.equal(student, teacher) and student is not teacher
    method.requires_grad_(True)  # even if someone unfreezes everything, the optimiser never sees the teacher
    assert not {id(p) for p in method.student_parameters()} & teacher_ids


@pytest.mark.parametrize("m", [0.9, 0.7])  # the default, and another (a search samples 1 - m)
def test_clustering_centre_is_an_ema_of_the_teachers_mean_logits(m: float) -> None:
    method = build("clustering", center_momentum=m)
    make_the_teacher_unlike_the_student(method)
    method.center.copy_(torch.linspace(0.0, 1.0, 20))
    views = make_views(3)
    mean_logits = torch.cat(teacher_outputs(method, views)).mean(dim=0)
    previous = method.center.clone()
    method.training_loss(views, PROGRESS)
    torch.testing.assert_close(method.center, previous)  # applied only after the optimiser step
    method.after_optimizer_step(PROGRESS)
    torch.testing.assert_close(method.center, m * previous + (1 - m) * mean_logits, rtol=0, atol=1e-6)
    # Two losses before one step (gradient accumulation): the centre moves towards their mean.
    other = make_views(3, seed=9)
    other_logits = torch.cat(teacher_outputs(method, other)).mean(dim=0)
    mean_logits = torch.cat(teacher_outputs(method, views)).mean(dim=0)
    previous = method.center.clone()
    method.training_loss(views, PROGRESS)
    method.training_loss(other, PROGRESS)
    method.after_optimizer_step(PROGRESS)
    torch.testing.assert_close(method.center, m * previous + (1 - m) * (mean_logits + other_logits) / 2, rtol=0,
                               atol=1e-6)
    # Outside training (eval mode) a loss evaluation never moves the centre.
    method.eval()
    previous = method.center.clone()
    method.training_loss(views, PROGRESS)
    method.after_optimizer_step(PROGRESS)
    torch.testing.assert_close(method.center, previous)


def test_clustering_without_centering_keeps_no_centre() -> None:
    method = build("clustering", use_centering=False)
    views = make_views(2)
    teacher = teacher_outputs(method, views)
    student = projections_of(method, views)
    method.center.fill_(5.0)  # must be ignored
    progress = Progress(step=0, total_steps=100, steps_per_epoch=10)
    no_centre = np.zeros(20)
    expected = np.mean(
        [reference_dino(student[j], as_numpy(teacher[i]), no_centre, 0.1, 0.02) for i, j in permutations(range(2), 2)]
    )
    assert abs(method.training_loss(views, progress)["loss"].item() - expected) <= 1e-5 * max(1.0, expected)
    method.after_optimizer_step(progress)
    assert torch.all(method.center == 5.0)


# --------------------------------------------------------------------------------------------------
# Collapse outputs


@pytest.mark.parametrize("name", METHODS)
def test_collapse_outputs_keys_shapes_and_no_side_effects(name: str) -> None:
    method = build(name)
    if name in EMA_METHODS:
        make_the_teacher_unlike_the_student(method)
    method.training_loss(make_views(2), PROGRESS)  # leaves non-trivial BatchNorm running statistics
    mels = make_views(1, seed=5, batch=6)[0]
    buffers_before = {key: value.clone() for key, value in method.state_dict().items()}
    outputs = method.collapse_outputs(mels)
    head_dim = SMALL_HEADS[name].get("projection_dim", SMALL_HEADS[name].get("num_prototypes"))
    expected = {"embedding": (6, EMBEDDING_DIM), "projection": (6, head_dim)}
    if name in EMA_METHODS:
        expected["teacher_embedding"] = (6, EMBEDDING_DIM)
    if name == "clustering":
        expected["assignment_probs"] = (6, 20)
    assert {key: tuple(value.shape) for key, value in outputs.items()} == expected
    # What a search checks --stop-on cluster/partial against.
    assert type(method).assigns_prototypes == ("assignment_probs" in outputs)
    assert all(not value.requires_grad for value in outputs.values())
    assert method.training  # mode restored
    for key, value in method.state_dict().items():  # running statistics untouched
        assert torch.equal(value, buffers_before[key]), key
    # Eval-mode outputs: the student's embedding and head output (BYOL's without its predictor), and the
    # teacher's embedding (unlike the student's here), each as its network gives it in eval mode.
    method.eval()
    with torch.no_grad():
        torch.testing.assert_close(outputs["embedding"], method.backbone(mels))
        head = method.head if name == "clustering" else method.projector
        torch.testing.assert_close(outputs["projection"], head(method.backbone(mels)))
        if name in EMA_METHODS:
            torch.testing.assert_close(outputs["teacher_embedding"], method.teacher_backbone(mels))


def test_assignment_probs_use_the_centre_and_current_teacher_temperature() -> None:
    method = build("clustering")
    progress = Progress(step=40, total_steps=1000, steps_per_epoch=10)  # epoch 4: T = 0.02 + 0.02 * 0.4
    method.training_loss(make_views(2), progress)
    method.after_optimizer_step(progress)
    mels = make_views(1, seed=6, batch=5)[0]
    probs = method.collapse_outputs(mels)["assignment_probs"]
    method.eval()
    with torch.no_grad():
        logits = as_numpy(method.teacher_head(method.teacher_backbone(mels)))
    centred = (logits - as_numpy(method.center)) / (0.02 + 0.02 * 0.4)
    expected = np.exp(centred - centred.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(as_numpy(probs), expected, atol=1e-6)
    assert float(method.current_teacher_temperature) == pytest.approx(0.028)
    # Before any step it is the warm-up's start (the collapse metrics of an untrained model read it).
    assert float(build("clustering").current_teacher_temperature) == pytest.approx(0.02)


class Float32Backbone(TinyBackbone):
    """The tiny backbone kept in float32 under autocast, so that only the clustering head could round."""

    def forward(self, mels: Tensor) -> Tensor:
        with torch.autocast(device_type=mels.device.type, enabled=False):
            return self.net(mels.float())


def test_clustering_head_runs_in_float32_under_bf16_autocast() -> None:
    # bf16-mixed is the GPU default. The head's K logits are divided by a teacher temperature of
    # 0.02-0.04, so bf16 rounding of them (8-bit mantissa) is magnified 25-50 times; the head (student
    # and teacher) must run in float32, and only the backbone in bf16.
    views = make_views(2)
    method = build("clustering")
    dtypes: list[torch.dtype] = []
    for head in (method.head, method.teacher_head):
        head.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        method.training_loss(views, PROGRESS)
        outputs = method.collapse_outputs(views[0])
    # student and teacher: once per view in training_loss, once each in collapse_outputs
    assert dtypes == [torch.float32] * 6
    assert outputs["projection"].dtype == outputs["assignment_probs"].dtype == torch.float32

    # With a backbone that stays in float32, autocast must then change nothing. Measured (this seed,
    # teacher temperature 0.026): the old bf16 head moved the loss by 1.8 % (2.5263 -> 2.5721) and a
    # teacher probability (assignment_probs) by 0.014; the float32 head reproduces both exactly. (A bf16
    # backbone's own rounding remains and is not fixed: on the CPU preset at initialisation it moves the
    # loss by ~12 % whichever precision the head uses, hence the float32 backbone here.)
    torch.manual_seed(0)
    clustering = get_method("clustering")
    method = clustering(Float32Backbone(), clustering.Config(**SMALL_HEADS["clustering"]))
    results = {}
    for precision in ("float32", "bf16"):
        model = copy.deepcopy(method)  # the same weights, running statistics and centre for both
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model.training_loss(views, PROGRESS)["loss"]
            probs = model.collapse_outputs(views[0])["assignment_probs"]
        results[precision] = (loss.item(), probs)
    (loss_32, probs_32), (loss_16, probs_16) = results["float32"], results["bf16"]
    assert loss_16 == pytest.approx(loss_32, rel=1e-4)
    assert (probs_16 - probs_32).abs().max().item() < 1e-4

    # A model held in bf16 itself (precision="bf16-true") still runs, its heads in bf16.
    bf16 = build("clustering").to(torch.bfloat16)
    loss = bf16.training_loss([view.to(torch.bfloat16) for view in views], PROGRESS)["loss"]
    assert math.isfinite(loss.item())
    assert bf16.collapse_outputs(views[0].to(torch.bfloat16))["projection"].dtype == torch.bfloat16


def test_clustering_state_round_trips_through_state_dict() -> None:
    method = build("clustering")
    progress = Progress(step=40, total_steps=1000, steps_per_epoch=10)
    method.training_loss(make_views(2), progress)
    method.after_optimizer_step(progress)
    restored = build("clustering", seed=99)
    restored.load_state_dict(method.state_dict())
    torch.testing.assert_close(restored.center, method.center)
    mels = make_views(1, seed=7, batch=4)[0]
    torch.testing.assert_close(
        restored.collapse_outputs(mels)["assignment_probs"], method.collapse_outputs(mels)["assignment_probs"]
    )


# --------------------------------------------------------------------------------------------------
# Learning


@pytest.mark.parametrize("name", METHODS)
def test_a_few_optimiser_steps_on_a_fixed_batch_reduce_the_loss(name: str) -> None:
    method = build(name, seed=3)
    views = make_views(2, seed=4, batch=16)
    optimiser = torch.optim.Adam(method.student_parameters(), lr=3e-3)
    losses = []
    # Few steps: for clustering the centre (momentum 0.9) and the teacher move the targets, so its
    # loss falls fast for ~5 steps and then oscillates, as DINO's does; the others keep falling.
    for step in range(8):
        progress = Progress(step=step, total_steps=8, steps_per_epoch=4)
        loss = method.training_loss(views, progress)["loss"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        method.after_optimizer_step(Progress(step=step + 1, total_steps=8, steps_per_epoch=4))
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("name", METHODS)
def test_methods_run_on_the_cpu_backbone_preset(name: str) -> None:
    from musicssl.models import Backbone

    torch.manual_seed(0)
    backbone = Backbone(preset="cpu")
    method_class = get_method(name)
    sizes = {"hidden_dim": 512, "projection_dim": 1024}
    if name == "clustering":
        sizes = {"hidden_dim": 512, "num_prototypes": 512}
    method = method_class(backbone, method_class.Config(**sizes))
    views = [torch.randn(4, 64, 126) for _ in range(2)]
    result = method.training_loss(views, PROGRESS)
    result["loss"].backward()
    assert torch.isfinite(result["loss"])
    outputs = method.collapse_outputs(views[0])
    assert outputs["embedding"].shape == (4, 256)
