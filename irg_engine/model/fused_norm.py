"""RMSNorm fused with its neighbours in the decoder layer (Triton on CUDA, torch elsewhere).

- `norm_rope_qk`: QK-norm, then rotate-half RoPE, of the query and key heads, read straight from
  the joined q|k|v projection's rows and written normed and rotated: one kernel where a layer
  launched four (two RMSNorms, two RoPEs).
- `add_rms_norm`: the residual add after the attention's output projection and the
  post-attention norm of its sum: one kernel where a layer launched two, and the sum is read
  back from registers instead of memory.

Why: a graphed decode step at 32 requests launches about a dozen small kernels a layer besides
its GEMMs, each ~3-4 us on an H200 (the profile's RMSNorm launches took 3.6 us each), and 6,000
tokens/s asks for 5.33 ms a step where the kernels took 5.5-5.7 ms. In the denoising pass each
fusion saves a read and a write of a 30 MB tensor a layer.

Numbers: statistics in float32 (`rsqrt`, as torch and the published model take it) and
`x * rstd * weight` rounded once to the dtype, as `F.rms_norm` computes them; RoPE rounded as
`fused._rope_kernel` rounds (bitwise eager torch); the residual sum rounded once, as torch's
add. Only the sum of squares is added in another order than torch's, so a normed value can be
one rounding apart (float32: ~1e-7 relative; float32 golden parity passes through both kernels
under Triton's interpreter, sequential and engine).

Neither has run on a GPU yet: tests/test_fused.py compares them with the torch ops there, and a
failure of either turns only that kernel off (its torch ops take over), not the shared switch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irg_engine.model.fused import (
    heads_contiguous,
    kernel_off,
    kernels_usable,
    rope_fits,
    rope_qk,
    triton,
    turn_off,
)

if triton is not None:
    import triton.language as tl


def norm_rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    norms: tuple[torch.Tensor, torch.Tensor] | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`rope_qk` of the QK-normed queries `[n, Hq, d]` and keys `[n, Hk, d]` (`norms`: the two
    RMSNorm weights, None for no QK-norm). q and k may be row-strided views (of the joined
    projection); each head's d values must be contiguous."""
    if norms is not None and _norm_rope_fits(q, k, norms, cos, sin, out):
        try:
            out_q, out_k = out or (q.new_empty(q.shape), k.new_empty(k.shape))
            _fused_norm_rope(q, k, norms, eps, cos, sin, out_q, out_k)
            return out_q, out_k
        except Exception as error:
            turn_off("norm_rope", error)
    if norms is not None:
        d = q.shape[-1:]
        q, k = F.rms_norm(q, d, norms[0], eps=eps), F.rms_norm(k, d, norms[1], eps=eps)
    return rope_qk(q, k, cos, sin, out)


