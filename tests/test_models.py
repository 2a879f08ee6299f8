"""Backbone and heads: sizes against formulas written out here, the study's published parameter
count, shapes, input validation, gradient flow, mixed precision and the attention pool against
torch's own multi-head attention."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from musicssl.models import (
    CPU,
    PAPER,
    PRESETS,
    Backbone,
    BackboneConfig,
    MLPHead,
    checkpoint_bytes,
    byol_predictor,
    clustering_head,
    parameter_counts,
    projector,
    token_grid_size,
)

# --------------------------------------------------------------------------------------------------
# Independent size formulas (from the study's architecture: its public code, deezer/multi-view-ssl-benchmark)


def conv_params(in_channels: int, out_channels: int, kernel: int) -> int:
    return in_channels * out_channels * kernel * kernel  # no bias: every conv feeds a BatchNorm


def bn_params(channels: int) -> int:
    return 2 * channels  # weight and bias


def bottleneck_params(in_channels: int, planes: int, strided: bool) -> int:
    out_channels = 4 * planes
    total = conv_params(in_channels, planes, 1) + bn_params(planes)
    total += conv_params(planes, planes, 3) + bn_params(planes)
    total += conv_params(planes, out_channels, 1) + bn_params(out_channels)
    if strided or in_channels != out_channels:  # shortcut: (avg pool) -> 1x1 conv -> BN
        total += conv_params(in_channels, out_channels, 1) + bn_params(out_channels)
    return total


def trunk_params(width: int, layers: tuple[int, ...]) -> int:
    half = width // 2
    total = conv_params(1, half, 3) + bn_params(half)
    total += conv_params(half, half, 3) + bn_params(half)
    total += conv_params(half, width, 3) + bn_params(width)
    in_channels = width
    for stage, blocks in enumerate(layers):
        planes = width * 2**stage
        total += bottleneck_params(in_channels, planes, strided=stage > 0)
        in_channels = 4 * planes
        total += (blocks - 1) * bottleneck_params(in_channels, planes, strided=False)
    return total


def spatial_size_after_trunk(n: int) -> int:
    """Conv arithmetic: 3x3 stride-2 pad-1 conv, then five 2x2 average pools (stem + stages 2-4)."""
    size = math.floor((n + 2 * 1 - 3) / 2) + 1
    for _ in range(4):
        size = size // 2
    return size


def attention_pool_params(tokens: int, channels: int, embedding_dim: int) -> int:
    positional = tokens * channels
    qkv = 3 * (channels * channels + channels)
    output = channels * embedding_dim + embedding_dim
    return positional + qkv + output


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------------
# Parameter counts and structure


def test_paper_backbone_has_the_published_parameter_count():
    backbone = Backbone(preset="paper")
    # Published figure (counted from the study's code): 2,800,392 = trunk 1,480,456 + pool 1,319,936.
    assert trunk_params(16, (3, 4, 6, 3)) == 1_480_456
    assert attention_pool_params(13, 512, 1024) == 1_319_936
    assert count(backbone) == 2_800_392
    assert count(backbone.trunk) == 1_480_456
    assert count(backbone.attention_pool) == 1_319_936
    assert parameter_counts(backbone) == {"trunk": 1_480_456, "attention_pool": 1_319_936, "total": 2_800_392}


def test_default_backbone_is_the_paper_preset():
    assert Backbone().config == PAPER
    assert PRESETS["paper"] is PAPER and PRESETS["cpu"] is CPU


def test_cpu_preset_parameter_count_matches_the_formula():
    backbone = Backbone(preset="cpu")
    cells = spatial_size_after_trunk(CPU.n_mels) * spatial_size_after_trunk(CPU.n_frames) + 1
    assert count(backbone.trunk) == trunk_params(CPU.width, CPU.layers)
    assert count(backbone.attention_pool) == attention_pool_params(cells, CPU.width * 32, CPU.embedding_dim)
    assert count(backbone) < count(Backbone(preset="paper")) / 4  # the point of the preset
    # The preset README documents: its settings and parameter count.
    assert CPU == BackboneConfig(width=8, layers=(2, 2, 2, 2), heads=4, embedding_dim=256, n_mels=64, n_frames=126)
    assert count(backbone) == 486_580


def test_paper_grid_is_4_by_3_cells_plus_the_mean_token():
    backbone = Backbone(preset="paper")
    assert PAPER.grid == (4, 3)
    assert PAPER.n_tokens == 13
    assert backbone.attention_pool.positional_embedding.shape == (13, 512)
    features = backbone.forward_features(torch.randn(2, 128, 126))
    assert features.shape == (2, 512, 4, 3)


def test_stage_channels_and_resolutions_for_128_by_126():
    backbone = Backbone(preset="paper").eval()
    shapes = []
    hooks = [backbone.trunk.stem.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:])))]
    for stage in backbone.trunk.stages:
        hooks.append(stage.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape[1:]))))
    with torch.no_grad():
        backbone(torch.randn(1, 128, 126))
    for hook in hooks:
        hook.remove()
    # stem: stride-2 conv (128x126 -> 64x63) then pool (-> 32x31); stages 2-4 halve with floor.
    assert shapes == [(16, 32, 31), (64, 32, 31), (128, 16, 15), (256, 8, 7), (512, 4, 3)]
    stem_convs = [m for m in backbone.trunk.stem if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride) for c in stem_convs] == [
        (1, 8, (3, 3), (2, 2)),
        (8, 8, (3, 3), (1, 1)),
        (8, 16, (3, 3), (1, 1)),
    ]
    assert [len(stage) for stage in backbone.trunk.stages] == [3, 4, 6, 3]
    # No strided convolution anywhere after the stem: downsampling is by average pooling.
    strided = [m for m in backbone.trunk.stages.modules() if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert strided == []


@pytest.mark.parametrize("n", [31, 32, 62, 63, 64, 96, 125, 126, 127, 128, 251, 313])
def test_token_grid_size_matches_conv_arithmetic(n):
    assert token_grid_size(n) == spatial_size_after_trunk(n)


@pytest.mark.parametrize("frames", [31, 63, 100, 126, 251])
def test_feature_map_size_for_other_frame_counts(frames):
    backbone = Backbone(preset="cpu").eval()
    with torch.no_grad():
        features = backbone.forward_features(torch.randn(1, CPU.n_mels, frames))
        embedding = backbone(torch.randn(1, CPU.n_mels, frames))
    assert features.shape[-2:] == (spatial_size_after_trunk(CPU.n_mels), spatial_size_after_trunk(frames))
    assert embedding.shape == (1, CPU.embedding_dim)


# --------------------------------------------------------------------------------------------------
# Shapes and construction


@pytest.mark.parametrize("preset", ["paper", "cpu"])
def test_output_shapes_for_both_input_layouts(preset):
    torch.manual_seed(0)
    backbone = Backbone(preset=preset).eval()
    config = backbone.config
    x = torch.randn(3, config.n_mels, config.n_frames)
    with torch.no_grad():
        out_3d = backbone(x)
        out_4d = backbone(x.unsqueeze(1))
    assert backbone.embedding_dim == config.embedding_dim
    assert out_3d.shape == (3, config.embedding_dim)
    assert torch.isfinite(out_3d).all()
    torch.testing.assert_close(out_3d, out_4d)


def test_cpu_preset_is_smaller_in_every_dimension_it_promises():
    assert CPU.width < PAPER.width
    assert CPU.n_mels < PAPER.n_mels
    assert CPU.embedding_dim < PAPER.embedding_dim
    assert CPU.heads < PAPER.heads
    assert CPU.n_frames == PAPER.n_frames  # still 4 s views


def test_keyword_overrides_and_explicit_config():
    longer = Backbone(preset="paper", n_frames=251)  # 8 s views
    assert longer.config.grid == (4, 7)
    assert count(longer) == 2_800_392 + (29 - 13) * 512  # only the positional embedding grows
    custom = Backbone(config=BackboneConfig(width=8, heads=4, embedding_dim=128, n_mels=96))
    assert custom.embedding_dim == 128
    assert custom(torch.randn(2, 96, 126)).shape == (2, 128)
    assert Backbone(config=CPU, embedding_dim=64).embedding_dim == 64


def test_layers_given_as_a_list_become_a_tuple():
    assert BackboneConfig(layers=[1, 1, 1, 1]).layers == (1, 1, 1, 1)


def test_initialisation_is_deterministic_under_manual_seed():
    torch.manual_seed(123)
    first = Backbone(preset="cpu").state_dict()
    torch.manual_seed(123)
    second = Backbone(preset="cpu").state_dict()
    torch.manual_seed(124)
    third = Backbone(preset="cpu").state_dict()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=0, atol=0)
    assert not torch.equal(first["attention_pool.positional_embedding"], third["attention_pool.positional_embedding"])


def test_initialisation_scales():
    torch.manual_seed(0)
    backbone = Backbone(preset="paper")
    pool = backbone.attention_pool
    for weight in (pool.positional_embedding, pool.q_proj.weight, pool.out_proj.weight):
        assert abs(weight.std().item() - 512**-0.5) < 0.1 * 512**-0.5
    assert torch.count_nonzero(pool.q_proj.bias) == 0
    # He (fan-out) initialisation: std = sqrt(2 / (out_channels * k * k)).
    conv = backbone.trunk.stages[3][0].conv2  # 128 -> 128, 3x3: 147,456 weights
    assert abs(conv.weight.std().item() - math.sqrt(2 / (128 * 9))) < 0.02 * math.sqrt(2 / (128 * 9))
    conv = backbone.trunk.stages[3][0].conv3  # 128 -> 512, 1x1: fan-out 512, fan-in 128
    assert abs(conv.weight.std().item() - math.sqrt(2 / 512)) < 0.02 * math.sqrt(2 / 512)
    for module in backbone.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0)


def _randomise_batchnorms(module: nn.Module) -> None:
    """Statistics and affine parameters other than 0 and 1, so that BatchNorm's use of them shows."""
    for norm in module.modules():
        if isinstance(norm, nn.BatchNorm2d):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.data.uniform_(0.5, 1.5)
            norm.bias.data.uniform_(-0.5, 0.5)


