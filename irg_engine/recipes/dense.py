"""The reference executor: runs a recipe program's work items one at a time, as they come.

Contexts are dense per-sequence caches (`context.Context`); every item is one model call (or
several, for the guidance branches of a velocity item, one after another). This is the
specification the batched engine must reproduce.
"""

from __future__ import annotations

from typing import Any

import torch

from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes.context import (
    Context,
    decode_latents,
    encode_latent,
    predict_velocity,
    prefill_text,
    prefill_vae_block,
    prefill_vit_block,
)
from irg_engine.recipes.work import (
    Decoded,
    DecodeLatents,
    DecodeStep,
    EncodeLatent,
    PrefillLatent,
    PrefillText,
    PrefillVit,
    Program,
    ReadKV,
    Velocity,
    Work,
)
from irg_engine.sampler import sample_token


class DenseContexts:
    def new(self, name: str) -> Context:
        return Context(name=name)

    def fork(self, ctx: Context, name: str) -> Context:
        return ctx.fork(name)

    def free(self, ctx: Context) -> None:
        """Dense contexts are garbage collected."""

    def rope(self, ctx: Context) -> int:
        return ctx.rope


def execute(model: LoadedModel, item: Work) -> Any:
    match item:
        case PrefillText(ctx=ctx, ids=ids):
            prefill_text(model, ctx, ids)
        case PrefillLatent(ctx=ctx, latent=latent):
            prefill_vae_block(model, ctx, latent)
        case PrefillVit(ctx=ctx, patches=patches, ids=ids):
            prefill_vit_block(model, ctx, patches, ids)
        case DecodeStep(ctx=ctx, token=token, temperature=temperature, generator=generator):
            logits = model.bagel.logits(prefill_text(model, ctx, [token]))[0]
            return Decoded(sample_token(logits, temperature, generator), logits)
        case Velocity(contexts=contexts, x=x, t=t, grid=grid):
            return [predict_velocity(model, c, x, t, grid).cpu() for c in contexts]
        case EncodeLatent(image=image):
            return encode_latent(model, image)
        case DecodeLatents(x=x, grid=grid):
            return decode_latents(model, x, grid)
        case ReadKV(ctx=ctx):
            return list(ctx.keys), list(ctx.values)
        case _:
            raise TypeError(f"unknown work item {type(item).__name__}")
    return None


@torch.no_grad()
def drive(model: LoadedModel, program: Program) -> Any:
    """Run a program to its end; returns what the program returns."""
    try:
        item = next(program)
        while True:
            item = program.send(execute(model, item))
    except StopIteration as stop:
        return stop.value
