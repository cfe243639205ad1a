"""The sequential reference's contexts and the model calls every recipe is made of.

A `Context` is one token sequence as the published code keeps it: a dense per-layer KV cache plus
the next RoPE position. Recipes fork contexts where the reference deep-copies them (guidance
contexts, decoding on a copy). The functions here are the only places that build model inputs:
text segments, VAE and ViT image blocks, one decode step, one velocity prediction. Each runs one
model forward through a `DensePlan` (a single segment after one context).
"""

from __future__ import annotations

from collections.abc import Callable
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
    # Called with (context name, ids, first position) for every text segment appended.
    on_segment: Callable[[str, list[int], int], None] | None = None

    @property
    def length(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    def fork(self, name: str | None = None) -> Context:
        # Appends build new tensors (torch.cat), so a fork can share the existing ones.
        return Context(
            list(self.keys),
            list(self.values),
            self.rope,
            self.name if name is None else name,
            self.on_segment,
        )


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
    """Append a text segment (already wrapped); returns its hidden states."""
    dev = model.bagel.device
    positions = torch.arange(ctx.rope, ctx.rope + len(ids), device=dev)
    x = model.bagel.embed_text(_ids(ids, dev))
    mask = torch.zeros(len(ids), dtype=torch.bool, device=dev)
    hidden = _run(model, ctx, x, positions, mask, causal=True, write=True)
    if ctx.on_segment is not None:
        ctx.on_segment(ctx.name, list(ids), ctx.rope)
    ctx.rope += len(ids)
    return hidden


def _image_block(
    model: LoadedModel, ctx: Context, inner: torch.Tensor, gen: bool, write: bool
) -> torch.Tensor:
    """Markers around `inner` rows, all at one position, bidirectional; returns inner hidden."""
    tok = model.tokenizer
    dev = model.bagel.device
    markers = model.bagel.embed_text(_ids([tok.vision_start, tok.vision_end], dev))
    x = torch.cat([markers[:1], inner.to(markers.dtype), markers[1:]])
    n = x.shape[0]
    positions = torch.full((n,), ctx.rope, dtype=torch.long, device=dev)
    mask = torch.zeros(n, dtype=torch.bool, device=dev)
    mask[1:-1] = gen
    hidden = _run(model, ctx, x, positions, mask, causal=False, write=write)
    return hidden[1:-1]


def prefill_vae_block(model: LoadedModel, ctx: Context, latent: torch.Tensor) -> None:
    """Append a clean latent `[1, C, 2h, 2w]` as a VAE block (timestep 0)."""
    p = model.cfg.latent_patch_size
    h, w = latent.shape[-2] // p, latent.shape[-1] // p
    dev = model.bagel.device
    tokens = images.patchify_latent(latent, p).to(dev)
    pos = images.latent_position_ids(h, w, model.cfg.max_latent_size).to(dev)
    t = torch.zeros(h * w, device=dev)
    _image_block(model, ctx, model.bagel.embed_latents(tokens, t, pos), gen=True, write=True)
    ctx.rope += 1


def vit_inputs(model: LoadedModel, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT patches and position ids of an image resized by the ViT rule."""
    vit = model.cfg.vit
    x = images.pil_to_tensor(images.VIT_RULE.resize(image))
    patches = images.vit_patches(x, vit.patch_size)
    ids = images.vit_position_ids(
        x.shape[1] // vit.patch_size, x.shape[2] // vit.patch_size, vit.max_patches_per_side
    )
    return patches, ids


def prefill_vit_block(model: LoadedModel, ctx: Context, image: Image.Image) -> None:
    dev = model.bagel.device
    patches, ids = vit_inputs(model, image)
    feats = model.bagel.embed_vit(patches.to(dev), ids.to(dev))
    _image_block(model, ctx, feats, gen=False, write=True)
    ctx.rope += 1


def encode_latent(model: LoadedModel, image: Image.Image) -> torch.Tensor:
    """Posterior-mean latent `[1, C, H/8, W/8]` of an image resized by the VAE rule."""
    x = images.pil_to_tensor(images.VAE_RULE.resize(image))[None]
    vae = model.vae
    return vae.encode(x.to(device=model.bagel.device, dtype=next(vae.parameters()).dtype))


def prefill_image(
    model: LoadedModel,
    ctx: Context,
    image: Image.Image,
    vae: bool,
    vit: bool,
    vit_from_vae_size: bool = True,
) -> None:
    """An input image as context: VAE block then ViT block, as the published code orders them.

    BAGEL's interleaved inference resizes the image by the VAE rule first and derives the ViT
    input from that; the IRG script resizes both from the original (`vit_from_vae_size=False`).
    """
    image = images.to_rgb(image)
    if vae:
        prefill_vae_block(model, ctx, encode_latent(model, image))
    if vit:
        src = images.VAE_RULE.resize(image) if vit_from_vae_size else image
        prefill_vit_block(model, ctx, src)


def sample_token(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def decode_text(
    model: LoadedModel,
    ctx: Context,
    max_length: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    on_token: Callable[[int, int, torch.Tensor], None] | None = None,
) -> list[int]:
    """Generate from `<|im_start|>` on a fork of ctx; returns ids starting with the start token.

    Stops after `max_length` steps (the start token counts) or when `<|im_end|>` is produced
    (not appended). `on_token(id, position, logits)` sees each step's input token, its
    position and its logits.
    """
    tok = model.tokenizer
    work = ctx.fork()
    dev = model.bagel.device
    ids = [tok.im_start]
    for step in range(max_length):
        x = model.bagel.embed_text(_ids(ids[-1:], dev))
        positions = torch.tensor([work.rope], device=dev)
        hidden = _run(
            model,
            work,
            x,
            positions,
            torch.zeros(1, dtype=torch.bool, device=dev),
            causal=True,
            write=True,
        )
        logits = model.bagel.logits(hidden)[0]
        if on_token is not None:
            on_token(ids[-1], work.rope, logits)
        work.rope += 1
        # The published loop samples on every step, the last included: keep the RNG stream equal.
        nxt = sample_token(logits, temperature, generator)
        if step == max_length - 1 or nxt == tok.im_end:
            break
        ids.append(nxt)
    return ids


def predict_velocity(
    model: LoadedModel, ctx: Context, x_t: torch.Tensor, t: float, grid: tuple[int, int]
) -> torch.Tensor:
    """Velocity `[h*w, C*p*p]` for noisy latent tokens queried against ctx (never written)."""
    h, w = grid
    dev = model.bagel.device
    pos = images.latent_position_ids(h, w, model.cfg.max_latent_size).to(dev)
    tt = torch.full((h * w,), float(t), device=dev)
    rows = model.bagel.embed_latents(x_t.to(dev), tt, pos)
    hidden = _image_block(model, ctx, rows, gen=True, write=False)
    return model.bagel.velocity(hidden)