def _batchnorm(x: torch.Tensor, norm: nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BatchNorm written out: (x - mean) / sqrt(var + eps) * weight + bias, per channel."""
    per_channel = (slice(None), None, None)
    return ((x - norm.running_mean[per_channel]) / torch.sqrt(norm.running_var[per_channel] + norm.eps)
            * norm.weight[per_channel] + norm.bias[per_channel])


def test_the_stem_is_three_convolutions_then_average_pooling():
    """The CLIP ResNet stem (the study's code): 3x3 convolutions (stride 2, then 1, 1), each with BatchNorm and
    ReLU, then a 2x2 average pool; written out with functional operations on the stem's own weights."""
    torch.manual_seed(0)
    backbone = Backbone(preset="cpu").eval()
    stem = backbone.trunk.stem
    _randomise_batchnorms(stem)
    x = torch.randn(2, 1, 64, 126)
    convs = [m for m in stem if isinstance(m, nn.Conv2d)]
    norms = [m for m in stem if isinstance(m, nn.BatchNorm2d)]
    expected = x
    for conv, norm, stride in zip(convs, norms, (2, 1, 1)):
        expected = F.relu(_batchnorm(F.conv2d(expected, conv.weight, stride=stride, padding=1), norm))
    expected = F.avg_pool2d(expected, 2)
    with torch.no_grad():
        torch.testing.assert_close(stem(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["first block of a strided stage", "a later block of a stage"])
def test_a_bottleneck_block_is_the_clip_resnets(which):
    """The CLIP ResNet's Bottleneck (the study's code): 1x1 -> 3x3 -> average pool (if strided) -> 1x1 with 4x
    the channels, BatchNorm after each convolution and ReLU after the first two; plus a shortcut, the input
    itself, or average pool -> 1x1 -> BatchNorm where the shape changes; ReLU after the sum. Written out with
    functional operations on the block's own weights."""
    torch.manual_seed(0)
    backbone = Backbone(preset="cpu").eval()
    stage = backbone.trunk.stages[1]  # a stage that halves the resolution (stride 2)
    block = stage[0] if which.startswith("first") else stage[1]
    _randomise_batchnorms(block)
    channels = block.conv1.in_channels
    x = torch.relu(torch.randn(2, channels, 16, 32))
    out = torch.relu(_batchnorm(F.conv2d(x, block.conv1.weight), block.bn1))
    out = torch.relu(_batchnorm(F.conv2d(out, block.conv2.weight, padding=1), block.bn2))
    if which.startswith("first"):
        out = F.avg_pool2d(out, 2)
        convolution, norm = (m for m in block.shortcut if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)))
        shortcut = _batchnorm(F.conv2d(F.avg_pool2d(x, 2), convolution.weight), norm)
    else:
        assert isinstance(block.shortcut, nn.Identity)
        shortcut = x
    expected = torch.relu(_batchnorm(F.conv2d(out, block.conv3.weight), block.bn3) + shortcut)
    assert block.conv3.out_channels == 4 * block.conv1.out_channels
    with torch.no_grad():
        actual = block(x)
        assert actual.shape == expected.shape == (2, block.conv3.out_channels, *((8, 16) if which.startswith("first")
                                                                                 else (16, 32)))
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_deepcopy_give_identical_outputs():
    torch.manual_seed(0)
    source = Backbone(preset="cpu").eval()
    x = torch.randn(2, CPU.n_mels, CPU.n_frames)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    target = Backbone(preset="cpu").eval()
    target.load_state_dict(torch.load(buffer))
    teacher = copy.deepcopy(source)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)
        torch.testing.assert_close(teacher(x), source(x), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# Attention pooling


def test_attention_pool_matches_torch_multi_head_attention():
    """CLIP's formulation: full self-attention over (mean + cells) tokens, keep token 0."""
    torch.manual_seed(0)
    backbone = Backbone(preset="paper")
    pool = backbone.attention_pool
    with torch.no_grad():
        for projection in (pool.q_proj, pool.k_proj, pool.v_proj, pool.out_proj):
            projection.bias.normal_()  # make sure biases are wired correctly too
    features = torch.randn(3, 512, 4, 3)
    tokens = features.reshape(3, 512, 12).permute(2, 0, 1)  # (HW, N, C)
    tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
    tokens = tokens + pool.positional_embedding[:, None, :]
    expected, _ = F.multi_head_attention_forward(
        query=tokens,
        key=tokens,
        value=tokens,
        embed_dim_to_check=512,
        num_heads=8,
        in_proj_weight=None,
        in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=pool.out_proj.weight,
        out_proj_bias=pool.out_proj.bias,
        training=False,
        need_weights=False,
        use_separate_proj_weight=True,
        q_proj_weight=pool.q_proj.weight,
        k_proj_weight=pool.k_proj.weight,
        v_proj_weight=pool.v_proj.weight,
    )
    with torch.no_grad():
        torch.testing.assert_close(pool(features), expected[0], rtol=1e-5, atol=1e-5)


def test_positional_embedding_is_linearly_interpolated_along_time_only():
    torch.manual_seed(0)
    pool = Backbone(preset="paper").attention_pool  # grid 4 x 3
    trained = pool.positional_embedding.detach()
    assert pool.positional_embedding_for(3) is pool.positional_embedding  # untouched at the trained size
    new_t = 7
    resized = pool.positional_embedding_for(new_t).detach()
    assert resized.shape == (1 + 4 * new_t, 512)
    torch.testing.assert_close(resized[0], trained[0])  # the mean token keeps its embedding
    grid = trained[1:].reshape(4, 3, 512)
    for f in range(4):
        for t in range(new_t):
            # Half-pixel-centred linear interpolation (align_corners=False), clamped at the edges.
            source = min(max((t + 0.5) * 3 / new_t - 0.5, 0.0), 2.0)
            low = math.floor(source)
            high = min(low + 1, 2)
            weight = source - low
            expected = (1 - weight) * grid[f, low] + weight * grid[f, high]
            torch.testing.assert_close(resized[1 + f * new_t + t], expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Input validation


def test_wrong_mel_count_is_a_clear_error():
    backbone = Backbone(preset="paper")
    with pytest.raises(ValueError, match=r"96 mel bands.*n_mels=128"):
        backbone(torch.randn(2, 96, 126))


@pytest.mark.parametrize("shape", [(128, 126), (2, 2, 128, 126), (1, 1, 1, 128, 126)])
def test_wrong_rank_or_channels_is_a_clear_error(shape):
    with pytest.raises(ValueError, match=r"\(batch, n_mels, frames\)"):
        Backbone(preset="paper")(torch.randn(*shape))


def test_too_few_frames_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 31"):
        Backbone(preset="cpu")(torch.randn(2, CPU.n_mels, 30))


def test_integer_input_is_a_clear_error():
    with pytest.raises(TypeError, match="floating-point"):
        Backbone(preset="cpu")(torch.zeros(2, CPU.n_mels, 126, dtype=torch.int64))


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match=r"unknown backbone preset 'gpu'.*cpu, paper"):
        Backbone(preset="gpu")


def test_preset_and_config_together_is_an_error():
    with pytest.raises(ValueError, match="either preset= or config="):
        Backbone(preset="paper", config=CPU)


def test_unknown_override_names_the_fields():
    with pytest.raises(TypeError, match=r"\['mels'\].*n_mels"):
        Backbone(preset="paper", mels=64)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"width": 7}, "width must be an even integer"),
        ({"layers": (3, 4, 6)}, "layers must be 4 positive"),
        ({"layers": (3, 0, 6, 3)}, "layers must be 4 positive"),
        ({"heads": 3}, r"heads must be a positive divisor of the feature width width\*32=512"),
        ({"embedding_dim": 0}, "embedding_dim must be positive"),
        ({"n_mels": 16}, "n_mels must be at least 31"),
        ({"n_frames": 20}, "n_frames must be at least 31"),
    ],
)
def test_invalid_config_is_a_clear_error(fields, message):
    with pytest.raises(ValueError, match=message):
        BackboneConfig(**fields)


