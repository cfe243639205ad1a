"""The decoder's elementwise steps that Triton fuses on CUDA: the MLP activation `silu(gate) *
up` and rotate-half RoPE (RMSNorm fused with its neighbours is in `fused_norm.py`). Each has its
torch ops as the fallback (CPU, no Triton, or a kernel that ever fails). `kernels_usable` /
`give_up` are the switch every Triton kernel of the engine shares (the paged decode attention
too): one failure sends all of them to torch, and `IRG_TRITON=0` in the environment keeps them
off from the start. Kernels newer than the last GPU run turn only themselves off
(`kernel_off` / `turn_off`, by name).

Why: on the full-size model's 4,096-row denoising pass these steps are memory-bound passes
over 30-155 MB tensors per layer. Eager silu writes an intermediate that the product reads back
(~8.7 GB of traffic per pass); eager RoPE is five broadcasting, strided kernels over the query
and key heads (~165 us a layer on an H200, where one read and one write take ~20 us).

The kernels round exactly where eager torch does, so their results are bitwise the same in
bf16 and float32 (on an H200: tests/test_fused.py for silu, a probe of the RoPE kernel as it
launches now; the test asserts both):
- silu in float32 (`exp` from libdevice, an IEEE division), rounded to the dtype, then the
  product in float32, rounded again;
- RoPE as `x*cos + cat(-x2, x1)*sin`: each product rounded to the dtype, then the sum.
Both launch with `enable_fp_fusion=False`: with Triton's default the compiler dropped the
rounding of each RoPE product to bf16 and fused product and sum into one FMA (18% of bf16
outputs one rounding off eager torch, 25% of float32 ones).

The silu kernel reads gate and up from the joined gate|up projection's rows. That addressing
came after the last GPU run; under Triton's interpreter its outputs are bitwise those of the
two-tensor kernel that ran there (float32 and bf16, rows that do not align with blocks).
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # CPU builds of torch come without Triton
    triton = None

_STATE: dict = {"broken": False, "off": set()}


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up` where the last dim of `gate_up` is gate then up (the joined
    projection's output), `[..., 2I]` -> `[..., I]`."""
    if kernels_usable(gate_up) and gate_up.shape[-1] % 2 == 0:
        try:
            return _fused_silu_mul(gate_up)
        except Exception as error:  # a compile or launch failure: fall back for good
            give_up(error)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of queries `[n, Hq, d]` and keys `[n, Hk, d]` with tables `[n, d]`,
    into `out` (two contiguous tensors of those shapes) if given."""
    if (
        kernels_usable(q, k, cos, sin, *(out or ()))
        and rope_fits(q, cos)
        and rope_fits(k, cos)
        and sin.shape == cos.shape
    ):
        try:
            out_q, out_k = out or (torch.empty_like(q), torch.empty_like(k))
            return _fused_rope(q, cos, sin, out_q), _fused_rope(k, cos, sin, out_k)
        except Exception as error:
            give_up(error)
    # One call over the query and key heads together: half the small kernels on the CPU.
    qk = apply_rope(torch.cat([q, k], dim=1), cos, sin)
    q_rot, k_rot = qk[:, : q.shape[1]], qk[:, q.shape[1] :]
    if out is None:
        return q_rot, k_rot
    return out[0].copy_(q_rot), out[1].copy_(k_rot)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in x's dtype: the published model casts cos/sin to it first.

    `x*cos + cat(-x2, x1)*sin` without the rotated copy: each half gets its product added (or
    subtracted) in place, which rounds exactly as the published expression in any dtype and
    reads/writes about half the bytes.
    """
    half = x.shape[-1] // 2
    c, s = cos[:, None, :], sin[:, None, :]
    out = x * c
    out[..., :half] -= x[..., half:] * s[..., :half]
    out[..., half:] += x[..., :half] * s[..., half:]
    return out


def kernels_usable(*tensors: torch.Tensor) -> bool:
    """Triton is there, no kernel has failed, and the tensors are contiguous, on CUDA (or on
    the CPU under Triton's interpreter), their floating-point ones of one dtype."""
    return (
        triton is not None
        and not _STATE["broken"]
        and os.environ.get("IRG_TRITON", "1") != "0"
        and (tensors[0].is_cuda or interpreted())
        and all(t.is_contiguous() for t in tensors)
        and len({t.dtype for t in tensors if t.is_floating_point()}) == 1
    )


