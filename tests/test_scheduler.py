"""The step former: ordering, token budget, chunking, KV limits, preemption."""

from __future__ import annotations

import pytest

from irg_engine.scheduler import PREFILL_FLOOR, Pending, Scheduler


def P(rid, kind, tokens, blocks=1, arrival=0, holds=1, frees=0):
    return Pending(rid, kind, tokens, blocks, arrival, holds, frees)


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
    assert plan.run == [("a", 1), ("b", 64)]  # the first prefill's floor: the budget, at most
    plan = s.plan([P("b", "prefill", 500, 32, 1), P("c", "prefill", 500, 32, 2)], 100)
    assert plan.run == [("b", 64)]


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


def test_prefills_and_image_blocks_do_not_starve_behind_a_big_denoise():
    # 2 x 4098 guidance rows take the whole budget: the oldest prefill still gets a chunk, and
    # an image block (which cannot be cut) runs whole, one a step.
    s = Scheduler(token_budget=8192, block_size=16)
    denoise = P("a", "denoise", 8196, 0, 0)
    plan = s.plan([denoise, P("b", "prefill", 1000, 63, 1), P("c", "prefill", 40, 3, 2)], 100)
    assert plan.run == [("a", 8196), ("b", PREFILL_FLOOR)]
    plan = s.plan([denoise, P("b", "prefill", 40, 3, 1)], 100)
    assert plan.run == [("a", 8196), ("b", 40)]
    # A few tokens left over: the first prefill still gets the floor, not those few.
    plan = s.plan([P("a", "denoise", 8190, 0, 0), P("b", "prefill", 1000, 63, 1)], 100)
    assert plan.run == [("a", 8190), ("b", PREFILL_FLOOR)]
    plan = s.plan([denoise, P("b", "block", 4098, 257, 1), P("c", "block", 4098, 257, 2)], 600)
    assert plan.run == [("a", 8196), ("b", 4098)]


def test_a_prefill_short_of_kv_blocks_runs_the_chunk_they_hold_and_holds_younger_ones():
    s = Scheduler(token_budget=512, block_size=16)
    # 5 free blocks hold a chunk of 5 x 16 tokens.
    plan = s.plan([P("a", "prefill", 300, 20, 0), P("b", "prefill", 10, 1, 1)], free_blocks=5)
    assert plan.run == [("a", 80)]
    # An older image block that does not fit: younger prefills wait behind it, decodes do not.
    pending = [P("a", "block", 300, 20, 0), P("b", "prefill", 10, 1, 1), P("c", "decode", 1, 1, 2)]
    assert s.plan(pending, free_blocks=5).run == [("c", 1)]


def test_a_chunk_fills_the_open_block_and_counts_the_copy_of_a_shared_one():
    s = Scheduler(token_budget=512, block_size=16)
    # 6 free slots in its last block, then 2 fresh blocks; nothing left for the younger one.
    tail = Pending("a", "prefill", 300, 20, 0, room=6)
    assert s.plan([tail, P("b", "prefill", 10, 1, 1)], free_blocks=2).run == [("a", 38)]
    # The shared last block is copied first: one of the 2 free blocks goes to the copy.
    shared = Pending("a", "prefill", 300, 20, 0, room=6, copy=1)
    assert s.plan([shared], free_blocks=2).run == [("a", 22)]
    assert s.plan([shared], free_blocks=0).run == []


def test_a_prefill_over_the_budget_that_fits_the_pool_exactly_runs_in_chunks():
    # Two blocks of 64 hold a 101-token prompt; the budget cuts it in two (no blocks spare).
    s = Scheduler(token_budget=64, block_size=64)
    assert s.plan([P("a", "prefill", 101, 2, 0)], free_blocks=2).run == [("a", 64)]
    assert s.plan([Pending("a", "prefill", 37, 1, 0, room=0)], free_blocks=1).run == [("a", 37)]


def test_the_victim_is_the_youngest_request_younger_than_the_oldest_that_frees_blocks():
    s = Scheduler(token_budget=1000, block_size=16)
    pending = [
        P("a", "block", 50, 9, 0, holds=5, frees=3),
        P("b", "block", 50, 9, 3, holds=2, frees=2),
        P("c", "block", 50, 9, 5, holds=2, frees=0),  # only shared blocks: frees nothing
        P("d", "block", 50, 9, 7, holds=0),
    ]
    assert s.plan(pending, free_blocks=2).run == []
    assert s.victim(pending) == "b"


def test_without_blocks_to_free_the_youngest_of_several_holders_goes():
    shared = [P("a", "decode", 1, 1, 0, holds=2), P("b", "decode", 1, 1, 3, holds=2)]
    assert Scheduler.victim(shared) == "b"
    assert Scheduler.victim(shared[:1]) is None  # alone: nobody to make room for it


def test_pending_validates():
    with pytest.raises(ValueError):
        Pending("a", "nap", 1, 0, 0)
    with pytest.raises(ValueError):
        Scheduler(0, 16)