# --------------------------------------------------------------------------------------------------
# Training behaviour


@pytest.mark.parametrize("preset", ["paper", "cpu"])
def test_gradient_reaches_every_parameter(preset):
    torch.manual_seed(0)
    backbone = Backbone(preset=preset).train()
    config = backbone.config
    # A random linear read-out: summing the embedding would give the output bias a gradient through
    # a degenerate path only; any generic loss must reach every parameter.
    readout = torch.randn(config.embedding_dim)
    (backbone(torch.randn(4, config.n_mels, config.n_frames)) @ readout).square().mean().backward()
    for name, parameter in backbone.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_gradient_reaches_positional_embedding_at_another_frame_count():
    backbone = Backbone(preset="cpu").train()
    backbone(torch.randn(2, CPU.n_mels, 251)).square().mean().backward()
    assert backbone.attention_pool.positional_embedding.grad.abs().sum() > 0


def test_bfloat16_autocast_on_cpu():
    torch.manual_seed(0)
    backbone = Backbone(preset="cpu")
    x = torch.randn(4, CPU.n_mels, CPU.n_frames)
    backbone.eval()
    with torch.no_grad():
        reference = backbone(x)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            mixed = backbone(x)
    assert mixed.dtype == torch.bfloat16
    assert torch.isfinite(mixed).all()
    cosine = F.cosine_similarity(mixed.float(), reference, dim=1)
    assert cosine.min() > 0.99  # bf16 keeps ~3 significant digits; the direction must survive
    backbone.train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss = backbone(x).float().square().mean()
    loss.backward()
    for name, parameter in backbone.named_parameters():
        assert parameter.grad is not None and parameter.grad.dtype == torch.float32, name
        assert torch.isfinite(parameter.grad).all(), name


