"""Optional attention backend: xformers' memory-efficient kernels (CUDA only).

xformers has no CPU kernels and its wheels are built for one torch/CUDA pair, so it is only ever
used when it imports and runs; `sdpa` stays the path that works everywhere. Grouped KV heads are
expanded to the query heads, and a segment after a cached prefix uses xformers' bottom-right
causal mask.
"""

from __future__ import annotations

import torch


def available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # an install built for another torch/CUDA fails in many ways
        return False
    return True


def xformers_segment(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool
) -> torch.Tensor:
    from xformers.ops import fmha, memory_efficient_attention

    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    bias = fmha.attn_bias.LowerTriangularFromBottomRightMask() if causal else None
    return memory_efficient_attention(q[None], k[None], v[None], attn_bias=bias)[0]
