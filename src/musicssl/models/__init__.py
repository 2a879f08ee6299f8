"""The study's networks: the ResNet backbone with attention pooling and the MLP heads."""

from musicssl.models.backbone import (
    CPU,
    MIN_INPUT_BINS,
    PAPER,
    PRESETS,
    Backbone,
    BackboneConfig,
    checkpoint_bytes,
    parameter_counts,
    token_grid_size,
)
from musicssl.models.heads import MLPHead, byol_predictor, clustering_head, projector

__all__ = [
    "Backbone",
    "BackboneConfig",
    "PAPER",
    "CPU",
    "PRESETS",
    "MIN_INPUT_BINS",
    "checkpoint_bytes",
    "parameter_counts",
    "token_grid_size",
    "MLPHead",
    "projector",
    "byol_predictor",
    "clustering_head",
]
