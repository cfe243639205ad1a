"""Text-to-image, plain (`t2i`) or with a think stage first (`think_t2i`).

Contexts, as the published app builds them: full = [think system prompt] + prompt [+ think];
text-free = everything before the prompt (empty for plain t2i, so its query sits at position 0);
image-free = [system] + prompt without the think (only used when an image scale > 1 is asked).
"""

from __future__ import annotations

import torch

from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes import prompts
from irg_engine.recipes.context import Context, prefill_text
from irg_engine.recipes.params import FIRST_IMAGE, Observer, RecipeParams, RecipeResult
from irg_engine.recipes.stages import image_stage, text_stage


@torch.no_grad()
def t2i(
    model: LoadedModel, params: RecipeParams, observer: Observer | None = None, think: bool = False
) -> RecipeResult:
    observer = observer or Observer()
    tok = model.tokenizer
    generator = torch.Generator().manual_seed(params.seed)
    result = RecipeResult(seed=params.seed)
    main = Context(name="main", on_segment=observer.text_segment)
    if think:
        prefill_text(model, main, tok.segment(prompts.GEN_THINK))
    text_free = main.fork("text_free")
    prefill_text(model, main, tok.segment(params.prompt))
    img_free = main.fork("image_free")
    if think:
        out = text_stage(model, main, "think", 1, params, generator, observer)
        result.texts.append(out)
        prefill_text(model, main, out.ids)
    settings = params.image_settings(params.guidance(**FIRST_IMAGE))
    result.images.append(
        image_stage(model, main, text_free, img_free, settings, 1, generator, observer)
    )
    return result


def think_t2i(
    model: LoadedModel, params: RecipeParams, observer: Observer | None = None
) -> RecipeResult:
    return t2i(model, params, observer, think=True)
