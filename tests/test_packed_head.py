"""PackedHead: the CPU decode lm_head on a oneDNN-packed weight gives F.linear's logits (to the
last bits), and a row's logits do not depend on the rows beside it."""

import pytest
import torch
import torch.nn.functional as F

from irg_engine import packed_head
from irg_engine.packed_head import PackedHead

WEIGHT = torch.randn(5000, 64, generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.skipif(not packed_head.available(WEIGHT), reason="needs torch with oneDNN")


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9])
def test_logits_match_f_linear_and_each_row_alone(rows):
    head = PackedHead(WEIGHT)
    hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    logits = head(hidden)
    torch.testing.assert_close(logits, F.linear(hidden, WEIGHT), rtol=1e-6, atol=1e-5)
    assert not head.broken
    for i in range(rows):
        assert torch.equal(logits[i], head(hidden[i : i + 1])[0])


def test_each_power_of_two_is_probed_on_first_use():
    head = PackedHead(WEIGHT)
    for rows in (5, 6, 8, 3, 4, 2):
        head(torch.randn(rows, 64))
    assert sorted(head.checked) == [2, 4, 8]


def test_a_row_does_not_depend_on_its_neighbours():
    head = PackedHead(WEIGHT)
    row = torch.randn(1, 64)
    alone = head(torch.cat([row, torch.zeros(4, 64)]))[0]
    mixed = head(torch.cat([row, torch.randn(6, 64)]))[0]
    assert torch.equal(alone, mixed)


def test_a_batch_dependent_kernel_falls_back_to_f_linear(monkeypatch):
    head = PackedHead(WEIGHT)
    real = head._linear
    # A kernel whose last bits move with the batch size, as a different GEMM path could.
    monkeypatch.setattr(head, "_linear", lambda h: real(h) * (1 + 1e-7 * (h.shape[0] > 1)))
    hidden = torch.randn(4, 64)
    assert torch.equal(head(hidden), F.linear(hidden, WEIGHT))
    assert head.broken


def test_not_available_off_float32():
    assert not packed_head.available(WEIGHT.to(torch.bfloat16))
