"""Interleaving Reasoning Generation: think -> image -> (reflect -> refined image) x rounds.

Contexts, as the published IRG script builds them:
- main: IRG system prompt, prompt, think 1, [image r as VAE + ViT block, reflection r+1]...
- text-free of image 1: the system prompt alone (shared by every request); of image r > 1: main
  right before reflection r (a prefix of main).
- image-free of image r > 1: system, prompt and every think/reflection without images. It forks
  main after think 1 (same tokens, same positions) and then gets each reflection prefilled at its
  own, image-free positions.
Each round's image is decoded to uint8 pixels and those pixels (not the latent) are fed back, both
resize rules applied to the original pixels.
"""

from __future__ import annotations

import torch
from PIL import Image

from irg_engine.recipes import prompts
from irg_engine.recipes.params import FIRST_IMAGE, REFINE_IMAGE, RecipeParams, RecipeResult
from irg_engine.recipes.stages import image_stage, prefill_image, prefill_text, text_stage
from irg_engine.recipes.work import Env, Program


def irg(params: RecipeParams, env: Env) -> Program:
    tok, cx, obs = env.tokenizer, env.contexts, env.observer
    generator = torch.Generator().manual_seed(params.seed)
    result = RecipeResult(seed=params.seed)

    main = cx.new("main")
    yield from prefill_text(env, main, tok.segment(prompts.IRG), shared=True)
    text_free = cx.fork(main, "text_free")
    yield from prefill_text(env, main, tok.segment(params.prompt))
    think, main = yield from text_stage(env, main, "think", 1, params, generator)
    result.texts.append(think)
    no_images = cx.fork(main, "image_free")
    settings = params.image_settings(params.guidance(**FIRST_IMAGE))
    image = yield from image_stage(
        env, main, text_free, no_images, settings, 1, generator, params.partial_images
    )
    result.images.append(image)

    refine = params.image_settings(params.guidance(**REFINE_IMAGE))
    for round in range(2, params.refine_rounds + 2):
        cx.free(text_free)
        pixels = obs.feedback_pixels(image.round, image.pixels)
        yield from prefill_image(
            env.cfg, main, Image.fromarray(pixels), vae=True, vit=True, vit_from_vae_size=False
        )
        text_free = cx.fork(main, "text_free")
        reflect, main = yield from text_stage(env, main, "reflect", round, params, generator)
        result.texts.append(reflect)
        yield from prefill_text(env, no_images, reflect.ids)
        image = yield from image_stage(
            env, main, text_free, no_images, refine, round, generator, params.partial_images
        )
        result.images.append(image)
    return result
