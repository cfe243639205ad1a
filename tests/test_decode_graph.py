"""Bucket sizes of the decode graphs and the host block's slot index rows (the engine tests
cover the static forward itself)."""

from __future__ import annotations

import torch

from irg_engine.block_pool import BlockPool, KVSequence
from irg_engine.decode_graph import IndexRows, batch_bucket, context_bucket
from irg_engine.paged_plan import slot_index


def test_context_buckets_cover_each_length_with_bounded_padding():
    previous = 0
    for length in range(1, 70_000, 7):
        bucket = context_bucket(length)
        assert bucket >= length and bucket >= previous
        assert bucket - length < max(256, length // 4 + 1)
        previous = bucket
    assert len({context_bucket(n) for n in range(1, 16_384)}) <= 24  # few graphs per batch size


def test_batch_buckets_are_powers_of_two():
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 8, 9, 32, 33)] == [1, 2, 4, 8, 8, 16, 32, 64]


def test_index_rows_match_a_fresh_build_through_growth_forks_rollbacks_and_shifts():
    bs, scratch = 4, 999
    pool = BlockPool(64, bs)
    index = torch.zeros(4, 32, dtype=torch.long)
    rows = IndexRows(index, scratch)

    def check(seqs: list[KVSequence]) -> None:
        rows.update(seqs, bs)
        lengths = [s.length for s in seqs]
        fresh, _ = slot_index([s.blocks for s in seqs], lengths, bs, 32, scratch)
        assert torch.equal(index[: len(seqs)], fresh)
        assert (index[len(seqs) :] == scratch).all()  # padding rows see the scratch slot only

    a, b, c = KVSequence("a"), KVSequence("b"), KVSequence("c")
    for seq, n in ((a, 5), (b, 3), (c, 9)):
        seq.append(pool, n)
    check([a, b, c])
    for _ in range(6):  # one token per step: only the new entries are written
        for seq in (a, b, c):
            seq.append(pool, 1)
        check([a, b, c])
    saved = b.save(pool)
    b.append(pool, 2)
    check([a, b, c])
    b.restore(pool, saved)  # a rolled-back step: the row is rebuilt shorter
    check([a, b, c])
    fork = a.fork(pool, "fork")  # a's last block is shared and partly filled
    a.append(pool, 1)  # copy-on-write replaces it
    check([a, b, c])
    check([c, a])  # a request left: rows shift, the last one turns to padding
    fork.append(pool, 1)
    check([c, a, fork])
    c.append(pool, 12)  # grew by more than MAX_GROWTH since its row was written
    check([c, a, fork])
    c.free(pool)
    d = KVSequence("d")
    d.append(pool, 2)
    check([d, a, fork])
