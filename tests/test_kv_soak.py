"""Random mixes of every recipe on small KV pools, with aborts: every request ends; a finished one
thinks exactly what it thinks alone; one ended as too big is too big alone too; no block leaks.

A seed draws the requests and the engine's settings (pool size, budget, decode graphs, prefix
cache, how many run at once). `LOOPED` is a mix a longer random run found looping for ever: the
preempted request was older than the ones it was preempted for (IRG requests that held only the
shared system prompt) and took its blocks straight back.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from irg_engine import events as ev
from irg_engine.config import EngineConfig
from irg_engine.engine import Engine
from irg_engine.recipes import RecipeParams, run
from irg_engine.request import Request

STEP_CAP = 2000
GRAY = Image.fromarray(np.full((24, 40, 3), 90, dtype=np.uint8))
# (recipe, seed, width, height, timesteps, think tokens, temperature, refine rounds, prompt words)
LOOPED = [
    ("irg", 46, 32, 16, 2, 9, 0.0, 0, 3),
    ("irg", 3, 16, 16, 3, 5, 0.0, 0, 23),
    ("t2i", 66, 16, 32, 2, 2, 0.0, 0, 0),
    ("think_t2i", 78, 16, 32, 3, 5, 0.0, 1, 14),
    ("edit", 98, 16, 32, 3, 9, 0.0, 1, 7),
    ("irg", 84, 32, 16, 2, 5, 0.0, 2, 18),
    ("understand", 62, 32, 16, 3, 5, 1.0, 2, 13),
    ("irg", 89, 16, 16, 3, 2, 0.0, 0, 5),
    ("irg", 58, 16, 16, 2, 2, 1.0, 0, 8),
    ("irg", 75, 16, 32, 3, 9, 1.0, 1, 16),
]
LOOPED_CONFIG = EngineConfig(
    kv_tokens=512,
    block_size=16,
    token_budget=64,
    max_running=8,
    prefix_cache_entries=2,
    decode_graphs="off",
)


def params(i: int, recipe, seed, width, height, timesteps, think, temperature, rounds, words):
    return RecipeParams(
        f"prompt {i} " + "word " * words,
        recipe=recipe,
        image=GRAY if recipe in ("understand", "edit") else None,
        seed=seed,
        width=width,
        height=height,
        num_timesteps=timesteps,
        max_think_tokens=think,
        temperature=temperature,
        refine_rounds=rounds,
    )


def draw(rng: random.Random) -> tuple[EngineConfig, list[RecipeParams], set[int]]:
    config = EngineConfig(
        kv_tokens=rng.choice([512, 1024, 2048]),
        block_size=16,
        token_budget=rng.choice([64, 512]),
        max_running=rng.choice([2, 8]),
        prefix_cache_entries=rng.choice([0, 2]),
        decode_graphs=rng.choice(["off", "static"]),
    )
    recipes = ["irg", "t2i", "think_t2i", "understand", "edit"]
    mix = [
        params(
            i,
            rng.choice(recipes),
            rng.randrange(100),
            rng.choice([16, 32]),
            rng.choice([16, 32]),
            rng.choice([2, 3]),
            rng.choice([2, 9]),
            rng.choice([0.0, 1.0]),
            rng.choice([0, 1, 2]),
            rng.randrange(30),
        )
        for i in range(10)
    ]
    return config, mix, set(rng.sample(range(len(mix)), 2))


def alone(model, config: EngineConfig, request: RecipeParams) -> ev.Event:
    engine = Engine(model, config)
    sink: list = []
    engine.add(Request("alone", request, sink.append))
    engine.run_until_idle()
    engine.close()
    return sink[-1]


@pytest.mark.parametrize("seed", [None, 3])
def test_random_mixes_under_kv_pressure(tiny_model, seed):
    if seed is None:
        config, mix, aborted = LOOPED_CONFIG, [params(i, *r) for i, r in enumerate(LOOPED)], {0, 2}
    else:
        config, mix, aborted = draw(random.Random(seed))
    engine = Engine(tiny_model, config)
    sinks: list[list] = [[] for _ in mix]
    for i, p in enumerate(mix):
        engine.add(Request(str(i), p, sinks[i].append))
    steps = 0
    while not engine.idle and steps < STEP_CAP:
        engine.step()
        steps += 1
        if steps == 20:
            for i in aborted:
                engine.abort(str(i))
    assert engine.idle, f"busy after {STEP_CAP} steps, {engine.preemptions} preemptions"
    engine.close()
    for i, (p, sink) in enumerate(zip(mix, sinks, strict=True)):
        final = sink[-1]
        if isinstance(final, ev.Finished):
            reference = run(tiny_model, p)
            assert [t["text"] for t in final.texts] == [t.text for t in reference.texts]
            assert sum(isinstance(e, ev.TextDone) for e in sink) == len(reference.texts)
        elif final.code == "invalid_request":
            assert isinstance(alone_final := alone(tiny_model, config, p), ev.Failed), i
            assert alone_final.code == "invalid_request"
        else:
            assert final.code == "aborted" and i in aborted, (i, final)
    engine.clear_prefix_cache()
    assert engine.pool.num_used == 0
