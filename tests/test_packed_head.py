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
    head = PackedHead(WEIGHT, max_rows=16)
    hidden = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))
    logits = head(hidden)
    assert head.usable
    torch.testing.assert_close(logits, F.linear(hidden, WEIGHT), rtol=1e-6, atol=1e-5)
    for i in range(rows):
        assert torch.equal(logits[i], head(hidden[i : i + 1])[0])


def test_a_row_does_not_depend_on_its_neighbours():
    head = PackedHead(WEIGHT, max_rows=8)
    row = torch.randn(1, 64)
    alone = head(torch.cat([row, torch.zeros(4, 64)]))[0]
    mixed = head(torch.cat([row, torch.randn(6, 64)]))[0]
    assert torch.equal(alone, mixed)


def test_a_batch_dependent_kernel_is_never_used(monkeypatch):
    """Every bucket is probed before the first call, so no call (one row included) goes through
    a kernel whose rows move with the batch size: the decision never changes mid-run."""
    head = PackedHead(WEIGHT, max_rows=8)
    real = head._linear
    # Last bits that move at 8 rows, as the batched kernel does for wide hidden sizes.
    monkeypatch.setattr(head, "_linear", lambda h: real(h) * (1 + 1e-7 * (h.shape[0] == 8)))
    one = torch.randn(1, 64)
    assert torch.equal(head(one), F.linear(one, WEIGHT))
    assert head.usable is False and head.pack is None  # the packed copy is not kept
    many = torch.randn(8, 64)
    assert torch.equal(head(many), F.linear(many, WEIGHT))


def test_more_rows_than_probed_take_f_linear():
    head = PackedHead(WEIGHT, max_rows=4)
    hidden = torch.randn(6, 64)
    assert torch.equal(head(hidden), F.linear(hidden, WEIGHT))


def test_not_available_off_float32():
    assert not packed_head.available(WEIGHT.to(torch.bfloat16))
