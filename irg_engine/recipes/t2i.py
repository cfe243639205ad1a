"""Text-to-image, plain (`t2i`) or with a think stage first (`think_t2i`).

Contexts, as the published app builds them: full = [think system prompt] + prompt [+ think];
text-free = everything before the prompt (empty for plain t2i, so its query sits at position 0);
image-free = [system] + prompt without the think (only used when an image scale > 1 is asked).
"""

from __future__ import annotations

import torch

from irg_engine.recipes import prompts
from irg_engine.recipes.params import FIRST_IMAGE, RecipeParams, RecipeResult
from irg_engine.recipes.stages import image_stage, prefill_text, text_stage
from irg_engine.recipes.work import Env, Program


def t2i(params: RecipeParams, env: Env, think: bool = False) -> Program:
    tok, cx = env.tokenizer, env.contexts
    generator = torch.Generator().manual_seed(params.seed)
    result = RecipeResult(seed=params.seed)
    main = cx.new("main")
    if think:
        yield from prefill_text(env, main, tok.segment(prompts.GEN_THINK), shared=True)
    text_free = cx.fork(main, "text_free")
    yield from prefill_text(env, main, tok.segment(params.prompt))
    img_free = cx.fork(main, "image_free")
    if think:
        out, main = yield from text_stage(env, main, "think", 1, params, generator)
        result.texts.append(out)
    settings = params.image_settings(params.guidance(**FIRST_IMAGE))
    image = yield from image_stage(
        env, main, text_free, img_free, settings, 1, generator, params.partial_images
    )
    result.images.append(image)
    return result


def think_t2i(params: RecipeParams, env: Env) -> Program:
    return (yield from t2i(params, env, think=True))
