"""The lm_head of CPU decode steps, through oneDNN's matmul on a weight packed once.

The vocabulary projection is the largest single cost of a decode step on the CPU: the weight
(`[vocab, hidden]`, 39 MB in float32 for the tiny model's 152k rows) is read once per step. With
`F.linear`, MKL repacks that weight on every call, and on AMD CPUs its GEMM runs far below the
machine's speed. oneDNN (`torch.ops.mkldnn._linear_pointwise`) takes a copy reordered once into
its blocked layout. Measured (`[8, 64] x [64, 152064]`, 2 threads, the tiny model's head): on a
2-core AMD EPYC VM 1.3 ms, against 5.9 ms with `F.linear` and 5.4 ms with an MKL-packed weight;
one row 0.9 ms against 1.2 ms.

Batch invariance: a row's logits must not depend on the rows beside it. A step's rows are padded
with zeros up to a power of two, and the first time a bucket is used a probe checks that the
bucket's rows equal the same rows computed one at a time; where it does not hold (or oneDNN is
missing), every call uses `F.linear` instead, with a warning. On the VM above the oneDNN rows are
bitwise those of `F.linear` from 4 rows up and differ from its one-row (matrix-vector) results in
the last bits; the reference recipes keep `F.linear`, as the published code does. Off float32 or
on another device `available` is false and the runner uses `Bagel.logits` instead.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# The reorder takes a batch-size hint; from 4 rows up the layout and the results are the same
# for any hint (measured 4-64), and one pack serves every bucket.
PACK_HINT = 8


def available(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


class PackedHead:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.detach()
        self.pack: torch.Tensor | None = None
        self.checked: set[int] = set()
        self.broken = False

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[rows, vocab]` (float32) of the hidden rows."""
        rows = hidden.shape[0]
        bucket = 1 << (rows - 1).bit_length()
        if self.broken or (bucket not in self.checked and not self._check(bucket)):
            return F.linear(hidden, self.weight)
        padded = F.pad(hidden, (0, 0, 0, bucket - rows)) if rows < bucket else hidden
        return self._linear(padded)[:rows]

    def _linear(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(hidden, self.pack, None, "none", [], "")

    def _check(self, bucket: int) -> bool:
        """Pack the weight (once) and probe `bucket` rows against the rows one at a time; on a
        mismatch or an error, `F.linear` from now on."""
        try:
            if self.pack is None:
                self.pack = torch.ops.mkldnn._reorder_linear_weight(self.weight, PACK_HINT)
            probe = torch.randn(bucket, self.weight.shape[1], generator=torch.Generator())
            together = self._linear(probe)
            for i in range(bucket):
                if not torch.equal(together[i : i + 1], self._linear(probe[i : i + 1])):
                    raise RuntimeError(f"a row's logits depend on its batch ({bucket} rows)")
        except Exception as error:  # a private op: any failure means "not on this build"
            log.warning("packed lm_head unavailable, using F.linear: %s", error)
            self.broken = True
            return False
        self.checked.add(bucket)
        return True
