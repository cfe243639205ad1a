"""The reference recipes on the tiny random model: every recipe runs, seeds reproduce."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from irg_engine.recipes import RecipeParams, run

SMALL = dict(width=32, height=48, num_timesteps=4, max_think_tokens=6)


def test_irg_produces_think_reflect_and_two_images(tiny_model):
    r = run(tiny_model, RecipeParams("a cat", seed=1, **SMALL))
    assert [(t.stage, t.round) for t in r.texts] == [("think", 1), ("reflect", 2)]
    assert [(i.round, i.pixels.shape) for i in r.images] == [(1, (48, 32, 3)), (2, (48, 32, 3))]
    assert all(len(t.ids) <= SMALL["max_think_tokens"] + 1 for t in r.texts)


def test_refine_rounds_parameter(tiny_model):
    r = run(tiny_model, RecipeParams("a cat", refine_rounds=2, **SMALL))
    assert [t.stage for t in r.texts] == ["think", "reflect", "reflect"]
    assert [i.round for i in r.images] == [1, 2, 3]
    r0 = run(tiny_model, RecipeParams("a cat", refine_rounds=0, **SMALL))
    assert len(r0.images) == 1


def test_seed_reproduces_and_differs(tiny_model):
    a = run(tiny_model, RecipeParams("a dog", seed=7, temperature=1.0, **SMALL))
    b = run(tiny_model, RecipeParams("a dog", seed=7, temperature=1.0, **SMALL))
    c = run(tiny_model, RecipeParams("a dog", seed=8, temperature=1.0, **SMALL))
    assert [t.text for t in a.texts] == [t.text for t in b.texts]
    assert all(np.array_equal(x.pixels, y.pixels) for x, y in zip(a.images, b.images, strict=True))
    assert not np.array_equal(a.images[0].pixels, c.images[0].pixels)


@pytest.mark.parametrize("recipe", ["t2i", "think_t2i"])
def test_t2i_recipes(tiny_model, recipe):
    r = run(tiny_model, RecipeParams("a house", recipe=recipe, **SMALL))
    assert len(r.images) == 1 and r.images[0].pixels.shape == (48, 32, 3)
    assert [t.stage for t in r.texts] == (["think"] if recipe == "think_t2i" else [])


def test_edit_output_has_the_vae_resized_input_size(tiny_model):
    image = Image.fromarray(np.full((20, 30, 3), 128, dtype=np.uint8))
    r = run(tiny_model, RecipeParams("make it red", recipe="edit", image=image, num_timesteps=3))
    assert r.images[0].pixels.shape == (512, 768, 3)


def test_understand_answers_in_text(tiny_model):
    image = Image.fromarray(np.zeros((30, 30, 3), dtype=np.uint8))
    r = run(
        tiny_model,
        RecipeParams(
            "what is this?", recipe="understand", image=image, max_think_tokens=5, temperature=0.0
        ),
    )
    assert [t.stage for t in r.texts] == ["answer"] and not r.images


def test_params_validate():
    with pytest.raises(ValueError, match="width"):
        RecipeParams("x", width=100)
    with pytest.raises(ValueError, match="recipe"):
        RecipeParams("x", recipe="video")
    with pytest.raises(ValueError, match="needs an input image"):
        RecipeParams("x", recipe="edit")


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_a_temperature_that_is_not_a_finite_non_negative_number_is_refused(temperature):
    with pytest.raises(ValueError, match="temperature"):
        RecipeParams("a dog", temperature=temperature)
