"""Position and timestep embeddings that BAGEL adds to image tokens.

- `PositionTable`: a fixed `[grid*grid, hidden]` table indexed by `row*grid + col` (latents use a
  64x64 grid, ViT tokens 70x70). Checkpoints store it already rounded to bf16; the model uses the
  stored values. `sincos_2d` computes it, for writing new checkpoints only.
- `TimestepEmbedder`: 256 sinusoidal features of t in [0, 1] ([cos, sin]), then an MLP.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double().reshape(-1)[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """`[grid*grid, dim]` table; the first half of the channels encodes the column."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    return table.float()


class PositionTable(nn.Module):
    def __init__(self, grid: int, hidden: int) -> None:
        super().__init__()
        self.grid = grid
        self.pos_embed = nn.Parameter(torch.zeros(grid * grid, hidden), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[ids]


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, features: int = 256) -> None:
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(
            nn.Linear(features, hidden, bias=True), nn.SiLU(), nn.Linear(hidden, hidden, bias=True)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        feats = timestep_features(t, self.features)
        return self.mlp(feats.to(self.mlp[0].weight.dtype))
