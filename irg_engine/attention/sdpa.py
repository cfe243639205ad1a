"""Reference attention backend: torch SDPA on one segment, with an explicit bottom-right mask.

SDPA's own `is_causal` aligns the mask top-left, which is wrong for a segment that follows a
cached prefix, so the mask is built here whenever the segment has a context.

On CUDA, segments of fewer than `CUDNN_MIN_ROWS` queries keep off cuDNN's attention. cuDNN
builds an execution graph (and may compile a kernel) for a new shape or mask before its first
run, and text segments rarely repeat a shape: prompts, think chunks and re-tokenised thinks
each have their own lengths. Serving projects report builds of hundreds of ms, and on the H200
steps of nothing but a few short prefills took 0.5-0.9 s each (BENCHMARKS.md, eighth session)
for a few ms of work; whether the builds are the cause is not measured yet. For short segments
the flash and memory-efficient kernels cost no build and little time. Image blocks and
denoising rows (4,098 queries at 1024 px) repeat their shapes at every step, and there cuDNN's
kernel is the fastest SDPA has (~540 TFLOP/s).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

CUDNN_MIN_ROWS = 1024

# torch's backend switches are process-wide: threads that run short segments at once (two
# engines in one process) share one switch-off, and the last to leave restores the setting.
_switch = threading.Lock()
_inside = 0
_cudnn_was = True


@contextmanager
def _without_cudnn() -> Iterator[None]:
    global _inside, _cudnn_was
    with _switch:
        if _inside == 0:
            _cudnn_was = torch.backends.cuda.cudnn_sdp_enabled()
            torch.backends.cuda.enable_cudnn_sdp(False)
        _inside += 1
    try:
        yield
    finally:
        with _switch:
            _inside -= 1
            if _inside == 0:
                torch.backends.cuda.enable_cudnn_sdp(_cudnn_was)


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
    args = (q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None])
    kwargs = dict(attn_mask=mask, is_causal=use_causal, enable_gqa=q.shape[1] != k.shape[1])
    if q.is_cuda and q_len < CUDNN_MIN_ROWS:
        with _without_cudnn():
            out = F.scaled_dot_product_attention(*args, **kwargs)
    else:
        out = F.scaled_dot_product_attention(*args, **kwargs)
    return out.squeeze(0).transpose(0, 1)
