"""The study's heads: stacks of (Linear without bias -> BatchNorm1d -> ReLU), the last layer a Linear without bias too."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["MLPHead", "projector", "byol_predictor", "clustering_head"]


class MLPHead(nn.Module):
    """``dims = (in, hidden..., out)``: every layer but the last is Linear(bias=False) -> BN -> ReLU.

    The last layer is a Linear without bias too, as in the study's code (``ssl_framework/models``, ``Head``);
    ``last_bias=True`` gives it one.
    """

    def __init__(self, dims: Sequence[int], last_bias: bool = False) -> None:
        super().__init__()
        if len(dims) < 2:
            raise ValueError(f"an MLP head needs at least input and output sizes, got {list(dims)}")
        self.dims = tuple(int(d) for d in dims)
        layers: list[nn.Module] = []
        for d_in, d_out in zip(self.dims[:-2], self.dims[1:-1]):
            layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(self.dims[-2], self.dims[-1], bias=last_bias))
        self.layers = nn.Sequential(*layers)

    @property
    def out_dim(self) -> int:
        return self.dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


def projector(in_dim: int = 1024, hidden_dim: int = 1024, out_dim: int = 2048) -> MLPHead:
    """Contrastive / Barlow Twins / VICReg / BYOL projector: in -> hidden -> hidden -> out (1024-1024-1024-2048)."""
    return MLPHead((in_dim, hidden_dim, hidden_dim, out_dim))


def byol_predictor(dim: int = 2048, hidden_dim: int = 256) -> MLPHead:
    """BYOL predictor: dim -> hidden -> dim (2048-256-2048)."""
    return MLPHead((dim, hidden_dim, dim))


def clustering_head(
    in_dim: int = 1024, hidden_dim: int = 1024, bottleneck_dim: int = 256, num_prototypes: int = 4096
) -> MLPHead:
    """DINO-like clustering head: in -> hidden -> hidden -> bottleneck -> K prototypes (1024-1024-1024-256-K)."""
    return MLPHead((in_dim, hidden_dim, hidden_dim, bottleneck_dim, num_prototypes))
