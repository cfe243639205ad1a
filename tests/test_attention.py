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


def test_backend_setting_is_validated():
    from irg_engine.attention import available_backends, resolve_backend

    assert resolve_backend("auto") == "sdpa"
    assert "sdpa" in available_backends()
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("flash9")
    if "xformers" not in available_backends():
        with pytest.raises(ValueError, match="not available"):
            resolve_backend("xformers")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_xformers_matches_sdpa_on_gpu(causal):
    from irg_engine.attention import available_backends

    if "xformers" not in available_backends():
        pytest.skip("xformers does not load here")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(37, 28, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(300, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(300, 4, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    ref = segment_attention(q, k, v, causal, "sdpa").float()
    out = segment_attention(q, k, v, causal, "xformers").float()
    assert (out - ref).norm() / ref.norm() < 1e-2


@pytest.mark.gpu
def test_sdpa_on_gpu_matches_cpu():
    g = torch.Generator().manual_seed(1)
    q, k, v = (
        torch.randn(9, 4, 16, generator=g),
        torch.randn(20, 2, 16, generator=g),
        torch.randn(20, 2, 16, generator=g),
    )
    cpu = segment_attention(q, k, v, True)
    gpu = segment_attention(q.cuda(), k.cuda(), v.cuda(), True).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
