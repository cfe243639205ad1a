"""Image editing: the input image as context (VAE block, then ViT block), then the instruction.

Contexts: full = image + instruction; text-free = image only; image-free = instruction only (at
positions from 0). The output has the size of the input after the VAE resize rule.
"""

from __future__ import annotations

import torch

from irg_engine import images
from irg_engine.recipes.params import REFINE_IMAGE, RecipeParams, RecipeResult
from irg_engine.recipes.stages import image_stage, prefill_image, prefill_text
from irg_engine.recipes.work import Env, Program


def edit(params: RecipeParams, env: Env) -> Program:
    tok, cx = env.tokenizer, env.contexts
    generator = torch.Generator().manual_seed(params.seed)
    image = images.to_rgb(params.image)
    size = images.VAE_RULE.target_size(*image.size)
    main = cx.new("main")
    yield from prefill_image(env.cfg, main, image, vae=True, vit=True)
    text_free = cx.fork(main, "text_free")
    yield from prefill_text(env, main, tok.segment(params.prompt))
    img_free = cx.new("image_free")
    yield from prefill_text(env, img_free, tok.segment(params.prompt))
    settings = params.image_settings(params.guidance(**REFINE_IMAGE), size)
    out = yield from image_stage(
        env, main, text_free, img_free, settings, 1, generator, params.partial_images
    )
    return RecipeResult(images=[out], seed=params.seed)
