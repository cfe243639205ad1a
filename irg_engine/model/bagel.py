"""BAGEL: turns inputs of each token kind into language-model rows, runs the decoder, reads heads.

Token kinds and where their input rows come from:
- text ids and the image markers: the token embedding (understanding expert);
- ViT patches: `VisionTower` (understanding expert);
- VAE latent tokens (clean context latents at t = 0, or noisy latents being denoised):
  `vae2llm(tokens) + time_embedder(t) + latent_pos_embed[row*64 + col]` (generation expert).
After the decoder, text rows feed `lm_head` (logits) and latent rows feed `llm2vae` (velocity).
The FLUX autoencoder is a separate module (`model/vae.py`); `LoadedModel` bundles the parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from irg_engine import images
from irg_engine.attention import AttentionPlan
from irg_engine.config import BagelConfig
from irg_engine.host_memory import upload
from irg_engine.model.embed import PositionTable, TimestepEmbedder
from irg_engine.model.lm import ExpertRoutes, LanguageModel
from irg_engine.model.vae import AutoEncoder
from irg_engine.model.vit import VisionTower

if TYPE_CHECKING:
    from irg_engine.tokenizer import Tokenizer


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hidden = cfg.lm.hidden_size
        self.lm = LanguageModel(cfg.lm)
        self.vit = VisionTower(cfg.vit, hidden)
        self.time_embedder = TimestepEmbedder(hidden, cfg.timestep_features)
        self.vae2llm = nn.Linear(cfg.latent_token_dim, hidden)
        self.llm2vae = nn.Linear(hidden, cfg.latent_token_dim)
        self.latent_pos = PositionTable(cfg.max_latent_size, hidden)

    @property
    def dtype(self) -> torch.dtype:
        return self.vae2llm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.vae2llm.weight.device

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.embed_tokens(ids)

    def embed_vit(self, patches: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.vit(patches, ids)

    def embed_latents(
        self, tokens: torch.Tensor, t: torch.Tensor, pos_ids: torch.Tensor
    ) -> torch.Tensor:
        """Rows for latent tokens `[n, 64]`; `t` holds one shifted timestep per row."""
        x = self.vae2llm(tokens.to(self.dtype))
        return x + self.time_embedder(t) + self.latent_pos(pos_ids)

    def latent_rows(self, tokens: torch.Tensor, t: float, grid: tuple[int, int]) -> torch.Tensor:
        """Rows of latent tokens `[h*w, C*p*p]` laid out on an h x w grid, all at timestep t."""
        h, w = grid
        dev = self.device
        pos = upload(images.latent_position_ids(h, w, self.cfg.max_latent_size), dev)
        tt = torch.full((h * w,), float(t), device=dev)
        return self.embed_latents(upload(tokens, dev), tt, pos)

    def context_latent_rows(self, latent: torch.Tensor) -> torch.Tensor:
        """Rows of a clean latent `[1, C, 2h, 2w]` entering as context (timestep 0)."""
        p = self.cfg.latent_patch_size
        grid = (latent.shape[-2] // p, latent.shape[-1] // p)
        return self.latent_rows(images.patchify_latent(latent, p), 0.0, grid)

    def image_block(
        self, inner: torch.Tensor, gen: bool, markers: tuple[int, int], rope: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An image block: the two marker ids' rows around `inner`, all at position `rope`.

        Returns (rows, positions, generation-expert mask); the markers always use the
        understanding expert, the inner rows the generation expert when `gen`.
        """
        dev = self.device
        ends = self.embed_text(upload(torch.tensor(markers, dtype=torch.long), dev))
        x = torch.cat([ends[:1], inner.to(ends.dtype), ends[1:]])
        mask = torch.zeros(x.shape[0], dtype=torch.bool, device=dev)
        mask[1:-1] = gen
        return x, torch.full((x.shape[0],), rope, dtype=torch.long, device=dev), mask

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        gen_mask: torch.Tensor,
        plan: AttentionPlan,
        routes: ExpertRoutes | None = None,
    ) -> torch.Tensor:
        """Final hidden states (after the per-expert norm) for every input row."""
        if routes is None:
            routes = ExpertRoutes.from_mask(gen_mask)
        return self.lm(x, positions, routes, plan)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(hidden).float()

    def velocity(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.llm2vae(hidden).float()


@dataclass
class LoadedModel:
    """A checkpoint ready to run: the BAGEL modules, the autoencoder and the tokenizer."""

    bagel: Bagel
    vae: AutoEncoder
    tokenizer: Tokenizer
    name: str
    random_weights: bool = False

    @property
    def cfg(self) -> BagelConfig:
        return self.bagel.cfg
