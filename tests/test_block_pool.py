"""Block bookkeeping: allocation, sharing by reference count, copy-on-write, no leaks."""

from __future__ import annotations

import random

import pytest

from irg_engine.block_pool import BlockPool, KVSequence, OutOfBlocks
from irg_engine.prefix_cache import PrefixCache


def test_allocate_and_release_round_trip():
    pool = BlockPool(4, 8)
    blocks = pool.allocate(3)
    assert pool.num_free == 1 and len(set(blocks)) == 3
    with pytest.raises(OutOfBlocks):
        pool.allocate(2)
    pool.release(blocks)
    assert pool.num_free == 4
    with pytest.raises(ValueError):
        pool.release(blocks[:1])


def test_append_fills_blocks_then_grows():
    pool = BlockPool(10, 4)
    seq = KVSequence()
    a = seq.append(pool, 6)
    assert len(seq.blocks) == 2 and seq.length == 6 and not a.copies
    assert a.slots == seq.slots(pool)
    b = seq.append(pool, 2)
    assert len(seq.blocks) == 2 and len(b.slots) == 2
    assert b.slots == [seq.blocks[1] * 4 + 2, seq.blocks[1] * 4 + 3]


def test_fork_shares_and_copy_on_write_protects_the_other():
    pool = BlockPool(10, 4)
    main = KVSequence("main")
    main.append(pool, 6)  # blocks: full, half
    fork = main.fork(pool, "fork")
    assert pool.refs[main.blocks[0]] == 2 and pool.num_used == 2
    a = fork.append(pool, 1)
    assert a.copies == [(main.blocks[1], fork.blocks[1])]  # the partial block is copied
    assert fork.blocks[0] == main.blocks[0] and fork.blocks[1] != main.blocks[1]
    assert pool.refs[main.blocks[1]] == 1
    b = main.append(pool, 1)  # no longer shared: written in place
    assert not b.copies
    fork.free(pool)
    main.free(pool)
    assert pool.num_free == 10


def test_full_blocks_are_shared_without_copies():
    pool = BlockPool(10, 4)
    main = KVSequence()
    main.append(pool, 8)
    fork = main.fork(pool, "f")
    a = fork.append(pool, 3)
    assert not a.copies and fork.blocks[:2] == main.blocks
    assert main.blocks_needed(pool, 1) == 1


def test_append_is_all_or_nothing():
    pool = BlockPool(2, 4)
    seq = KVSequence()
    seq.append(pool, 5)
    with pytest.raises(OutOfBlocks):
        seq.append(pool, 4)
    assert seq.length == 5 and pool.num_free == 0


def test_random_forks_and_frees_never_leak():
    rng = random.Random(0)
    pool = BlockPool(64, 4)
    live: list[KVSequence] = [KVSequence()]
    for _ in range(2000):
        op = rng.random()
        seq = rng.choice(live)
        try:
            if op < 0.5:
                seq.append(pool, rng.randint(1, 6))
            elif op < 0.75 and len(live) < 12:
                live.append(seq.fork(pool, "f"))
            elif len(live) > 1:
                live.remove(seq)
                seq.free(pool)
        except OutOfBlocks:
            victim = live.pop(rng.randrange(len(live)))
            victim.free(pool)
            if not live:
                live.append(KVSequence())
        assert sum(pool.refs) == sum(len(s.blocks) for s in live)
    for seq in live:
        seq.free(pool)
    assert pool.num_free == pool.num_blocks and not any(pool.refs)


def test_held_back_slots_are_reused_trimmed_and_never_shared_by_a_fork():
    pool = BlockPool(8, 4)
    seq = KVSequence("a")
    seq.append(pool, 4)
    (slot,) = seq.append(pool, 1).slots  # starts a second block
    seq.hold_back(1)
    assert seq.length == 4 and len(seq.blocks) == 2
    fork = seq.fork(pool, "f")
    assert fork.blocks == seq.blocks[:1]  # the held block is not shared
    assert seq.append(pool, 1).slots == [slot]  # the next append lands on the held slot
    seq.hold_back(1)
    seq.trim(pool)
    assert len(seq.blocks) == 1 and pool.num_used == 1
    fork.free(pool)
    seq.free(pool)
    assert pool.num_used == 0


def test_a_saved_layout_leaves_out_held_back_slots():
    """A failed step is rolled back to layouts saved before it; a held block the step gave
    back meanwhile may already belong to another sequence."""
    pool = BlockPool(8, 4)
    a, b = KVSequence("a"), KVSequence("b")
    for seq in (a, b):
        seq.append(pool, 4)
        seq.append(pool, 1)  # a second block, held back as a step run ahead leaves it
        seq.hold_back(1)
    saved = [(seq, seq.save(pool)) for seq in (a, b)]
    for seq in (a, b):  # the step rolls both rows back...
        seq.trim(pool)
    a.append(pool, 1)  # ...and the blocks go out again, in swapped order
    b.append(pool, 1)
    for seq, layout in saved:  # then it fails
        seq.restore(pool, layout)
    assert [len(s.blocks) for s in (a, b)] == [1, 1] and pool.num_used == 2
    a.free(pool)
    b.free(pool)
    assert pool.num_used == 0


def test_next_slot_is_known_only_where_no_block_must_be_taken_or_copied():
    pool = BlockPool(8, 4)
    seq = KVSequence("a")
    assert seq.next_slot(pool) is None  # no block yet
    seq.append(pool, 2)
    assert seq.next_slot(pool) == seq.blocks[0] * 4 + 2
    fork = seq.fork(pool, "f")
    assert seq.next_slot(pool) is None  # the shared last block would be copied first
    fork.free(pool)
    seq.append(pool, 2)
    assert seq.next_slot(pool) is None  # full: a new block
    (slot,) = seq.append(pool, 1).slots
    seq.hold_back(1)
    assert seq.next_slot(pool) == slot  # the held-back slot


def test_the_prefix_cache_gives_back_an_entry_no_request_shares_first():
    pool = BlockPool(8, 4)
    cache = PrefixCache(pool, entries=4)
    for key in ((1,), (2,)):
        seq = KVSequence("prompt")
        seq.append(pool, 4)
        cache.store(key, seq)
        seq.free(pool)
    user = KVSequence("user")
    assert cache.adopt((1,), user)  # the older entry is in use: the newer one goes
    assert cache.give_back() and pool.num_used == 1
    assert cache.give_back() and pool.num_used == 1  # then the shared one: its user keeps it
    assert not cache.give_back()
    user.free(pool)
    assert pool.num_used == 0
