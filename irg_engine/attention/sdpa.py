"""Reference attention backend: torch SDPA on one segment, with an explicit bottom-right mask.

SDPA's own `is_causal` aligns the mask top-left, which is wrong for a segment that follows a
cached prefix, so the mask is built here whenever the segment has a context.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """Boolean `[q_len, k_len]` mask, True where query i may see key j (bottom-right causal)."""
    offset = k_len - q_len
    rows = torch.arange(q_len, device=device)[:, None]
    cols = torch.arange(k_len, device=device)[None, :]
    return cols <= rows + offset


def sdpa_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    q_len, k_len = q.shape[0], k.shape[0]
    mask = None
    use_causal = False
    if causal and q_len > 1:
        if q_len == k_len:
            use_causal = True
        else:
            mask = causal_mask(q_len, k_len, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        k.transpose(0, 1).unsqueeze(0),
        v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=use_causal,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)
