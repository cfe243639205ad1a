"""The step former: ordering, token budget, chunking, KV limits, preemption."""

from __future__ import annotations

import pytest

from irg_engine.scheduler import Pending, Scheduler


def P(rid, kind, tokens, blocks=1, arrival=0, holds=1):
    return Pending(rid, kind, tokens, blocks, arrival, holds)


def test_decode_rides_along_with_denoise_and_prefill():
    s = Scheduler(token_budget=100, block_size=16)
    plan = s.plan(
        [P("a", "prefill", 30, 2, 0), P("b", "decode", 1, 1, 1), P("c", "denoise", 40, 0, 2)],
        free_blocks=100,
    )
    assert plan.run == [("b", 1), ("c", 40), ("a", 30)]


def test_long_prefill_is_chunked_to_the_budget():
    s = Scheduler(token_budget=64, block_size=16)
    plan = s.plan([P("a", "decode", 1), P("b", "prefill", 500, 32, 1)], free_blocks=100)
    assert plan.run == [("a", 1), ("b", 63)]


def test_image_blocks_are_not_cut_but_the_first_item_always_runs():
    s = Scheduler(token_budget=64, block_size=16)
    plan = s.plan([P("a", "block", 300, 20, 0), P("b", "block", 10, 1, 1)], free_blocks=100)
    assert plan.run == [("a", 300)]


def test_first_denoise_always_runs_even_over_budget():
    s = Scheduler(token_budget=10, block_size=16)
    plan = s.plan([P("a", "denoise", 4098, 0, 0), P("b", "denoise", 4098, 0, 1)], free_blocks=0)
    assert plan.run == [("a", 4098)]


def test_items_that_do_not_fit_in_kv_wait():
    s = Scheduler(token_budget=1000, block_size=16)
    plan = s.plan([P("a", "decode", 1, 1, 0), P("b", "decode", 1, 1, 1)], free_blocks=1)
    assert plan.run == [("a", 1)]


def test_nothing_fits_preempts_the_youngest_holder():
    s = Scheduler(token_budget=1000, block_size=16)
    plan = s.plan(
        [
            P("a", "block", 50, 9, 0, holds=5),
            P("b", "block", 50, 9, 3, holds=2),
            P("c", "block", 50, 9, 5, holds=0),
        ],
        free_blocks=2,
    )
    assert plan.run == [] and plan.preempt == ["b"]


def test_pending_validates():
    with pytest.raises(ValueError):
        Pending("a", "nap", 1, 0, 0)
    with pytest.raises(ValueError):
        Scheduler(0, 16)
