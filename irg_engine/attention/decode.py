"""Attention of many one-token queries, each over its own context gathered from the paged cache.

Input: queries `[B, Hq, d]` (one decode token per request), the layer's key/value cache
`[slots, Hkv, d]`, a `[B, L]` slot index (each row: that request's context, its own new key
last, padded) and a `[B, L]` mask (True on the real entries). The keys are gathered once per kv
head; the Hq / Hkv query heads that share a kv head are laid out as that head's query rows, so
grouped-query attention becomes a plain masked SDPA call (no repeated keys, and the fused
memory-efficient kernel applies on CUDA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    b, length = index.shape
    heads, kv_heads, dim = q.shape[1], keys.shape[1], keys.shape[2]
    flat = index.flatten()
    ks = keys.index_select(0, flat).view(b, length, kv_heads, dim).transpose(1, 2)
    vs = values.index_select(0, flat).view(b, length, kv_heads, dim).transpose(1, 2)
    qs = q.reshape(b, kv_heads, heads // kv_heads, dim)  # Qwen2 maps q head h to kv head h // group
    out = F.scaled_dot_product_attention(
        qs, ks.to(q.dtype), vs.to(q.dtype), attn_mask=mask[:, None, None, :]
    )
    return out.reshape(b, heads, dim)
