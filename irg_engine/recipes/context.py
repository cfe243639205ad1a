"""The sequential reference's contexts and model calls (what `dense.py` executes work with).

A `Context` is one token sequence as the published code keeps it: a dense per-layer KV cache plus
the next RoPE position. Forks share the cached tensors (appends build new ones), as the
reference's deep copies would. The functions here build the model inputs of each kind of work:
text tokens, VAE and ViT image blocks, one velocity prediction. Each runs one model forward
through a `DensePlan` (a single segment after one context).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image

from irg_engine import images
from irg_engine.attention import segment_attention
from irg_engine.model.bagel import LoadedModel


@dataclass
class Context:
    """Dense KV of one sequence: per layer `[tokens, kv_heads, head_dim]`, and the next position."""

    keys: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    rope: int = 0
    name: str = ""

    @property
    def length(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def fork(self, name: str | None = None) -> Context:
        # Appends build new tensors (torch.cat), so a fork can share the existing ones.
        return Context(list(self.keys), list(self.values), self.rope, name or self.name)


class DensePlan:
    """One query segment attending to one context, optionally appending its own K/V to it."""

    def __init__(self, ctx: Context, causal: bool, write: bool, backend: str = "sdpa") -> None:
        self.ctx, self.causal, self.write, self.backend = ctx, causal, write, backend

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        if layer < len(ctx.keys):
            k_all = torch.cat([ctx.keys[layer], k])
            v_all = torch.cat([ctx.values[layer], v])
        else:
            k_all, v_all = k, v
        out = segment_attention(q, k_all, v_all, self.causal, self.backend)
        if self.write:
            if layer < len(ctx.keys):
                ctx.keys[layer], ctx.values[layer] = k_all, v_all
            else:
                ctx.keys.append(k_all)
                ctx.values.append(v_all)
        return out


def _run(
    model: LoadedModel,
    ctx: Context,
    x: torch.Tensor,
    positions: torch.Tensor,
    gen_mask: torch.Tensor,
    causal: bool,
    write: bool,
) -> torch.Tensor:
    return model.bagel(x, positions, gen_mask, DensePlan(ctx, causal, write))


def _ids(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def prefill_text(model: LoadedModel, ctx: Context, ids: list[int]) -> torch.Tensor:
    """Append text tokens (a wrapped segment, or a decode step); returns their hidden states."""
    dev = model.bagel.device
    positions = torch.arange(ctx.rope, ctx.rope + len(ids), device=dev)
    x = model.bagel.embed_text(_ids(ids, dev))
    mask = torch.zeros(len(ids), dtype=torch.bool, device=dev)
    hidden = _run(model, ctx, x, positions, mask, causal=True, write=True)
    ctx.rope += len(ids)
    return hidden


def _image_block(
    model: LoadedModel, ctx: Context, inner: torch.Tensor, gen: bool, write: bool
) -> torch.Tensor:
    """Markers around `inner` rows, all at one position, bidirectional; returns inner hidden."""
    tok = model.tokenizer
    x, positions, mask = model.bagel.image_block(
        inner, gen, (tok.vision_start, tok.vision_end), ctx.rope
    )
    hidden = _run(model, ctx, x, positions, mask, causal=False, write=write)
    return hidden[1:-1]


def prefill_vae_block(model: LoadedModel, ctx: Context, latent: torch.Tensor) -> None:
    """Append a clean latent `[1, C, 2h, 2w]` as a VAE block (timestep 0)."""
    _image_block(model, ctx, model.bagel.context_latent_rows(latent), gen=True, write=True)
    ctx.rope += 1


def prefill_vit_block(
    model: LoadedModel, ctx: Context, patches: torch.Tensor, ids: torch.Tensor
) -> None:
    dev = model.bagel.device
    feats = model.bagel.embed_vit(patches.to(dev), ids.to(dev))
    _image_block(model, ctx, feats, gen=False, write=True)
    ctx.rope += 1


def encode_latent(model: LoadedModel, image: Image.Image) -> torch.Tensor:
    """Posterior-mean latent `[1, C, H/8, W/8]` of an image resized by the VAE rule."""
    x = images.pil_to_tensor(images.VAE_RULE.resize(image))[None]
    vae = model.vae
    return vae.encode(x.to(device=model.bagel.device, dtype=next(vae.parameters()).dtype))


def predict_velocity(
    model: LoadedModel, ctx: Context, x_t: torch.Tensor, t: float, grid: tuple[int, int]
) -> torch.Tensor:
    """Velocity `[h*w, C*p*p]` for noisy latent tokens queried against ctx (never written)."""
    rows = model.bagel.latent_rows(x_t, t, grid)
    hidden = _image_block(model, ctx, rows, gen=True, write=False)
    return model.bagel.velocity(hidden)


def decode_latents(model: LoadedModel, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Decoded image `[1, 3, H, W]` in [-1, 1] (float32, not clamped) of latent tokens."""
    latent = images.unpatchify_latent(tokens, grid[0], grid[1], model.cfg.latent_patch_size)
    vae_dtype = next(model.vae.parameters()).dtype
    return model.vae.decode(latent.to(device=model.bagel.device, dtype=vae_dtype)).float().cpu()
