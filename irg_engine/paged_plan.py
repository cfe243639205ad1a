"""Attention over the paged KV cache for one packed forward, and the slot tensors it reads.

A step's rows are packed in a fixed order (see `Runner.step`): one-token decode segments first,
then prefill text, then image blocks, then denoising rows. Every segment but the denoising ones
writes its keys, so the written rows are always the leading ones: one `write_kv` per layer
stores them, with no row gather. The decode segments are attended together in one masked SDPA
call over a `[B, L]` slot index that `slot_index` expands from the sequences' block tables in a
handful of tensor ops; every other segment is attended on its own.

Slots are `block * block_size + offset`, as `block_pool.py` hands them out; index tensors are
built on the host and copied to the device once.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING

import torch

from irg_engine.attention import segment_attention
from irg_engine.attention.decode import decode_attention
from irg_engine.attention.kv_write import write_kv
from irg_engine.block_pool import KVSequence, blocks_for
from irg_engine.host_memory import upload

if TYPE_CHECKING:
    from irg_engine.runner import Runner


def slot_index(
    tables: list[list[int]], lengths: list[int], block_size: int, width: int = 0, fill: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host `[B, width]` slots of each sequence's first `lengths[i]` tokens, padded with `fill`,
    and the `[B, width]` mask of the real entries (`width` 0: the longest length)."""
    width = width or max(lengths)
    blocks = max(blocks_for(width, block_size), max(len(t) for t in tables))
    # The table through a flat int64 array: torch.tensor of nested lists is slower (32 rows of
    # 128 blocks: 0.39 ms against 0.25).
    flat = array("q")
    for t in tables:
        flat.extend(t)
        flat.extend(repeat(0, blocks - len(t)))
    table = torch.frombuffer(flat, dtype=torch.long).view(len(tables), blocks)
    index = _expand(table, block_size)[:, :width]
    mask = torch.arange(width) < torch.tensor(lengths)[:, None]
    return index.masked_fill_(~mask, fill), mask


def sequence_slots(seq: KVSequence, block_size: int) -> torch.Tensor:
    """Host slots of every token of one sequence."""
    return _expand(torch.tensor(seq.blocks, dtype=torch.long), block_size)[: seq.length]


def _expand(blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """The slots of every offset of the blocks in the last dim, in order."""
    return torch.add(torch.arange(block_size), blocks[..., None], alpha=block_size).flatten(-2)


@dataclass(slots=True)
class Segment:
    """Rows `start..end` of the step attend over `seq`; `written` of them are its newest tokens
    (already reserved in `seq`), 0 for denoising rows whose keys are not kept."""

    start: int
    end: int
    causal: bool
    seq: KVSequence
    written: int


def _one_token(s: Segment, row: int) -> bool:
    return s.causal and s.written == 1 and s.start == row and s.end == row + 1


class PagedPlan:
    def __init__(self, runner: Runner, segments: list[Segment], write_slots: list[int]) -> None:
        self.runner = runner
        dev, bs = runner.device, runner.pool.block_size
        self.write = upload(torch.tensor(write_slots), dev) if write_slots else None
        decodes = 0  # leading one-token causal segments: the decode tokens
        while decodes < len(segments) and _one_token(segments[decodes], decodes):
            decodes += 1
        self.decodes = decodes if decodes > 1 else 0
        if self.decodes:
            seqs = [s.seq for s in segments[:decodes]]
            lengths = [s.length for s in seqs]
            # Padded with the scratch slot: a masked key still enters SDPA's sums (0 * NaN is
            # NaN), and a freed pool slot may hold a failed request's NaN.
            index, mask = slot_index([s.blocks for s in seqs], lengths, bs, fill=runner.scratch)
            self.decode_index = upload(index, dev)
            self.decode_lengths = upload(torch.tensor(lengths), dev)
            # Additive, in the compute dtype (as SDPA would convert a boolean mask in every
            # layer), built once per step.
            dtype = runner.model.bagel.dtype
            self.decode_mask = torch.zeros(mask.shape, device=dev, dtype=dtype).masked_fill_(
                upload(~mask, dev), float("-inf")
            )
        self.others = [
            (s, upload(sequence_slots(s.seq, bs), dev)) for s in segments[self.decodes :]
        ]  # written segments: context and own slots; others: context slots

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.runner.keys[layer], self.runner.values[layer]
        if self.write is not None:
            written = len(self.write)
            write_kv(kc, vc, self.write, k[:written], v[:written])
        d = self.decodes
        if d:
            decoded = decode_attention(
                q[:d], kc, vc, self.decode_index, self.decode_mask, self.decode_lengths
            )
            if not self.others:
                return decoded
        out = torch.empty_like(q)
        if d:
            out[:d] = decoded
        for s, slots in self.others:
            if s.written:
                ks, vs = kc.index_select(0, slots), vc.index_select(0, slots)
            else:
                ks = torch.cat([kc.index_select(0, slots), k[s.start : s.end].to(kc.dtype)])
                vs = torch.cat([vc.index_select(0, slots), v[s.start : s.end].to(vc.dtype)])
            out[s.start : s.end] = segment_attention(
                q[s.start : s.end], ks.to(q.dtype), vs.to(q.dtype), s.causal, self.runner.backend
            )
        return out
