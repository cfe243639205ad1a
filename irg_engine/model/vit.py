"""SigLIP NaViT vision encoder (BAGEL's understanding-side image encoder) and its connector.

Input: one image's patches `[n, 3*p*p]` flattened in (row-in-patch, col-in-patch, channel) order
and their ids `row*70 + col` into the learned position table. Each image attends only to itself.
Output of `VisionTower.forward`: `[n, lm_hidden]` = connector(encoder(patches)) + the 2-D sin-cos
table entry; these rows enter the language model between the vision markers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from irg_engine.config import ViTConfig
from irg_engine.model.embed import PositionTable


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class ViTLayer(nn.Module):
    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.heads = cfg.num_heads
        self.norm1 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)
        self.norm2 = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(h, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = (
            p(h).unflatten(-1, (self.heads, -1)).transpose(0, 1)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        attn = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        x = x + self.out_proj(attn.transpose(0, 1).flatten(1))
        return x + self.fc2(gelu_tanh(self.fc1(self.norm2(x))))


class VisionTower(nn.Module):
    """Patch embedding, learned positions, encoder, post-norm, connector, sin-cos positions."""

    def __init__(self, cfg: ViTConfig, lm_hidden: int) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.cfg = cfg
        self.patch_embed = nn.Linear(3 * cfg.patch_size**2, h)
        self.position_embedding = nn.Embedding(cfg.max_patches_per_side**2, h)
        self.layers = nn.ModuleList([ViTLayer(cfg) for _ in range(cfg.num_layers)])
        self.post_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.connector_fc1 = nn.Linear(h, lm_hidden)
        self.connector_fc2 = nn.Linear(lm_hidden, lm_hidden)
        self.pos_table = PositionTable(cfg.max_patches_per_side, lm_hidden)

    def encode(self, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patches.to(self.patch_embed.weight.dtype))
        x = x + self.position_embedding(ids)
        for layer in self.layers:
            x = layer(x)
        return self.post_norm(x)

    def connect(self, encoded: torch.Tensor) -> torch.Tensor:
        return self.connector_fc2(gelu_tanh(self.connector_fc1(encoded)))

    def forward(self, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.connect(self.encode(patches, ids)) + self.pos_table(ids)
