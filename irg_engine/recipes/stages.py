"""The stages every recipe program is built from (generators that yield model work).

- `prefill_image`: an image as context, VAE block then ViT block.
- `text_stage`: decode a text (think, reflect, answer) on a fork of the context, turn it into the
  string the published code keeps (cut between the markers), and put the re-tokenised segment
  into the context. Where re-tokenising gives back exactly the decoded ids, the decode's own KV is
  kept and only `<|im_end|>` is appended; otherwise the segment is prefilled as the reference does.
- `image_stage`: noise -> Euler steps with guidance (one `Velocity` item per step, one row per
  active branch) -> optional previews -> decoded uint8 pixels.
All report to the request's `Observer`.
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from irg_engine import flow, images
from irg_engine.config import BagelConfig, ViTConfig
from irg_engine.recipes.denoise import ImageSettings, StepTrace, initial_noise, latent_grid
from irg_engine.recipes.params import ImageOut, RecipeParams, TextOut
from irg_engine.recipes.work import (
    Contexts,
    DecodeLatents,
    DecodeStep,
    EncodeLatent,
    Env,
    PrefillLatent,
    PrefillText,
    PrefillVit,
    Program,
    Velocity,
)
from irg_engine.tokenizer import Tokenizer


def vit_inputs(cfg: ViTConfig, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT patches and position ids of an image resized by the ViT rule."""
    x = images.pil_to_tensor(images.VIT_RULE.resize(image))
    p = cfg.patch_size
    ids = images.vit_position_ids(x.shape[1] // p, x.shape[2] // p, cfg.max_patches_per_side)
    return images.vit_patches(x, p), ids


def prefill_image(
    cfg: BagelConfig,
    ctx: Any,
    image: Image.Image,
    vae: bool,
    vit: bool,
    vit_from_vae_size: bool = True,
) -> Program:
    """An input image as context: VAE block then ViT block, as the published code orders them.

    BAGEL's interleaved inference resizes the image by the VAE rule first and derives the ViT
    input from that; the IRG script resizes both from the original (`vit_from_vae_size=False`).
    """
    image = images.to_rgb(image)
    if vae:
        latent = yield EncodeLatent(image)
        yield PrefillLatent(ctx, latent)
    if vit:
        src = images.VAE_RULE.resize(image) if vit_from_vae_size else image
        yield PrefillVit(ctx, *vit_inputs(cfg.vit, src))


def decode(
    contexts: Contexts,
    ctx: Any,
    tok: Tokenizer,
    max_length: int,
    temperature: float,
    generator: torch.Generator,
    on_token=None,
) -> Program:
    """Generate from `<|im_start|>` on a fork of ctx; returns (ids with the start token, fork).

    Stops after `max_length` steps (the start token counts) or when `<|im_end|>` is produced
    (not appended, not fed). `on_token(id, position, logits)` sees every step (the logits stay
    on the model's device: copying them to the host is the observer's choice).
    """
    work = contexts.fork(ctx, "decode")
    ids = [tok.im_start]
    for step in range(max_length):
        position = contexts.rope(work)
        # The published loop samples on every step, the last included: keep the RNG stream equal.
        item = DecodeStep(
            work, ids[-1], temperature, generator, tok.im_end, last=step == max_length - 1
        )
        out = yield item
        if on_token is not None:
            on_token(ids[-1], position, out.logits)
        token = out.checked()
        if not item.continues(token):
            break
        ids.append(token)
    return ids, work


def prefill_text(env: Env, ctx: Any, ids: list[int], shared: bool = False) -> Program:
    """Append a text segment (reported to the observer with its context and first position)."""
    env.observer.text_segment(ctx.name, ids, env.contexts.rope(ctx))
    yield PrefillText(ctx, ids, shared)


def text_stage(
    env: Env, main: Any, stage: str, round: int, params: RecipeParams, generator: torch.Generator
) -> Program:
    """Returns (TextOut, the main context with the text appended)."""
    contexts, tok, observer = env.contexts, env.tokenizer, env.observer
    generated, work = yield from decode(
        contexts,
        main,
        tok,
        params.max_think_tokens,
        params.temperature,
        generator,
        on_token=lambda t, pos, logits: observer.text_token(stage, round, t, pos, logits),
    )
    text = tok.think_text(generated)
    out = TextOut(stage, round, text, tok.segment(text))
    observer.text_done(out, generated)
    if out.ids[:-1] == generated:
        contexts.free(main)
        main = work
        yield from prefill_text(env, main, out.ids[-1:])
    else:
        contexts.free(work)
        yield from prefill_text(env, main, out.ids)
    return out, main


def _preview_steps(total: int, count: int) -> dict[int, int]:
    """Step index -> preview index for `count` previews spread over the steps (not the last)."""
    count = min(count, total - 1)
    return {(k + 1) * total // (count + 1) - 1: k for k in range(count)}


def image_stage(
    env: Env,
    full: Any,
    text_free: Any,
    img_free: Any,
    settings: ImageSettings,
    round: int,
    generator: torch.Generator,
    partial_images: int = 0,
) -> Program:
    cfg, observer = env.cfg, env.observer
    grid = latent_grid(cfg, settings.width, settings.height)
    x = observer.noise(round, initial_noise(cfg, grid, generator)).float()
    g = settings.guidance
    ts, dts = flow.schedule(settings.num_timesteps, settings.timestep_shift)
    previews = _preview_steps(len(ts), partial_images)
    for i, (t, dt) in enumerate(zip(ts.tolist(), dts.tolist(), strict=True)):
        use_text, use_img = flow.guidance_active(t, g)
        branches = [full] + ([text_free] if use_text else []) + ([img_free] if use_img else [])
        vs = yield Velocity(branches, x, t, grid)
        # An executor may answer on its GPU (the engine does, so that no step waits for a copy
        # back): the latents follow once and stay there.
        x = x.to(vs[0].device)
        v_tf = vs[1] if use_text else None
        v_if = vs[-1] if use_img else None
        v = flow.combine_guidance(vs[0], v_tf, v_if, g)
        observer.image_step(round, StepTrace(i, t, x, vs[0], v_tf, v_if, v), len(ts))
        if i in previews:
            decoded = yield DecodeLatents(x - t * v, grid)
            observer.image_partial(round, previews[i], images.tensor_to_uint8(decoded))
        x = flow.euler_step(x, v, torch.tensor(dt, dtype=torch.float32))
    decoded = yield DecodeLatents(x, grid)
    out = ImageOut(round, images.tensor_to_uint8(decoded))
    observer.image_done(round, x, decoded, out)
    return out
