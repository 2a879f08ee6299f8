"""The study's backbone: a CLIP-style modified ResNet on log-mel spectrograms with attention pooling.

Structure (as in the study's public code, which adapts CLIP's ``ModifiedResNet`` via muscall):

- stem: three 3x3 convolutions 1 -> width/2 -> width/2 -> width channels (the first with stride 2),
  each followed by BatchNorm and ReLU, then a 2x2 average pool;
- four stages of bottleneck blocks (expansion 4); stages 2-4 halve the resolution with an average
  pool placed *before* the strided paths (anti-aliasing) instead of strided convolutions;
- attention pooling: the feature map's cells plus their mean form the tokens, a learned positional
  embedding is added, the mean token alone is the query of a multi-head attention over all tokens,
  and an output projection maps the result to the embedding.

With the paper's settings (width 16, stages (3, 4, 6, 3), 8 heads, 1024-d embedding, 128 mels x 126
frames) the network has 2,800,392 parameters: trunk 1,480,456 + attention pool 1,319,936.

Differences from the study's code, all deliberate:

- The token grid is computed from the true output size of the trunk, ``ceil(n / 2) // 16`` per
  axis, where their code used ``n // 32``; the two agree for 128 x 126 but not for every size (63
  frames give 2 time cells, not 1), where their model would fail at the first forward pass.
- Inputs with another frame count than the configured one are accepted: the time axis of the
  positional embedding grid is linearly interpolated to the input's grid (the usual ViT/CLIP
  resolution change); the mean token's embedding is kept. At the configured size nothing is
  interpolated. The mel count is fixed, because the frequency axis carries meaning.
- Only the mean token is projected into a query. CLIP computes attention for every token and keeps
  the first output; that output depends on the first query alone, so the result is the same.
- Initialisation: the study's code keeps PyTorch's defaults. We use He initialisation (fan-out) for
  the convolutions as torchvision's ResNets do, BatchNorm at weight 1 / bias 0, and CLIP's
  ``std = embed_dim ** -0.5`` normal initialisation for the attention projections with zero biases.
  Every convolution feeds a BatchNorm, so the convolution scale barely matters for the forward pass.
  CLIP's zero-initialised last BatchNorm of each block is not used: the study does not use it, and
  it would cut the gradient to the residual branches at the first step.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BackboneConfig",
    "Backbone",
    "PAPER",
    "CPU",
    "PRESETS",
    "MIN_INPUT_BINS",
    "token_grid_size",
    "parameter_counts",
]

_STAGE_COUNT = 4
_BOTTLENECK_EXPANSION = 4


def token_grid_size(n: int) -> int:
    """Cells along one axis of the trunk's output for ``n`` input bins: ``ceil(n / 2) // 16``.

    The stride-2 padded stem convolution gives ``ceil(n / 2)``; then four 2x2 average pools (stem,
    stages 2-4) floor-halve it four times.
    """
    return ((n + 1) // 2) // 16


# The smallest number of mel bands or frames that leaves the trunk's output at least one cell.
MIN_INPUT_BINS = 31


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture and the input size it is built for.

    ``n_mels`` and ``n_frames`` fix the size of the learned positional embedding
    (``token_grid_size(n_mels) * token_grid_size(n_frames) + 1`` tokens). The trunk's feature width
    is ``width * 32`` (the last stage's ``8 * width`` planes times expansion 4) and must be divisible
    by ``heads``; ``embedding_dim`` is the size of the output embedding.
    """

    width: int = 16
    layers: tuple[int, ...] = (3, 4, 6, 3)
    heads: int = 8
    embedding_dim: int = 1024
    n_mels: int = 128
    n_frames: int = 126

    def __post_init__(self) -> None:
        # Normalise a list given by a user or a search space into the hashable tuple the type promises.
        object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))
        problems = []
        if self.width < 2 or self.width % 2:
            problems.append(f"width must be an even integer >= 2 (the stem uses width/2), got {self.width}")
        if len(self.layers) != _STAGE_COUNT or any(n < 1 for n in self.layers):
            problems.append(f"layers must be {_STAGE_COUNT} positive block counts, got {self.layers}")
        if self.heads < 1 or (self.width >= 2 and self.feature_dim % self.heads):
            problems.append(
                f"heads must be a positive divisor of the feature width width*32={self.feature_dim}, got {self.heads}"
            )
        if self.embedding_dim < 1:
            problems.append(f"embedding_dim must be positive, got {self.embedding_dim}")
        for name in ("n_mels", "n_frames"):
            value = getattr(self, name)
            if value < MIN_INPUT_BINS:
                problems.append(
                    f"{name} must be at least {MIN_INPUT_BINS} so the trunk's output keeps one cell, got {value}"
                )
        if problems:
            raise ValueError("invalid BackboneConfig: " + "; ".join(problems))

    @property
    def feature_dim(self) -> int:
        """Channels of the trunk's output feature map (the attention pool's width)."""
        return self.width * 8 * _BOTTLENECK_EXPANSION

    @property
    def grid(self) -> tuple[int, int]:
        """(frequency cells, time cells) of the trunk's output at the configured input size."""
        return token_grid_size(self.n_mels), token_grid_size(self.n_frames)

    @property
    def n_tokens(self) -> int:
        """Tokens seen by the attention pool at the configured size: grid cells plus the mean token."""
        cells_f, cells_t = self.grid
        return cells_f * cells_t + 1


