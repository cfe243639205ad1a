"""The sequential reference programs, one request at a time: the specification the engine meets.

`run(model, params, observer)` dispatches on `params.recipe`.
"""

from __future__ import annotations

from collections.abc import Callable

from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes.edit import edit
from irg_engine.recipes.irg import irg
from irg_engine.recipes.params import Observer, RecipeParams, RecipeResult
from irg_engine.recipes.t2i import t2i, think_t2i
from irg_engine.recipes.understand import understand

RECIPES: dict[str, Callable[..., RecipeResult]] = {
    "irg": irg,
    "t2i": t2i,
    "think_t2i": think_t2i,
    "edit": edit,
    "understand": understand,
}


def run(model: LoadedModel, params: RecipeParams, observer: Observer | None = None) -> RecipeResult:
    return RECIPES[params.recipe](model, params, observer)
