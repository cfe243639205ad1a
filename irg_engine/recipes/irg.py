"""Interleaving Reasoning Generation: think -> image -> (reflect -> refined image) x rounds.

Contexts, as the published IRG script builds them:
- main: IRG system prompt, prompt, think 1, [image r as VAE + ViT block, reflection r+1]...
- text-free of image 1: the system prompt alone; of image r > 1: main right before reflection r.
- image-free of image r > 1: system, prompt and every think/reflection, without images (the texts
  are prefilled there at their own, image-free positions).
Each round's image is decoded to uint8 pixels and those pixels (not the latent) are fed back, both
resize rules applied to the original pixels.
"""

from __future__ import annotations

import torch
from PIL import Image

from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes import prompts
from irg_engine.recipes.context import Context, prefill_image, prefill_text
from irg_engine.recipes.params import (
    FIRST_IMAGE,
    REFINE_IMAGE,
    Observer,
    RecipeParams,
    RecipeResult,
)
from irg_engine.recipes.stages import image_stage, text_stage


@torch.no_grad()
def irg(model: LoadedModel, params: RecipeParams, observer: Observer | None = None) -> RecipeResult:
    observer = observer or Observer()
    tok = model.tokenizer
    generator = torch.Generator().manual_seed(params.seed)
    result = RecipeResult(seed=params.seed)

    main = Context(name="main", on_segment=observer.text_segment)
    prefill_text(model, main, tok.segment(prompts.IRG))
    text_free = main.fork("text_free")
    prefill_text(model, main, tok.segment(params.prompt))
    no_images = main.fork("image_free")

    think = text_stage(model, main, "think", 1, params, generator, observer)
    result.texts.append(think)
    prefill_text(model, main, think.ids)
    prefill_text(model, no_images, think.ids)
    settings = params.image_settings(params.guidance(**FIRST_IMAGE))
    image = image_stage(model, main, text_free, no_images, settings, 1, generator, observer)
    result.images.append(image)

    refine = params.image_settings(params.guidance(**REFINE_IMAGE))
    for round in range(2, params.refine_rounds + 2):
        pixels = observer.feedback_pixels(image.round, image.pixels)
        prefill_image(
            model, main, Image.fromarray(pixels), vae=True, vit=True, vit_from_vae_size=False
        )
        text_free = main.fork("text_free")
        reflect = text_stage(model, main, "reflect", round, params, generator, observer)
        result.texts.append(reflect)
        prefill_text(model, main, reflect.ids)
        prefill_text(model, no_images, reflect.ids)
        image = image_stage(model, main, text_free, no_images, refine, round, generator, observer)
        result.images.append(image)
    return result
