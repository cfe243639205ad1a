"""Attention of many one-token queries, each over its own context in the paged cache.

Input: queries `[B, Hq, d]` (one decode token per request), the layer's key/value cache
`[slots, Hkv, d]`, a `[B, L]` slot index (each row: that request's context, its own new key
last, then padding), the `[B, L]` mask of the real entries (a prefix of each row) and the
`[B]` lengths of those prefixes. Qwen2 maps query head h to kv head h // (Hq / Hkv).

Two paths, one result:
- On CUDA with Triton, a split-context ("flash-decoding") kernel reads each key and value once,
  straight from the cache by slot: one program per (request, kv head, slice of the context)
  keeps a running softmax over its slice for the query heads of that kv head; a second kernel
  merges the slices. Nothing is gathered into a copy of the context.
- Elsewhere the keys are gathered once per kv head and the query heads that share a kv head
  become that head's query rows, so grouped-query attention is one masked SDPA call (no
  repeated keys).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from irg_engine.model.fused import give_up, kernels_usable, triton

if triton is not None:
    import triton.language as tl

BLOCK_N = 64  # context entries per kernel iteration
TARGET_PROGRAMS = 264  # two per multiprocessor of an H100/H200
MAX_SPLITS = 32
# Warps per split program: Triton's default. For sm_90 the kernel compiles to 255 registers and
# spills a little at 4; at 8 it does not spill (a review's compile); the GPU bench times both.
SPLIT_WARPS = 4


def decode_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    mask: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Attention output `[B, Hq, d]`. `mask` is boolean or additive (0 / -inf)."""
    if kernels_usable(q, keys, values, index, lengths) and _fits(q, keys):
        try:
            return _paged(q, keys, values, index, lengths)
        except Exception as error:  # a compile or launch failure: torch from now on
            give_up(error)
    b, length = index.shape
    heads, kv_heads, dim = q.shape[1], keys.shape[1], keys.shape[2]
    flat = index.flatten()
    ks = keys.index_select(0, flat).view(b, length, kv_heads, dim).transpose(1, 2)
    vs = values.index_select(0, flat).view(b, length, kv_heads, dim).transpose(1, 2)
    qs = q.reshape(b, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(
        qs, ks.to(q.dtype), vs.to(q.dtype), attn_mask=mask[:, None, None, :]
    )
    return out.reshape(b, heads, dim)


def _fits(q: torch.Tensor, keys: torch.Tensor) -> bool:
    dim = keys.shape[2]
    return dim >= 16 and not dim & (dim - 1) and q.shape[1] % keys.shape[1] == 0


def _paged(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    index: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    b, width = index.shape
    heads, kv_heads, dim = q.shape[1], keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    blocks = triton.cdiv(width, BLOCK_N)
    # Split the context until the grid fills the GPU (a lone request over a long context gets
    # many slices; 32 requests get few); every slice holds whole blocks.
    splits = min(
        triton.next_power_of_2(triton.cdiv(TARGET_PROGRAMS, b * kv_heads)),
        triton.next_power_of_2(blocks),
        MAX_SPLITS,
    )
    chunk = triton.cdiv(blocks, splits) * BLOCK_N
    rows = max(16, triton.next_power_of_2(group))  # tl.dot wants 16+ rows
    best = q.new_empty(b, kv_heads, splits, rows, dtype=torch.float32)
    total = torch.empty_like(best)
    acc = q.new_empty(b, kv_heads, splits, rows, dim, dtype=torch.float32)
    # float32 products in full precision, not TF32 (the setting is moot for bf16)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    _split_kernel[(b, kv_heads, splits)](
        q, keys, values, index, lengths, best, total, acc,
        width, dim * heads, dim * kv_heads, dim ** -0.5,
        GROUP=group, ROWS=rows, DIM=dim, BLOCK=BLOCK_N, SPLITS=splits, ITERS=chunk // BLOCK_N,
        PRECISION=precision, num_warps=SPLIT_WARPS,
    )  # fmt: skip
    out = torch.empty_like(q)
    _merge_kernel[(b, kv_heads)](
        best, total, acc, out, dim * heads,
        GROUP=group, ROWS=rows, DIM=dim, SPLITS=splits,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, index_ptr, lengths_ptr, best_ptr, total_ptr, acc_ptr,
        width, q_row, kv_row, scale,
        GROUP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
        SPLITS: tl.constexpr, ITERS: tl.constexpr, PRECISION: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, ROWS)
        d = tl.arange(0, DIM)
        query_rows = g < GROUP
        q = tl.load(
            q_ptr + b * q_row + (kv * GROUP + g)[:, None] * DIM + d[None, :],
            mask=query_rows[:, None],
            other=0.0,
        )
        length = tl.load(lengths_ptr + b)
        start = split * ITERS * BLOCK
        end = tl.minimum(start + ITERS * BLOCK, length)
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, DIM], tl.float32)
        for i in range(ITERS):
            n0 = start + i * BLOCK
            if n0 < end:  # a slice past the context's end does nothing (best stays -inf)
                n = n0 + tl.arange(0, BLOCK)
                real = n < end
                slots = tl.load(index_ptr + b * width + n, mask=real, other=0).to(tl.int64)
                at = slots[:, None] * kv_row + kv * DIM + d[None, :]
                k = tl.load(k_ptr + at, mask=real[:, None], other=0.0)
                v = tl.load(v_ptr + at, mask=real[:, None], other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
                s = tl.where(real[None, :], s, float("-inf"))
                new_best = tl.maximum(best, tl.max(s, 1))
                p = tl.exp(s - new_best[:, None])
                keep = tl.exp(best - new_best)
                total = total * keep + tl.sum(p, 1)
                acc = acc * keep[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
                best = new_best
        part = (b * tl.num_programs(1) + kv) * SPLITS + split
        tl.store(best_ptr + part * ROWS + g, best)
        tl.store(total_ptr + part * ROWS + g, total)
        tl.store(acc_ptr + (part * ROWS + g)[:, None] * DIM + d[None, :], acc)

    @triton.jit
    def _merge_kernel(
        best_ptr, total_ptr, acc_ptr, out_ptr, q_row,
        GROUP: tl.constexpr, ROWS: tl.constexpr, DIM: tl.constexpr, SPLITS: tl.constexpr,
    ):  # fmt: skip
        b = tl.program_id(0).to(tl.int64)
        kv = tl.program_id(1)
        g = tl.arange(0, ROWS)
        d = tl.arange(0, DIM)
        first = (b * tl.num_programs(1) + kv) * SPLITS
        # Slice 0 always holds the context's first entry, so `best` is finite from the start;
        # a slice past the end has best = -inf and weighs exp(-inf) = 0.
        best = tl.load(best_ptr + first * ROWS + g)
        total = tl.load(total_ptr + first * ROWS + g)
        acc = tl.load(acc_ptr + (first * ROWS + g)[:, None] * DIM + d[None, :])
        for s in range(1, SPLITS):
            part = first + s
            other = tl.load(best_ptr + part * ROWS + g)
            new_best = tl.maximum(best, other)
            keep, take = tl.exp(best - new_best), tl.exp(other - new_best)
            total = total * keep + tl.load(total_ptr + part * ROWS + g) * take
            part_acc = tl.load(acc_ptr + (part * ROWS + g)[:, None] * DIM + d[None, :])
            acc = acc * keep[:, None] + part_acc * take[:, None]
            best = new_best
        out = acc / total[:, None]
        at = out_ptr + b * q_row + (kv * GROUP + g)[:, None] * DIM + d[None, :]
        tl.store(at, out.to(out_ptr.dtype.element_ty), mask=(g < GROUP)[:, None])