def interpreted() -> bool:
    """Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def give_up(error: Exception) -> None:
    _STATE["broken"] = True
    log.warning("a Triton kernel failed, using torch ops from now on: %s", error)


def kernel_off(name: str) -> bool:
    """The kernel of that name failed once (`turn_off`): its torch ops run from then on."""
    return name in _STATE["off"]


def turn_off(name: str, error: Exception) -> None:
    _STATE["off"].add(name)
    log.warning("the %s kernel failed, using torch ops for it from now on: %s", name, error)


def heads_contiguous(x: torch.Tensor) -> bool:
    """`[rows, heads, d]` whose heads lie back to back in each row (rows may be strided)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


SILU_BLOCK = 2048


def _fused_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    width = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], width)
    n = out.numel()
    grid = (triton.cdiv(n, SILU_BLOCK),)
    _silu_mul_kernel[grid](
        gate_up,
        out,
        n,
        width,
        BLOCK=SILU_BLOCK,
        LIBDEVICE=not interpreted(),
        enable_fp_fusion=False,
    )
    return out


def rope_fits(x: torch.Tensor, cos: torch.Tensor) -> bool:
    """`x [n, heads, d]` with d a power of two and a table row of d per row of x."""
    if x.dim() != 3:
        return False
    half = x.shape[-1] // 2
    return x.shape[-1] % 2 == 0 and not half & (half - 1) and cos.shape == (x.shape[0], 2 * half)


def _fused_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor
) -> torch.Tensor:
    n, heads, dim = x.shape
    if n:
        blocks = triton.next_power_of_2(heads)
        _rope_kernel[(n,)](
            x, cos, sin, out, heads, dim, HALF=dim // 2, HEADS=blocks, enable_fp_fusion=False
        )
    return out


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(
        gate_up_ptr, out_ptr, n, width, BLOCK: tl.constexpr, LIBDEVICE: tl.constexpr
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        keep = offsets < n
        # Output row r, column c reads gate at 2*width*r + c and up `width` entries after it.
        gate_at = offsets + (offsets // width) * width
        g = tl.load(gate_up_ptr + gate_at, mask=keep, other=0.0)
        u = tl.load(gate_up_ptr + gate_at + width, mask=keep, other=0.0)
        x = g.to(tl.float32)
        # libdevice's expf is the one torch's CUDA silu calls (the interpreter lacks it)
        e = libdevice.exp(-x) if LIBDEVICE else tl.exp(-x)
        silu = tl.div_rn(x, 1.0 + e).to(g.dtype)
        out = (silu.to(tl.float32) * u.to(tl.float32)).to(g.dtype)
        tl.store(out_ptr + offsets, out, mask=keep)

    @triton.jit
    def _rope_kernel(
        x_ptr, cos_ptr, sin_ptr, out_ptr, heads, dim, HALF: tl.constexpr, HEADS: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HEADS)[:, None]
        i = tl.arange(0, HALF)[None, :]
        keep = h < heads
        first = row * heads * dim + h * dim + i
        a = tl.load(x_ptr + first, mask=keep, other=0.0)
        b = tl.load(x_ptr + first + HALF, mask=keep, other=0.0)
        c1 = tl.load(cos_ptr + row * dim + i)
        c2 = tl.load(cos_ptr + row * dim + HALF + i)
        s1 = tl.load(sin_ptr + row * dim + i)
        s2 = tl.load(sin_ptr + row * dim + HALF + i)
        dt = a.dtype
        # Each product rounded to the dtype before the sum, as the eager kernels round.
        lo = (a.to(tl.float32) * c1.to(tl.float32)).to(dt).to(tl.float32) - (
            b.to(tl.float32) * s1.to(tl.float32)
        ).to(dt).to(tl.float32)
        hi = (b.to(tl.float32) * c2.to(tl.float32)).to(dt).to(tl.float32) + (
            a.to(tl.float32) * s2.to(tl.float32)
        ).to(dt).to(tl.float32)
        tl.store(out_ptr + first, lo.to(dt), mask=keep)
        tl.store(out_ptr + first + HALF, hi.to(dt), mask=keep)
