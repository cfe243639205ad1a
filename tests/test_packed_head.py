"""PackedHead: the CPU decode lm_head on MKL-packed weights gives F.linear's logits."""

import pytest
import torch
import torch.nn.functional as F

from irg_engine import packed_head
from irg_engine.packed_head import PackedHead

WEIGHT = torch.randn(5000, 64, generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.skipif(not packed_head.available(WEIGHT), reason="needs torch with MKL")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
def test_logits_equal_f_linear(rows):
    head = PackedHead(WEIGHT)
    hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(head(hidden), F.linear(hidden, WEIGHT))


def test_one_pack_per_power_of_two_made_on_first_use():
    head = PackedHead(WEIGHT)
    for rows in (5, 6, 8, 3, 4, 2):
        head(torch.randn(rows, 64))
    assert sorted(head.packs) == [4, 8]


def test_a_row_does_not_depend_on_its_neighbours():
    head = PackedHead(WEIGHT)
    row = torch.randn(1, 64)
    alone = head(torch.cat([row, torch.zeros(4, 64)]))[0]
    mixed = head(torch.cat([row, torch.randn(6, 64)]))[0]
    assert torch.equal(alone, mixed)


def test_not_available_off_float32():
    assert not packed_head.available(WEIGHT.to(torch.bfloat16))
