"""Image understanding: the image as a ViT block, then the question; the answer is decoded text."""

from __future__ import annotations

import torch

from irg_engine.recipes.params import RecipeParams, RecipeResult
from irg_engine.recipes.stages import prefill_image, prefill_text, text_stage
from irg_engine.recipes.work import Env, Program


def understand(params: RecipeParams, env: Env) -> Program:
    tok, cx = env.tokenizer, env.contexts
    generator = torch.Generator().manual_seed(params.seed)
    main = cx.new("main")
    yield from prefill_image(env.cfg, main, params.image, vae=False, vit=True)
    yield from prefill_text(env, main, tok.segment(params.prompt))
    answer, _ = yield from text_stage(env, main, "answer", 1, params, generator)
    return RecipeResult(texts=[answer], seed=params.seed)
