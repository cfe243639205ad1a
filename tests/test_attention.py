"""The packed-segment attention primitive against a naive softmax(QK^T)V."""

from __future__ import annotations

import math

import pytest
import torch

from irg_engine.attention import segment_attention


def naive(q, k, v, causal):
    lq, hq, d = q.shape
    lk, hk, _ = k.shape
    k = k.repeat_interleave(hq // hk, dim=1)
    v = v.repeat_interleave(hq // hk, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(d)
    if causal:
        allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
        scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("lq,lk", [(1, 1), (5, 5), (4, 11), (1, 9), (7, 30)])
@pytest.mark.parametrize("causal", [True, False])
def test_segment_attention_matches_naive(lq, lk, causal):
    g = torch.Generator().manual_seed(lq * 100 + lk)
    q = torch.randn(lq, 4, 16, generator=g)
    k = torch.randn(lk, 2, 16, generator=g)
    v = torch.randn(lk, 2, 16, generator=g)
    out = segment_attention(q, k, v, causal)
    torch.testing.assert_close(out, naive(q, k, v, causal), rtol=1e-5, atol=1e-5)


def test_causal_is_bottom_right_aligned():
    # With a context, the first query must see the whole context, not only key 0.
    q = torch.zeros(2, 1, 4)
    k = torch.zeros(5, 1, 4)
    v = torch.arange(5, dtype=torch.float32)[:, None, None].expand(5, 1, 4).contiguous()
    out = segment_attention(q, k, v, causal=True)
    assert out[0, 0, 0].item() == pytest.approx(sum(range(4)) / 4)
    assert out[1, 0, 0].item() == pytest.approx(sum(range(5)) / 5)
