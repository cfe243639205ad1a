"""The lm_head of CPU decode steps, through MKL's GEMM on a pre-packed weight.

The vocabulary projection is the largest single cost of a decode step on the CPU: the weight
(`[vocab, hidden]`, 39 MB in float32 for the tiny model's 152k rows) is read once per step. With
`F.linear`, MKL repacks that weight on every call; `torch.ops.mkl._mkl_linear` takes a copy packed
once for a given row count. Measured on the 2-core dev VM (`[8, 64] x [64, 152064]`, 2 threads):
3.8 ms with `F.linear`, 2.4 ms packed; 16 rows 9.9 vs 3.0 ms. From 3 rows up the results are
bitwise those of `F.linear` (checked again when a pack is made); below that MKL's matrix-vector
path gives different last bits, so 1 or 2 rows keep `F.linear`, as the reference recipes do.

A step's rows are padded with zeros up to a power of two, and one pack is kept per such bucket
(each the size of the weight), made on first use. The reference recipes keep `F.linear`: they
mirror the published code. Off MKL builds, off float32 or on another device `available` is
false and the runner uses `Bagel.logits` instead.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MIN_ROWS = 3


def available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch._C.has_mkl
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


class PackedHead:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()
        self.packs: dict[int, torch.Tensor] = {}
        self.broken = False

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[rows, vocab]` (float32) of the hidden rows."""
        rows = hidden.shape[0]
        if rows < MIN_ROWS or self.broken:
            return F.linear(hidden, self.weight)
        bucket = 1 << (rows - 1).bit_length()
        pack = self.packs.get(bucket)
        if pack is None and (pack := self._pack(bucket)) is None:
            return F.linear(hidden, self.weight)
        padded = F.pad(hidden, (0, 0, 0, bucket - rows)) if rows < bucket else hidden
        return torch.ops.mkl._mkl_linear(padded, pack, self.weight, None, bucket)[:rows]

    def _pack(self, bucket: int) -> torch.Tensor | None:
        """Pack for `bucket` rows, or None (and `F.linear` from now on) if MKL disagrees."""
        try:
            pack = torch.ops.mkl._mkl_reorder_linear_weight(self.weight, bucket)
            probe = torch.randn(bucket, self.weight.shape[1], generator=torch.Generator())
            packed = torch.ops.mkl._mkl_linear(probe, pack, self.weight, None, bucket)
            if not torch.equal(packed, F.linear(probe, self.weight)):
                raise RuntimeError("packed GEMM differs from F.linear")
        except RuntimeError as error:
            log.warning("packed lm_head unavailable, using F.linear: %s", error)
            self.broken = True
            return None
        self.packs[bucket] = pack
        return pack
