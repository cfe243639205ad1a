"""Executes one engine step: packs the chosen work of many requests into one model forward.

Owns the physical KV cache (per layer `[slots, kv_heads, head_dim]` for keys and values, slot =
block * block_size + offset, as `block_pool.py` hands them out). For each step it
1. turns every scheduled item into rows (text tokens, image blocks, one row group per guidance
   branch of a denoising step) and one attention segment per row group, reserving KV slots for
   the segments that write (copy-on-write copies happen first);
2. runs the model once over all rows: tokens are routed to their expert inside each layer, and
   attention runs per segment through `PagedPlan`, which writes the new keys into the cache and
   gathers each segment's context by slot;
3. hands each item its result (logits of a decode row, velocities of a denoising step).
VAE encodes/decodes and the ViT encoder run per item, outside the shared forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from irg_engine.attention import segment_attention
from irg_engine.attention.decode import decode_attention
from irg_engine.block_pool import BlockPool, KVSequence
from irg_engine.decode_graph import DecodeGraphs
from irg_engine.model.bagel import LoadedModel
from irg_engine.recipes.context import decode_latents, encode_latent
from irg_engine.recipes.work import DecodeStep, PrefillLatent, PrefillText, PrefillVit, Velocity


def auto_kv_tokens(model: LoadedModel) -> int:
    """KV capacity: 40% of free GPU memory on CUDA, 256 MB worth on the CPU."""
    lm = model.cfg.lm
    per_token = 2 * lm.num_layers * lm.num_kv_heads * lm.head_dim * model.bagel.dtype.itemsize
    if model.bagel.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(model.bagel.device)
        budget = int(free * 0.4)
    else:
        budget = 256 * 2**20
    return max(16 * 1024, budget // per_token)


@dataclass(slots=True)
class Segment:
    start: int
    end: int
    causal: bool
    ctx_slots: torch.Tensor  # slots of the context tokens before this segment
    own_slots: torch.Tensor | None  # where this segment's keys are written (None: not written)


class PagedPlan:
    """The attention plan of one packed forward over the paged cache.

    Decode rows (one causal query each) are gathered into one padded batch and attended with a
    single SDPA call per layer; every other segment is attended on its own.
    """

    def __init__(self, runner: Runner, segments: list[Segment]) -> None:
        self.runner = runner
        dev = runner.device
        written = [s for s in segments if s.own_slots is not None]
        self.write_rows = (
            torch.cat([torch.arange(s.start, s.end) for s in written]).to(dev) if written else None
        )
        self.write_slots = torch.cat([s.own_slots for s in written]) if written else None
        self.full_slots = {id(s): torch.cat([s.ctx_slots, s.own_slots]) for s in written}
        decodes = [
            s for s in segments if s.causal and s.end - s.start == 1 and s.own_slots is not None
        ]
        self.others = [s for s in segments if not any(s is d for d in decodes)]
        self.decode_rows = None
        if len(decodes) > 1:
            slots = [self.full_slots[id(s)] for s in decodes]
            longest = max(len(x) for x in slots)
            self.decode_rows = torch.tensor([s.start for s in decodes], device=dev)
            self.decode_index = torch.zeros(len(decodes), longest, dtype=torch.long, device=dev)
            self.decode_mask = torch.zeros(len(decodes), longest, dtype=torch.bool, device=dev)
            for i, x in enumerate(slots):
                self.decode_index[i, : len(x)] = x
                self.decode_mask[i, : len(x)] = True
        else:
            self.others = segments

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.runner.keys[layer], self.runner.values[layer]
        if self.write_rows is not None:
            kc.index_copy_(0, self.write_slots, k.index_select(0, self.write_rows).to(kc.dtype))
            vc.index_copy_(0, self.write_slots, v.index_select(0, self.write_rows).to(vc.dtype))
        out = torch.empty_like(q)
        if self.decode_rows is not None:
            out[self.decode_rows] = decode_attention(
                q.index_select(0, self.decode_rows), kc, vc, self.decode_index, self.decode_mask
            )
        for s in self.others:
            if s.own_slots is not None:
                slots = self.full_slots[id(s)]
                ks, vs = kc.index_select(0, slots), vc.index_select(0, slots)
            else:
                ks = torch.cat([kc.index_select(0, s.ctx_slots), k[s.start : s.end].to(kc.dtype)])
                vs = torch.cat([vc.index_select(0, s.ctx_slots), v[s.start : s.end].to(vc.dtype)])
            out[s.start : s.end] = segment_attention(
                q[s.start : s.end], ks.to(q.dtype), vs.to(q.dtype), s.causal, self.runner.backend
            )
        return out


@dataclass(slots=True)
class Scheduled:
    """One item of one request in this step; `tokens` < item tokens only for a prefill chunk."""

    item: Any
    tokens: int
    result: Any = None


class Runner:
    def __init__(
        self,
        model: LoadedModel,
        pool: BlockPool,
        backend: str = "sdpa",
        decode_graphs: str = "auto",
        max_batch: int = 64,
    ) -> None:
        self.model, self.pool, self.backend = model, pool, backend
        lm = model.cfg.lm
        slots = pool.num_blocks * pool.block_size
        dev, dt = model.bagel.device, model.bagel.dtype
        self.device = dev
        # One slot past the pool's: the scratch slot that padding rows of decode graphs write.
        self.keys = [
            torch.zeros(slots + 1, lm.num_kv_heads, lm.head_dim, device=dev, dtype=dt)
            for _ in range(lm.num_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        cuda = dev.type == "cuda"
        self.graphs = None
        if decode_graphs == "static" or (decode_graphs == "auto" and cuda):
            capture = cuda and decode_graphs == "auto"
            self.graphs = DecodeGraphs(model, self.keys, self.values, slots, max_batch, capture)

    # -- work outside the shared forward ------------------------------------------------------
    @torch.no_grad()
    def encode_latent(self, image) -> torch.Tensor:
        return encode_latent(self.model, image)

    @torch.no_grad()
    def decode_latents(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return decode_latents(self.model, x, grid)

    def read_kv(self, seq: KVSequence) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        slots = self._context_slots(seq)
        return (
            [k.index_select(0, slots).float().cpu() for k in self.keys],
            [v.index_select(0, slots).float().cpu() for v in self.values],
        )

    # -- the shared forward -------------------------------------------------------------------
    def _reserve(self, seq: KVSequence, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(context slots before, slots of the n new tokens), both on the host."""
        ctx = self._host_slots(seq)
        reserved = seq.append(self.pool, n)
        bs = self.pool.block_size
        for src, dst in reserved.copies:
            for cache in (*self.keys, *self.values):
                cache[dst * bs : (dst + 1) * bs] = cache[src * bs : (src + 1) * bs]
        return ctx, torch.tensor(reserved.slots, dtype=torch.long)

    def _host_slots(self, seq: KVSequence) -> torch.Tensor:
        bs = self.pool.block_size
        blocks = torch.tensor(seq.blocks, dtype=torch.long)
        return (blocks[:, None] * bs + torch.arange(bs)).flatten()[: seq.length]

    def _context_slots(self, seq: KVSequence) -> torch.Tensor:
        return self._host_slots(seq).to(self.device)

    def _decode_only(self, batch: list[Scheduled]) -> None:
        """The decode tokens of a step, through the static buffers of `DecodeGraphs`."""
        ids, positions, writes, contexts = [], [], [], []
        for sch in batch:
            seq = sch.item.ctx
            ctx, own = self._reserve(seq, 1)
            ids.append(sch.item.token)
            positions.append(seq.rope)
            writes.append(int(own[0]))
            contexts.append(torch.cat([ctx, own]))
            seq.rope += 1
        for sch, row in zip(batch, self.graphs.run(ids, positions, writes, contexts), strict=True):
            sch.result = row

    @torch.no_grad()
    def step(self, batch: list[Scheduled]) -> None:
        """Run the batch and store each item's result on it.

        With decode graphs, the decode tokens run through them (replayed, not launched kernel by
        kernel) and everything else in one packed forward; otherwise all of it is one forward.
        """
        if self.graphs is not None:
            decodes = [sch for sch in batch if isinstance(sch.item, DecodeStep)]
            if decodes and self.graphs.accepts(len(decodes)):
                self._decode_only(decodes)
                batch = [sch for sch in batch if not isinstance(sch.item, DecodeStep)]
                if not batch:
                    return
        bagel, tok = self.model.bagel, self.model.tokenizer
        dev = self.device
        markers = (tok.vision_start, tok.vision_end)
        rows: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        gen: list[torch.Tensor] = []
        segments: list[Segment] = []
        outputs: list[tuple[Scheduled, list[tuple[int, int]]]] = []
        n = 0

        def add(x, pos, is_gen, causal, ctx_slots, own_slots) -> tuple[int, int]:
            nonlocal n
            rows.append(x)
            positions.append(pos)
            gen.append(is_gen)
            segments.append(Segment(n, n + x.shape[0], causal, ctx_slots, own_slots))
            n += x.shape[0]
            return n - x.shape[0], n

        for sch in batch:
            item = sch.item
            spans = []
            if isinstance(item, (PrefillText, DecodeStep)):
                ids = item.ids[: sch.tokens] if isinstance(item, PrefillText) else [item.token]
                seq = item.ctx
                pos = torch.arange(seq.rope, seq.rope + len(ids), device=dev)
                ctx, own = (t.to(dev) for t in self._reserve(seq, len(ids)))
                x = bagel.embed_text(torch.tensor(ids, dtype=torch.long, device=dev))
                spans.append(
                    add(x, pos, torch.zeros(len(ids), dtype=torch.bool, device=dev), True, ctx, own)
                )
                seq.rope += len(ids)
            elif isinstance(item, (PrefillLatent, PrefillVit)):
                seq = item.ctx
                if isinstance(item, PrefillLatent):
                    inner = bagel.context_latent_rows(item.latent)
                else:
                    inner = bagel.embed_vit(item.patches.to(dev), item.ids.to(dev))
                x, pos, mask = bagel.image_block(
                    inner, isinstance(item, PrefillLatent), markers, seq.rope
                )
                ctx, own = (t.to(dev) for t in self._reserve(seq, x.shape[0]))
                add(x, pos, mask, False, ctx, own)
                seq.rope += 1
            elif isinstance(item, Velocity):
                inner = bagel.latent_rows(item.x, item.t, item.grid)
                for seq in item.contexts:
                    x, pos, mask = bagel.image_block(inner, True, markers, seq.rope)
                    spans.append(add(x, pos, mask, False, self._context_slots(seq), None))
            outputs.append((sch, spans))
        hidden = bagel(
            torch.cat(rows), torch.cat(positions), torch.cat(gen), PagedPlan(self, segments)
        )
        decode_rows = [
            spans[0][1] - 1 for sch, spans in outputs if isinstance(sch.item, DecodeStep)
        ]
        if decode_rows:  # one lm_head pass for every decode row: the vocabulary matrix is read once
            logits = bagel.logits(hidden[decode_rows]).cpu()
            rows_iter = iter(logits)
        for sch, spans in outputs:
            if isinstance(sch.item, DecodeStep):
                sch.result = next(rows_iter)
            elif isinstance(sch.item, Velocity):
                sch.result = [bagel.velocity(hidden[a + 1 : b - 1]).cpu() for a, b in spans]