# The study's network: 2,800,392 parameters for 128 mels x 126 frames (4 s at 16 kHz, hop 512).
PAPER = BackboneConfig()

# For hyperparameter search on CPU: half the width, two blocks per stage, 64 mels, a 256-d embedding
# (486,580 parameters). Forward + backward on 32 pairs of 4 s views takes ~0.11 s on one thread here
# against ~0.67 s for PAPER (benchmarks/bench_models.py), leaving room for heads and the optimiser
# in a 0.05-0.2 s training step. Its inputs need a 64-band mel front-end.
CPU = BackboneConfig(width=8, layers=(2, 2, 2, 2), heads=4, embedding_dim=256, n_mels=64, n_frames=126)

PRESETS: MappingProxyType[str, BackboneConfig] = MappingProxyType({"paper": PAPER, "cpu": CPU})


class _Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (avg pool if stride) -> 1x1 (x4 channels), with a pooled 1x1 shortcut when shapes change."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * _BOTTLENECK_EXPANSION
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        # Anti-aliased downsampling: average before subsampling rather than a strided convolution.
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride > 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.AvgPool2d(stride) if stride > 1 else nn.Identity(),
                nn.Conv2d(in_channels, out_channels, 1, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.pool(out)))
        return F.relu(out + self.shortcut(x))


