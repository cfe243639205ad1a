"""The two stages every recipe is built from, on top of `context.py`.

- `text_stage`: decode a text (think, reflect, answer) on a fork of the context and return it as
  the published code does: the decoded string cut between the markers. The caller decides where
  the re-tokenised segment is prefilled.
- `image_stage`: draw noise, denoise against the given contexts, decode to uint8 pixels.
Both report to the `Observer`.
"""

from __future__ import annotations

import torch

from irg_engine import images
from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes.context import Context, decode_text
from irg_engine.recipes.denoise import (
    ImageSettings,
    decode_latents,
    generate_latents,
    initial_noise,
    latent_grid,
)
from irg_engine.recipes.params import ImageOut, Observer, RecipeParams, TextOut


def text_stage(
    model: LoadedModel,
    ctx: Context,
    stage: str,
    round: int,
    params: RecipeParams,
    generator: torch.Generator,
    observer: Observer,
) -> TextOut:
    generated = decode_text(
        model,
        ctx,
        max_length=params.max_think_tokens,
        temperature=params.temperature,
        generator=generator,
        on_token=lambda tok, pos, logits: observer.text_token(stage, round, tok, pos, logits),
    )
    text = model.tokenizer.think_text(generated)
    out = TextOut(stage, round, text, model.tokenizer.segment(text))
    observer.text_done(out, generated)
    return out


@torch.no_grad()
def image_stage(
    model: LoadedModel,
    full: Context,
    text_free: Context | None,
    img_free: Context | None,
    settings: ImageSettings,
    round: int,
    generator: torch.Generator,
    observer: Observer,
) -> ImageOut:
    grid = latent_grid(model, settings.width, settings.height)
    noise = observer.noise(round, initial_noise(model, grid, generator))
    total = settings.num_timesteps - 1
    tokens = generate_latents(
        model,
        full,
        text_free,
        img_free,
        settings,
        noise,
        on_step=lambda trace: observer.image_step(round, trace, total),
    )
    decoded = decode_latents(model, tokens, grid)
    out = ImageOut(round, images.tensor_to_uint8(decoded))
    observer.image_done(round, tokens, decoded, out)
    return out
