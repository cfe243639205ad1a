"""slot_index: block tables expand to per-token slots, padded and masked."""

import torch

from irg_engine.block_pool import BlockPool, KVSequence
from irg_engine.paged_plan import sequence_slots, slot_index


def test_slot_index_expands_tables_pads_and_masks():
    index, mask = slot_index([[3, 1], [2]], [6, 2], block_size=4, width=8, fill=99)
    assert index.tolist() == [
        [12, 13, 14, 15, 4, 5, 99, 99],
        [8, 9, 99, 99, 99, 99, 99, 99],
    ]
    assert mask.tolist() == [[True] * 6 + [False] * 2, [True] * 2 + [False] * 6]


def test_slot_index_width_defaults_to_the_longest():
    index, mask = slot_index([[0], [5, 7]], [3, 5], block_size=4)
    assert index.shape == mask.shape == (2, 5)
    assert index[1].tolist() == [20, 21, 22, 23, 28]


def test_sequence_slots_match_the_pool_layout():
    pool = BlockPool(8, 4)
    seq = KVSequence("s")
    seq.append(pool, 3)
    fork = seq.fork(pool, "f")
    fork.append(pool, 6)  # copy-on-write of the shared partial block, then one more block
    assert sequence_slots(fork, 4).tolist() == fork.slots(pool)
    assert sequence_slots(fork, 4).dtype == torch.long
