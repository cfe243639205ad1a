"""Bucket sizes of the decode graphs (the engine tests cover the static forward itself)."""

from __future__ import annotations

from irg_engine.decode_graph import batch_bucket, context_bucket


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