def add_rms_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x + y, rms_norm(x + y))` over the last dim of `[rows, width]` tensors."""
    if _add_norm_fits(x, y, weight):
        try:
            return _fused_add_norm(x, y, weight, eps)
        except Exception as error:
            turn_off("add_norm", error)
    total = x + y
    return total, F.rms_norm(total, weight.shape, weight, eps=eps)


def _add_norm_fits(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor) -> bool:
    """Everything the kernel assumes, so that it never reads or writes out of bounds."""
    return (
        not kernel_off("add_norm")
        and kernels_usable(x, y, weight)
        and x.dim() >= 1
        and x.shape == y.shape
        and weight.shape == x.shape[-1:]
        and x.device == y.device == weight.device
    )


def _norm_rope_fits(q, k, norms, cos, sin, out) -> bool:
    """Everything the kernel assumes, so that it never reads or writes out of bounds."""
    if kernel_off("norm_rope") or not kernels_usable(cos, sin, *norms, *(out or ())):
        return False  # (first: on the CPU the answer comes at once)
    if q.dim() != 3 or k.dim() != 3:
        return False
    n, _, d = q.shape
    return (
        k.shape[0] == n
        and k.shape[2] == d
        and heads_contiguous(q)
        and heads_contiguous(k)
        and q.device == k.device == cos.device
        and q.dtype == k.dtype == cos.dtype
        and rope_fits(q, cos)
        and sin.shape == cos.shape
        and all(w.shape == (d,) for w in norms)
        and (out is None or (out[0].shape == q.shape and out[1].shape == k.shape))
    )


def _fused_norm_rope(q, k, norms, eps, cos, sin, out_q, out_k) -> None:
    n, q_heads, dim = q.shape
    k_heads = k.shape[1]
    if n:
        _norm_rope_kernel[(n,)](
            q, k, q.stride(0), k.stride(0), norms[0], norms[1], cos, sin, out_q, out_k,
            q_heads, k_heads, eps,
            HALF=dim // 2, QH=triton.next_power_of_2(q_heads), KH=triton.next_power_of_2(k_heads),
            enable_fp_fusion=False,
        )  # fmt: skip


def _fused_add_norm(
    x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    width = x.shape[-1]
    total, normed = torch.empty_like(x), torch.empty_like(x)
    rows = x.numel() // width if width else 0
    if rows:
        block = triton.next_power_of_2(width)
        _add_norm_kernel[(rows,)](
            x, y, weight, total, normed, width, eps,
            BLOCK=block, num_warps=min(8, max(1, block // 512)), enable_fp_fusion=False,
        )  # fmt: skip
    return total, normed


if triton is not None:

    @triton.jit
    def _norm_rope_kernel(
        q_ptr, k_ptr, q_row, k_row, qw_ptr, kw_ptr, cos_ptr, sin_ptr, q_out, k_out,
        q_heads, k_heads, eps,
        HALF: tl.constexpr, QH: tl.constexpr, KH: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        cos_at, sin_at = cos_ptr + row * 2 * HALF, sin_ptr + row * 2 * HALF
        _norm_rope_heads(
            q_ptr + row * q_row, qw_ptr, cos_at, sin_at, q_out + row * q_heads * 2 * HALF,
            q_heads, eps, HALF, QH,
        )  # fmt: skip
        _norm_rope_heads(
            k_ptr + row * k_row, kw_ptr, cos_at, sin_at, k_out + row * k_heads * 2 * HALF,
            k_heads, eps, HALF, KH,
        )  # fmt: skip

    @triton.jit
    def _norm_rope_heads(
        x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, heads, eps,
        HALF: tl.constexpr, HEADS: tl.constexpr,
    ):  # fmt: skip
        h = tl.arange(0, HEADS)[:, None]
        i = tl.arange(0, HALF)[None, :]
        keep = h < heads
        first = h * 2 * HALF + i
        a = tl.load(x_ptr + first, mask=keep, other=0.0)
        b = tl.load(x_ptr + first + HALF, mask=keep, other=0.0)
        dt = a.dtype
        a32, b32 = a.to(tl.float32), b.to(tl.float32)
        mean_square = (tl.sum(a32 * a32, 1) + tl.sum(b32 * b32, 1)) / (2 * HALF)
        rstd = tl.rsqrt(mean_square + eps)[:, None]
        w1 = tl.load(w_ptr + i).to(tl.float32)
        w2 = tl.load(w_ptr + HALF + i).to(tl.float32)
        a = (a32 * rstd * w1).to(dt).to(tl.float32)
        b = (b32 * rstd * w2).to(dt).to(tl.float32)
        c1 = tl.load(cos_ptr + i).to(tl.float32)
        c2 = tl.load(cos_ptr + HALF + i).to(tl.float32)
        s1 = tl.load(sin_ptr + i).to(tl.float32)
        s2 = tl.load(sin_ptr + HALF + i).to(tl.float32)
        lo = (a * c1).to(dt).to(tl.float32) - (b * s1).to(dt).to(tl.float32)
        hi = (b * c2).to(dt).to(tl.float32) + (a * s2).to(dt).to(tl.float32)
        tl.store(out_ptr + first, lo.to(dt), mask=keep)
        tl.store(out_ptr + first + HALF, hi.to(dt), mask=keep)

    @triton.jit
    def _add_norm_kernel(
        x_ptr, y_ptr, w_ptr, total_ptr, out_ptr, width, eps, BLOCK: tl.constexpr
    ):  # fmt: skip
        i = tl.arange(0, BLOCK)
        keep = i < width
        at = tl.program_id(0).to(tl.int64) * width + i
        x = tl.load(x_ptr + at, mask=keep, other=0.0)
        y = tl.load(y_ptr + at, mask=keep, other=0.0)
        total = (x.to(tl.float32) + y.to(tl.float32)).to(x.dtype)
        tl.store(total_ptr + at, total, mask=keep)
        t32 = total.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(t32 * t32, 0) / width + eps)
        w = tl.load(w_ptr + i, mask=keep, other=0.0).to(tl.float32)
        tl.store(out_ptr + at, (t32 * rstd * w).to(x.dtype), mask=keep)
