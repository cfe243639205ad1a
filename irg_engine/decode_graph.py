"""Decode-only steps on static buffers, replayed as CUDA graphs.

While requests think or reflect, most steps hold nothing but one new token per request. On a GPU
the eager forward of such a step is bound by kernel launches (thousands of small kernels, each
for a handful of rows), not by the GPU. `DecodeGraphs` runs these steps on static buffers sized
by a bucket — the batch padded to a power of two, the longest context padded up a geometric
ladder — so that each bucket's forward can be captured once as a CUDA graph and replayed.

Flow of one step: `run(ids, positions, write_slots, seqs, block_size)` fills the bucket's
buffers (ids, RoPE positions, the KV slot each new key goes to, the length of each request's
context and a `[B, L]` slot index over it, its new token last) on the host and sends them in one
copy, then replays the bucket's graph (capturing it on first use) and returns the real rows of
the logits. The ids may instead be a device tensor (tokens a step launched earlier drew, which
the host has not read: `decode_ahead.py`); they are copied in on the device. Padding rows write
their key to the scratch slot the runner reserves past the pool's slots and attend to that slot
alone.

The slot index is the bulk of that host work (32 requests x 2,048 slots), and from one step to
the next a row mostly gains one entry: `IndexRows` remembers which context each row of a host
block holds, writes just the new entries of the rows that only grew, and rebuilds the others.

Off CUDA (or with capture off) the same static forward runs eagerly: tests exercise the buffer
layout on the CPU and compare it with the reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from irg_engine.attention.decode import decode_attention
from irg_engine.attention.kv_write import write_kv
from irg_engine.block_pool import KVSequence
from irg_engine.model.bagel import LoadedModel
from irg_engine.model.lm import UND, ExpertRoutes
from irg_engine.paged_plan import sequence_slots

log = logging.getLogger(__name__)


def context_bucket(length: int) -> int:
    """Padded context length: multiples of 256 up to 1024, then of a quarter power of two."""
    if length <= 1024:
        return max(256, -(-length // 256) * 256)
    step = 1 << (length.bit_length() - 3)  # at most ~25% padding
    return -(-length // step) * step


def batch_bucket(n: int) -> int:
    return 1 << (n - 1).bit_length()


Replay = Callable[[], torch.Tensor]


@dataclass(slots=True)
class Buffers:
    """A bucket's inputs, all views of one int64 block: the host fills its own block and sends
    it in one copy (pinned and asynchronous on CUDA)."""

    flat: torch.Tensor  # [4B + B*L]
    ids: torch.Tensor  # [B] token ids
    positions: torch.Tensor  # [B] RoPE positions
    write: torch.Tensor  # [B] slot of each new key
    lengths: torch.Tensor  # [B] real entries of each index row (a prefix)
    index: torch.Tensor  # [B, L] context slots (new key last), padded

    @staticmethod
    def zeros(b: int, length: int, device: torch.device, pinned: bool = False) -> Buffers:
        flat = torch.zeros(4 * b + b * length, dtype=torch.long, device=device, pin_memory=pinned)
        return Buffers(flat, *flat[: 4 * b].view(4, b), flat[4 * b :].view(b, length))


@dataclass(slots=True)
class Bucket:
    """One bucket's buffers: the host's block and what its index rows hold, the device's, the
    replay (None until captured) and the event of the last copy from the host block."""

    host: Buffers
    rows: IndexRows
    device: Buffers
    replay: Replay | None
    copied: torch.cuda.Event | None  # None off CUDA, where copies are synchronous


# A row that gained more entries than this since its block was last used is rebuilt instead.
MAX_GROWTH = 8


class IndexRows:
    """What each row of one host block's slot index holds: the context, the blocks it had and
    the entries written (its length); every entry past that is the scratch slot.

    `update` brings the rows to a step's contexts. A row whose context is the one it held, with
    the same blocks in front and at most `MAX_GROWTH` more tokens, gets just the new entries (all
    such entries in one indexed write); any other row (a new request, a shifted batch, a
    copy-on-write of its last block, a rollback) is rebuilt from its block table.
    """

    def __init__(self, index: torch.Tensor, scratch: int) -> None:
        self.index, self.scratch = index, scratch
        index.fill_(scratch)
        rows = index.shape[0]
        self.seqs: list[KVSequence | None] = [None] * rows
        self.blocks: list[list[int]] = [[] for _ in range(rows)]
        self.lengths = [1] * rows

    def update(self, seqs: list[KVSequence], block_size: int) -> None:
        rows, cols, slots = [], [], []
        for i, seq in enumerate(seqs):
            had, known = self.lengths[i], self.blocks[i]
            if (
                self.seqs[i] is seq
                and had <= seq.length <= had + MAX_GROWTH
                and seq.blocks[: len(known)] == known
            ):
                for t in range(had, seq.length):
                    rows.append(i)
                    cols.append(t)
                    slots.append(seq.blocks[t // block_size] * block_size + t % block_size)
                if len(seq.blocks) != len(known):
                    self.blocks[i] = list(seq.blocks)
            else:
                row = self.index[i]
                row.fill_(self.scratch)
                row[: seq.length] = sequence_slots(seq, block_size)
                self.seqs[i], self.blocks[i] = seq, list(seq.blocks)
            self.lengths[i] = seq.length
        if rows:
            self.index[rows, cols] = torch.tensor(slots)
        for i in range(len(seqs), len(self.seqs)):  # padding rows
            if self.seqs[i] is not None or self.lengths[i] != 1:
                self.index[i].fill_(self.scratch)
                self.seqs[i], self.blocks[i], self.lengths[i] = None, [], 1


class StaticDecodePlan:
    """The attention plan of a decode-only step: write each new key, attend over the index."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], buf: Buffers):
        self.keys, self.values, self.buf = keys, values, buf
        # The mask of the real entries, for the torch attention path (the kernel reads lengths).
        width = buf.index.shape[1]
        self.mask = torch.arange(width, device=buf.index.device) < buf.lengths[:, None]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.keys[layer], self.values[layer]
        write_kv(kc, vc, self.buf.write, k, v)
        return decode_attention(q, kc, vc, self.buf.index, self.mask, self.buf.lengths)


