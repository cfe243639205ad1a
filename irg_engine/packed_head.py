"""The lm_head of CPU decode steps, through oneDNN's matmul on a weight packed once.

The vocabulary projection is the largest single cost of a decode step on the CPU: the weight
(`[vocab, hidden]`, 39 MB in float32 for the tiny model's 152k rows) is read once per step. With
`F.linear`, MKL repacks that weight on every call, and on AMD CPUs its GEMM runs far below the
machine's speed. oneDNN (`torch.ops.mkldnn._linear_pointwise`) takes a copy reordered once into
its blocked layout. Measured (`[8, 64] x [64, 152064]`, 2 threads, the tiny model's head): on a
2-core AMD EPYC VM 1.3 ms, against 5.9 ms with `F.linear` and 5.4 ms with an MKL-packed weight;
one row 0.9 ms against 1.2 ms.

Batch invariance: a row's logits must not depend on the rows beside it. A step's rows are padded
with zeros up to a power of two, and before the first call a probe checks every bucket up to the
engine's largest batch: each bucket's rows must equal the same rows computed one at a time. Where
that does not hold (measured: hidden sizes above 1,024, e.g. the 7B model's 3,584 in float32,
where oneDNN's batched kernel sums differently from its one-row one) or oneDNN is missing, every
call uses `F.linear` instead, with a warning, and the pack is dropped. On the VM above, at the
tiny model's 64, the oneDNN rows are bitwise those of `F.linear` from 4 rows up and differ from
its one-row (matrix-vector) results in the last bits; the reference recipes keep `F.linear`, as
the published code does. Off float32 or on another device `available` is false and the runner
uses `Bagel.logits` instead.
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
    def __init__(self, weight: torch.Tensor, max_rows: int) -> None:
        self.weight = weight.detach()
        self.max_bucket = _bucket(max(1, max_rows))
        self.pack: torch.Tensor | None = None
        self.usable: bool | None = None  # decided on the first call

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits `[rows, vocab]` (float32) of the hidden rows."""
        if self.usable is None:
            self.usable = self._probe()
        rows = hidden.shape[0]
        bucket = _bucket(rows)
        if not self.usable or bucket > self.max_bucket:  # (more rows than the probe saw)
            return F.linear(hidden, self.weight)
        padded = F.pad(hidden, (0, 0, 0, bucket - rows)) if rows < bucket else hidden
        return self._linear(padded)[:rows]

    def _linear(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(hidden, self.pack, None, "none", [], "")

    def _probe(self) -> bool:
        """Pack the weight, then check every bucket's rows against the rows one at a time."""
        try:
            self.pack = torch.ops.mkldnn._reorder_linear_weight(self.weight, PACK_HINT)
            probe = torch.randn(
                self.max_bucket, self.weight.shape[1], generator=torch.Generator().manual_seed(0)
            )
            alone: list[torch.Tensor] = []  # grown per bucket: a mismatch at 2 rows ends it
            bucket = 2
            while bucket <= self.max_bucket:
                alone += [self._linear(row[None]) for row in probe[len(alone) : bucket]]
                if not torch.equal(self._linear(probe[:bucket]), torch.cat(alone)):
                    raise RuntimeError(f"a row's logits depend on its batch ({bucket} rows)")
                bucket *= 2
        except Exception as error:  # a private op: any failure means "not here"
            log.warning("packed lm_head unavailable, using F.linear: %s", error)
            self.pack = None
            return False
        return True


def _bucket(rows: int) -> int:
    return 1 << (rows - 1).bit_length()