class _Trunk(nn.Module):
    """Stem and the four bottleneck stages: (B, 1, mels, frames) -> (B, width*32, mels', frames')."""

    def __init__(self, width: int, layers: tuple[int, ...]) -> None:
        super().__init__()
        half = width // 2
        self.stem = nn.Sequential(
            nn.Conv2d(1, half, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, bias=False),
            nn.BatchNorm2d(half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(2),
        )
        stages = []
        in_channels = width
        for index, blocks in enumerate(layers):
            planes = width * 2**index
            stride = 1 if index == 0 else 2
            stage = [_Bottleneck(in_channels, planes, stride)]
            in_channels = planes * _BOTTLENECK_EXPANSION
            stage += [_Bottleneck(in_channels, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.stages(self.stem(x))


class _AttentionPool(nn.Module):
    """CLIP's attention pooling: the mean token queries all tokens (mean + grid cells), then a projection."""

    def __init__(self, grid: tuple[int, int], feature_dim: int, heads: int, embedding_dim: int) -> None:
        super().__init__()
        self.grid = grid
        self.heads = heads
        cells_f, cells_t = grid
        self.positional_embedding = nn.Parameter(torch.empty(cells_f * cells_t + 1, feature_dim))
        self.q_proj = nn.Linear(feature_dim, feature_dim)
        self.k_proj = nn.Linear(feature_dim, feature_dim)
        self.v_proj = nn.Linear(feature_dim, feature_dim)
        self.out_proj = nn.Linear(feature_dim, embedding_dim)

    def positional_embedding_for(self, cells_t: int) -> Tensor:
        """The positional embedding for a grid with ``cells_t`` time cells (time axis interpolated if needed)."""
        if cells_t == self.grid[1]:
            return self.positional_embedding
        mean_token, cells = self.positional_embedding[:1], self.positional_embedding[1:]
        cells_f, trained_t = self.grid
        # (F*T, C) -> (F, C, T): interpolate along time only, for each frequency row.
        cells = cells.reshape(cells_f, trained_t, -1).permute(0, 2, 1)
        cells = F.interpolate(cells.float(), size=cells_t, mode="linear", align_corners=False)
        cells = cells.to(self.positional_embedding.dtype).permute(0, 2, 1).reshape(cells_f * cells_t, -1)
        return torch.cat([mean_token, cells], dim=0)

    def forward(self, features: Tensor) -> Tensor:
        batch, channels, cells_f, cells_t = features.shape
        tokens = features.flatten(2).transpose(1, 2)  # (B, F*T, C), frequency-major like CLIP
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding_for(cells_t).to(tokens.dtype)
        head_dim = channels // self.heads
        # Only the mean token's query is needed: the pooled output is the first token's attention output.
        query = self.q_proj(tokens[:, :1]).reshape(batch, 1, self.heads, head_dim).transpose(1, 2)
        key = self.k_proj(tokens).reshape(batch, -1, self.heads, head_dim).transpose(1, 2)
        value = self.v_proj(tokens).reshape(batch, -1, self.heads, head_dim).transpose(1, 2)
        attended = F.scaled_dot_product_attention(query, key, value)  # (B, heads, 1, head_dim)
        return self.out_proj(attended.transpose(1, 2).reshape(batch, channels))


class Backbone(nn.Module):
    """The study's ResNet with attention pooling: ``(B, [1,] n_mels, frames)`` -> ``(B, embedding_dim)``.

    Build it from a named preset (``"paper"``, ``"cpu"``; see :data:`PRESETS`), or from a
    :class:`BackboneConfig`, optionally overriding single fields by keyword::

        Backbone()                                  # the paper's network, 128 mels x 126 frames
        Backbone(preset="cpu")
        Backbone(preset="paper", n_frames=251)      # positional embedding sized for 8 s views
        Backbone(config=BackboneConfig(width=8, heads=4))

    Inputs must have ``config.n_mels`` mel bands. Any frame count of at least 31 works; for counts
    whose time grid differs from the configured one, the positional embedding is interpolated along
    time (see the module docstring).
    """

    def __init__(self, preset: str | None = None, *, config: BackboneConfig | None = None, **overrides: int) -> None:
        super().__init__()
        self.config = self._resolve_config(preset, config, overrides)
        self.trunk = _Trunk(self.config.width, self.config.layers)
        self.attention_pool = _AttentionPool(
            self.config.grid, self.config.feature_dim, self.config.heads, self.config.embedding_dim
        )
        self.reset_parameters()
        # Channels-last convolution weights (and inputs, see _as_image) make oneDNN's convolutions
        # ~30% faster for a training step on CPU (benchmarks/bench_models.py), and cuDNN prefers
        # this layout under mixed precision. Module.to(device) and state_dict loading keep it.
        self.trunk.to(memory_format=torch.channels_last)

    @staticmethod
    def _resolve_config(preset: str | None, config: BackboneConfig | None, overrides: dict) -> BackboneConfig:
        if preset is not None and config is not None:
            raise ValueError("give either preset= or config=, not both (use keyword overrides to change a preset)")
        if config is None:
            name = "paper" if preset is None else preset
            if name not in PRESETS:
                raise ValueError(f"unknown backbone preset {name!r}; available presets: {', '.join(sorted(PRESETS))}")
            config = PRESETS[name]
        fields = {field.name for field in dataclasses.fields(BackboneConfig)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise TypeError(
                f"unknown Backbone option(s) {unknown}; BackboneConfig fields are: {', '.join(sorted(fields))}"
            )
        return dataclasses.replace(config, **overrides) if overrides else config

    @property
    def embedding_dim(self) -> int:
        """Size of the output embedding (what heads and probes take as input)."""
        return self.config.embedding_dim

    @property
    def n_mels(self) -> int:
        return self.config.n_mels

    def reset_parameters(self) -> None:
        """Re-initialise every parameter (deterministic under ``torch.manual_seed``)."""
        for module in self.trunk.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        pool = self.attention_pool
        std = self.config.feature_dim**-0.5
        nn.init.normal_(pool.positional_embedding, std=std)
        for projection in (pool.q_proj, pool.k_proj, pool.v_proj, pool.out_proj):
            nn.init.normal_(projection.weight, std=std)
            nn.init.zeros_(projection.bias)

    def _as_image(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        elif x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(
                f"Backbone expects (batch, n_mels, frames) or (batch, 1, n_mels, frames), got shape {tuple(x.shape)}"
            )
        n_mels, frames = x.shape[-2:]
        if n_mels != self.config.n_mels:
            raise ValueError(
                f"input has {n_mels} mel bands but this backbone was built for n_mels={self.config.n_mels}; "
                f"compute the mel spectrogram with n_mels={self.config.n_mels} or build the backbone with "
                f"n_mels={n_mels}"
            )
        if frames < MIN_INPUT_BINS:
            raise ValueError(
                f"input has {frames} frames; the backbone needs at least {MIN_INPUT_BINS} "
                f"(about 1 s at 16 kHz with hop 512)"
            )
        if not x.is_floating_point():
            raise TypeError(f"Backbone expects a floating-point spectrogram, got dtype {x.dtype}")
        return x.contiguous(memory_format=torch.channels_last)

    def forward_features(self, x: Tensor) -> Tensor:
        """The trunk's feature map ``(B, width*32, mel cells, time cells)``, before attention pooling."""
        return self.trunk(self._as_image(x))

    def forward(self, x: Tensor) -> Tensor:
        """Embed a batch of log-mel spectrograms: ``(B, [1,] n_mels, frames)`` -> ``(B, embedding_dim)``."""
        return self.attention_pool(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"config={self.config}"


def _count(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def checkpoint_bytes(preset: str) -> int:
    """Bytes of the backbone's ``state_dict`` for ``preset`` (its checkpoint file, ``backbone.pt``, takes
    up to 5 % more): built on torch's meta device, with shapes and no memory or initialisation."""
    with torch.device("meta"):
        backbone = Backbone(preset=preset)
    return sum(tensor.numel() * tensor.element_size() for tensor in backbone.state_dict().values())


def parameter_counts(backbone: Backbone) -> dict[str, int]:
    """``{"trunk", "attention_pool", "total"}`` parameter counts."""
    return {
        "trunk": _count(backbone.trunk),
        "attention_pool": _count(backbone.attention_pool),
        "total": _count(backbone),
    }