class DecodeGraphs:
    def __init__(
        self,
        model: LoadedModel,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        scratch_slot: int,
        max_batch: int,
        capture: bool,
    ) -> None:
        self.model, self.keys, self.values = model, keys, values
        self.scratch, self.capture = scratch_slot, capture
        self.max_batch = batch_bucket(max_batch)
        self.device = model.bagel.device
        self._graphs: dict[tuple[int, int], Bucket] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def graphs(self) -> int:
        return len(self._graphs)

    def accepts(self, batch_size: int) -> bool:
        return batch_size <= self.max_batch

    def run(
        self,
        ids: list[int] | torch.Tensor,
        positions: list[int],
        write_slots: list[int],
        seqs: list[KVSequence],
        block_size: int,
    ) -> torch.Tensor:
        """Logits `[len(ids), vocab]` (float32, on the device; a copy, not the graph's output
        buffer) of one decode token per request.

        `seqs[i]` is request i's context, its new token already reserved (last). `ids` on the
        device are read in stream order, after the work that draws them.
        """
        n = len(ids)
        b = batch_bucket(n)
        length = context_bucket(max(s.length for s in seqs))
        key = (b, length)
        if key not in self._graphs:
            cuda = self.device.type == "cuda"
            host = Buffers.zeros(b, length, torch.device("cpu"), pinned=cuda)
            device = Buffers.zeros(b, length, self.device)
            copied = torch.cuda.Event() if cuda else None
            rows = IndexRows(host.index, self.scratch)
            self._graphs[key] = Bucket(host, rows, device, None, copied)
        bucket = self._graphs[key]
        host, buf = bucket.host, bucket.device
        if bucket.copied is not None:  # the last copy from this host block must have been made
            bucket.copied.synchronize()
        # Host-side layout first, then one copy: the replay reads device memory only.
        pad = b - n
        fed = ids if isinstance(ids, torch.Tensor) else None
        # Padding rows see their own scratch key (length 1): no empty softmax.
        lengths = [s.length for s in seqs]
        fields = (
            ([0] * n if fed is not None else ids, 0),
            (positions, 0),
            (write_slots, self.scratch),
            (lengths, 1),
        )
        host.flat[: 4 * b] = torch.tensor([v for real, fill in fields for v in real + [fill] * pad])
        bucket.rows.update(seqs, block_size)
        buf.flat.copy_(host.flat, non_blocking=True)
        if bucket.copied is not None:
            bucket.copied.record(torch.cuda.current_stream(self.device))
        if fed is not None:
            buf.ids[:n].copy_(fed)
        if bucket.replay is None:  # first use of a bucket: capture it now, on these buffers
            bucket.replay = self._record(buf)
        return bucket.replay()[:n].clone()

    def _forward(self, buf: Buffers) -> torch.Tensor:
        bagel = self.model.bagel
        x = bagel.embed_text(buf.ids)
        plan = StaticDecodePlan(self.keys, self.values, buf)
        hidden = bagel(x, buf.positions, None, plan, routes=ExpertRoutes(None, None, UND))
        return bagel.logits(hidden)

    def _record(self, buf: Buffers) -> Replay:
        """The bucket's replay function: a captured graph on CUDA, the eager forward elsewhere."""
        if not self.capture:
            return lambda: self._forward(buf)
        # Warm up on a side stream (lazy kernel and workspace set-up must not be captured); the
        # warm-up writes the same keys the replay writes, so it changes nothing.
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            self._forward(buf)
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the image worker threads keep launching their own work meanwhile.
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self._forward(buf)
        except RuntimeError as e:
            log.warning("decode graph capture failed, running decode steps eagerly: %s", e)
            self.capture = False
            return lambda: self._forward(buf)

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay
