"""The recipes as programs (irg, t2i, think_t2i, edit, understand) and the reference runner.

`run(model, params, observer)` runs one request sequentially with the dense executor; the engine
runs the same programs batched.
"""

from __future__ import annotations

from collections.abc import Callable

from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes.dense import DenseContexts, drive
from irg_engine.recipes.edit import edit
from irg_engine.recipes.irg import irg
from irg_engine.recipes.params import Observer, RecipeParams, RecipeResult
from irg_engine.recipes.t2i import t2i, think_t2i
from irg_engine.recipes.understand import understand
from irg_engine.recipes.work import Env, Program

RECIPES: dict[str, Callable[[RecipeParams, Env], Program]] = {
    "irg": irg,
    "t2i": t2i,
    "think_t2i": think_t2i,
    "edit": edit,
    "understand": understand,
}


def program(params: RecipeParams, env: Env) -> Program:
    return RECIPES[params.recipe](params, env)


def run(model: LoadedModel, params: RecipeParams, observer: Observer | None = None) -> RecipeResult:
    observer = observer or Observer()
    env = Env(model.tokenizer, model.cfg, DenseContexts(), observer)
    return drive(model, program(params, env))