def test_one_optimiser_step_changes_the_output():
    torch.manual_seed(0)
    backbone = Backbone(preset="cpu").train()
    optimiser = torch.optim.AdamW(backbone.parameters(), lr=1e-3)
    x = torch.randn(8, CPU.n_mels, CPU.n_frames)
    before = backbone(x).detach()
    backbone(x).square().mean().backward()
    optimiser.step()
    after = backbone(x).detach()
    assert after.square().mean() < before.square().mean()


# --------------------------------------------------------------------------------------------------
# Heads (heads.py)


def mlp_params(dims: list[int], last_bias: bool = False) -> int:
    """Hidden layers: Linear without bias + BatchNorm1d (weight, bias); last layer Linear (+ bias if asked)."""
    total = sum(d_in * d_out + 2 * d_out for d_in, d_out in zip(dims[:-2], dims[1:-1]))
    return total + dims[-2] * dims[-1] + (dims[-1] if last_bias else 0)


def layer_kinds(head: MLPHead) -> list[type]:
    return [type(layer) for layer in head.layers]


def test_projector_structure_and_size():
    head = projector()
    L, B, R = nn.Linear, nn.BatchNorm1d, nn.ReLU
    assert layer_kinds(head) == [L, B, R, L, B, R, L]
    linears = [m for m in head.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 1024), (1024, 1024), (1024, 2048)]
    # The study's Head (ssl_framework/models/__init__.py): every Linear without bias, the last one too.
    assert [m.bias is not None for m in linears] == [False, False, False]
    # 2 * (1024*1024 + 2*1024) + 1024*2048
    assert count(head) == 2 * (1024 * 1024 + 2048) + 1024 * 2048 == 4_198_400
    assert count(head) == mlp_params([1024, 1024, 1024, 2048])
    assert head.out_dim == 2048


