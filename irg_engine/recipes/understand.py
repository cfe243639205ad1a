"""Image understanding: the image as a ViT block, then the question; the answer is decoded text."""

from __future__ import annotations

import torch

from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes.context import Context, prefill_image, prefill_text
from irg_engine.recipes.params import Observer, RecipeParams, RecipeResult
from irg_engine.recipes.stages import text_stage


@torch.no_grad()
def understand(
    model: LoadedModel, params: RecipeParams, observer: Observer | None = None
) -> RecipeResult:
    observer = observer or Observer()
    generator = torch.Generator().manual_seed(params.seed)
    main = Context(name="main", on_segment=observer.text_segment)
    prefill_image(model, main, params.image, vae=False, vit=True)
    prefill_text(model, main, model.tokenizer.segment(params.prompt))
    answer = text_stage(model, main, "answer", 1, params, generator, observer)
    return RecipeResult(texts=[answer], seed=params.seed)
