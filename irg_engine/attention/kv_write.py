"""Stores a step's new keys and values into one layer's paged cache, one slot per row.

Input: the layer's caches `[slots, Hkv, d]`, the `[n]` slots, and keys and values `[n, Hkv, d]`
(values are usually a row-strided view of the joined q|k|v projection). On CUDA with Triton one
kernel copies both, row by row, where torch launches an `index_copy_` for each: in a graphed
decode step at 32 requests that is one ~3 us launch a layer fewer. Elsewhere, or for inputs the
kernel does not take (another dtype than the cache's, heads not contiguous), the two
`index_copy_`s run as before. A copy either way: the cache holds the same bits.
"""

from __future__ import annotations

import torch

from irg_engine.model.fused import heads_contiguous, kernel_off, kernels_usable, triton, turn_off

if triton is not None:
    import triton.language as tl


def write_kv(
    keys: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
) -> None:
    """`keys[slots[i]] = k[i]` and `values[slots[i]] = v[i]` for every row i."""
    if _fits(keys, values, slots, k, v):
        try:
            _kernel[(k.shape[0],)](
                k, v, k.stride(0), v.stride(0), slots, keys, values,
                WIDTH=keys[0].numel(), BLOCK=triton.next_power_of_2(keys[0].numel()),
            )  # fmt: skip
            return
        except Exception as error:  # this kernel only: the others keep running
            turn_off("kv_write", error)
    keys.index_copy_(0, slots, k.to(keys.dtype))
    values.index_copy_(0, slots, v.to(values.dtype))


def _fits(keys, values, slots, k, v) -> bool:
    """Everything the kernel assumes, so that it never reads or writes out of bounds."""
    if kernel_off("kv_write") or not kernels_usable(keys, values, slots):  # slots contiguous too
        return False
    if keys.dim() != 3 or slots.dim() != 1 or slots.dtype != torch.int64:
        return False
    rows, shape = slots.shape[0], keys.shape[1:]
    return (
        slots.device == keys.device == k.device == v.device
        and k.shape == v.shape == (rows, *shape)
        and values.shape == keys.shape
        and k.dtype == v.dtype == keys.dtype
        and heads_contiguous(k)
        and heads_contiguous(v)
        and rows > 0
    )


if triton is not None:

    @triton.jit
    def _kernel(
        k_ptr, v_ptr, k_row, v_row, slots_ptr, keys_ptr, values_ptr,
        WIDTH: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64)
        slot = tl.load(slots_ptr + row).to(tl.int64)
        i = tl.arange(0, BLOCK)
        keep = i < WIDTH
        tl.store(keys_ptr + slot * WIDTH + i, tl.load(k_ptr + row * k_row + i, mask=keep), keep)
        tl.store(values_ptr + slot * WIDTH + i, tl.load(v_ptr + row * v_row + i, mask=keep), keep)