def test_byol_predictor_structure_and_size():
    head = byol_predictor()
    assert layer_kinds(head) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert count(head) == 2048 * 256 + 2 * 256 + 256 * 2048 == 1_049_088


def test_clustering_head_structure_and_size():
    head = clustering_head()
    linears = [m for m in head.layers if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1024, 1024), (1024, 1024), (1024, 256), (256, 4096)]
    assert count(head) == mlp_params([1024, 1024, 1024, 256, 4096])
    assert all(m.bias is None for m in linears)
    assert count(head) == 2 * (1024 * 1024 + 2048) + (1024 * 256 + 512) + 256 * 4096 == 3_412_480
    assert clustering_head(num_prototypes=100).out_dim == 100


def test_heads_on_a_cpu_backbone_embedding():
    backbone = Backbone(preset="cpu")
    head = projector(in_dim=backbone.embedding_dim, hidden_dim=256, out_dim=512)
    z = head(backbone(torch.randn(4, CPU.n_mels, CPU.n_frames)))
    assert z.shape == (4, 512)


def test_mlp_head_with_last_bias_and_bad_dims():
    assert MLPHead((16, 8, 4)).layers[-1].bias is None
    head = MLPHead((16, 8, 4), last_bias=True)
    assert head.layers[-1].bias is not None
    assert count(head) == mlp_params([16, 8, 4], last_bias=True) == 16 * 8 + 16 + 8 * 4 + 4
    with pytest.raises(ValueError, match="at least input and output"):
        MLPHead((16,))


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_the_checkpoint_size_is_the_saved_state_dicts_within_5_percent(preset, tmp_path):
    """Counted on the meta device, checked against torch.save of a real backbone's state_dict."""
    torch.save(Backbone(preset=preset).state_dict(), tmp_path / "backbone.pt")
    saved = (tmp_path / "backbone.pt").stat().st_size
    assert 0.95 * saved <= checkpoint_bytes(preset) <= saved
