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


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_len", [37, 2048])  # below CUDNN_MIN_ROWS and above
def test_sdpa_in_bf16_on_gpu_matches_float32_on_either_side_of_the_cudnn_cut(causal, q_len):
    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(q_len, 28, 128, generator=g)
    k, v = (torch.randn(q_len + 300, 4, 128, generator=g) for _ in range(2))
    ref = segment_attention(q, k, v, causal)
    out = segment_attention(*(t.cuda().bfloat16() for t in (q, k, v)), causal).float().cpu()
    assert (out - ref).norm() / ref.norm() < 1e-2


def _paged_case(b, heads, kv_heads, dim, lengths, width, dtype, device):
    """Random queries and cache, each row's context scattered over random slots."""
    g = torch.Generator().manual_seed(sum(lengths) + width)
    slots = 8192
    keys = torch.randn(slots, kv_heads, dim, generator=g).to(device, dtype)
    values = torch.randn(slots, kv_heads, dim, generator=g).to(device, dtype)
    q = torch.randn(b, heads, dim, generator=g).to(device, dtype)
    index = torch.full((b, width), slots - 1, dtype=torch.long)
    for i, n in enumerate(lengths):
        index[i, :n] = torch.randperm(slots - 1, generator=g)[:n]
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(width)[None, :] < lengths_t[:, None]
    return q, keys, values, index.to(device), mask.to(device), lengths_t.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "b,lengths,width",
    [(32, [600 + 7 * i for i in range(32)], 896), (1, [5000], 5120), (3, [1, 64, 65], 256)],
)
def test_paged_decode_kernel_matches_sdpa(dtype, b, lengths, width):
    from irg_engine.attention import decode
    from irg_engine.model import fused

    if fused.triton is None:
        pytest.skip("Triton is not installed")
    case = _paged_case(b, 28, 4, 128, lengths, width, dtype, torch.device("cuda"))
    q, keys, values, index, mask, lengths_t = case
    assert fused.kernels_usable(q, keys, values, index, lengths_t)
    paged = decode._paged(q, keys, values, index, lengths_t)
    reference = naive_decode(q.double(), keys.double(), values.double(), index, mask)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert rel_l2(paged.double(), reference) < tol


@pytest.mark.parametrize("lengths", [[1, 17, 40], [33]])
def test_decode_attention_torch_path_matches_naive(lengths):
    from irg_engine.attention.decode import decode_attention

    case = _paged_case(len(lengths), 4, 2, 16, lengths, 48, torch.float32, torch.device("cpu"))
    q, keys, values, index, mask, lengths_t = case
    out = decode_attention(q, keys, values, index, mask, lengths_t)
    reference = naive_decode(q.double(), keys.double(), values.double(), index, mask)
    assert rel_l2(out.double(), reference) < 1e-6


def naive_decode(q, keys, values, index, mask):
    heads, dim = q.shape[1:]
    group = heads // keys.shape[1]
    k = keys[index].repeat_interleave(group, dim=2)  # [B, L, H, d]
    v = values[index].repeat_interleave(group, dim=2)
    scores = torch.einsum("bhd,blhd->bhl", q, k) / math.sqrt(dim)
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("bhl,blhd->bhd", scores.softmax(-1), v)


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


def test_the_cudnn_switch_off_is_shared_by_threads_and_restored_by_the_last():
    """Two threads in short segments at once: cuDNN stays off until both have left, then comes
    back as it was (torch's own sdpa_kernel restores per thread and can leave it off)."""
    import threading

    from irg_engine.attention import sdpa

    inside = threading.Barrier(2)
    first_left = threading.Event()
    seen = {}

    def one(name: str, leave_first: bool) -> None:
        with sdpa._without_cudnn():
            inside.wait()
            if not leave_first:
                first_left.wait()
                seen[name] = torch.backends.cuda.cudnn_sdp_enabled()
        if leave_first:
            first_left.set()

    before = torch.backends.cuda.cudnn_sdp_enabled()
    threads = [threading.Thread(target=one, args=(n, n == "a")) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["b"] is False  # still off for the thread that stayed
    assert torch.backends.cuda.cudnn_sdp_enabled() == before


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_kernel_stores_what_index_copy_stores(dtype):
    """Keys contiguous, values a row-strided view of a joined projection, as the model hands
    them over; the cache holds the same bits either way."""
    from irg_engine.attention import kv_write
    from irg_engine.model import fused

    if fused.triton is None:
        pytest.skip("Triton is not installed")
    g = torch.Generator().manual_seed(5)
    rows, slots = 37, 4096
    joined = torch.randn(rows, 28 + 8, 128, generator=g).to("cuda", dtype)
    k, v = joined[:, 28:32].contiguous(), joined[:, 32:]
    where = torch.randperm(slots, generator=g)[:rows].to("cuda")
    caches = [torch.randn(slots, 4, 128, generator=g).to("cuda", dtype) for _ in range(2)]
    expected = [c.clone() for c in caches]
    expected[0].index_copy_(0, where, k)
    expected[1].index_copy_(0, where, v)
    assert kv_write._fits(*caches, where, k, v)
    kv_write.write_kv(*caches, where, k, v)
    assert not fused.kernel_off("kv_write")
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
