"""Image editing: the input image as context (VAE block, then ViT block), then the instruction.

Contexts: full = image + instruction; text-free = image only; image-free = instruction only (at
positions from 0). The output has the size of the input after the VAE resize rule.
"""

from __future__ import annotations

import torch

from irg_engine import images
from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes.context import Context, prefill_image, prefill_text
from irg_engine.recipes.params import REFINE_IMAGE, Observer, RecipeParams, RecipeResult
from irg_engine.recipes.stages import image_stage


@torch.no_grad()
def edit(
    model: LoadedModel, params: RecipeParams, observer: Observer | None = None
) -> RecipeResult:
    observer = observer or Observer()
    tok = model.tokenizer
    generator = torch.Generator().manual_seed(params.seed)
    image = images.to_rgb(params.image)
    size = images.VAE_RULE.target_size(*image.size)
    main = Context(name="main", on_segment=observer.text_segment)
    prefill_image(model, main, image, vae=True, vit=True)
    text_free = main.fork("text_free")
    prefill_text(model, main, tok.segment(params.prompt))
    img_free = Context(name="image_free", on_segment=observer.text_segment)
    prefill_text(model, img_free, tok.segment(params.prompt))
    settings = params.image_settings(params.guidance(**REFINE_IMAGE), size)
    out = image_stage(model, main, text_free, img_free, settings, 1, generator, observer)
    return RecipeResult(images=[out], seed=params.seed)
