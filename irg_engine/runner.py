"""Executes one engine step: packs the chosen work of many requests into one model forward.

Owns the physical KV cache (per layer `[slots, kv_heads, head_dim]` for keys and values, slot =
block * block_size + offset, as `block_pool.py` hands them out). For each step it
1. turns every scheduled item into rows and one attention segment per row group, reserving KV
   slots for the segments that write (copy-on-write copies happen first). Rows go in a fixed
   order: decode tokens, prefill text (all text embedded in one call), ViT blocks, VAE blocks,
   then one row group per guidance branch of each denoising step;
2. runs the model once over all rows: tokens are routed to their expert inside each layer, and
   attention runs through `PagedPlan` (`paged_plan.py`), which writes the new keys into the
   cache and gathers each segment's context by slot;
3. hands each item its result: for the decode rows their logits and next tokens, all sampled
   in one call on the device (`sampler.py`), for a denoising step its velocities.
With decode graphs the decode rows run through `DecodeGraphs` instead, and the next decode step
of the requests that will take it is launched ahead, before this step's tokens are read where
they were run ahead themselves (`decode_ahead.py`). VAE encodes/decodes and the ViT encoder run
per item, outside the shared forward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from irg_engine import packed_head
from irg_engine.block_pool import BlockPool, KVSequence
from irg_engine.decode_ahead import DecodeAhead
from irg_engine.decode_graph import DecodeGraphs
from irg_engine.host_memory import upload
from irg_engine.model.bagel import LoadedModel
from irg_engine.model.lm import UND, ExpertRoutes
from irg_engine.paged_plan import PagedPlan, Segment, sequence_slots
from irg_engine.recipes.context import decode_latents, encode_latent
from irg_engine.recipes.work import (
    Decoded,
    DecodeStep,
    PrefillLatent,
    PrefillText,
    PrefillVit,
    Velocity,
)
from irg_engine.sampler import draw_rows


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
        decode_ahead: bool = True,
    ) -> None:
        self.model, self.pool, self.backend = model, pool, backend
        lm = model.cfg.lm
        slots = pool.num_blocks * pool.block_size
        dev, dt = model.bagel.device, model.bagel.dtype
        self.device = dev
        # One slot past the pool's: the scratch slot that padding rows of decode graphs write and
        # padded decode contexts read (a pool slot there may hold a failed request's NaN).
        self.scratch = slots
        self.keys = [
            torch.zeros(slots + 1, lm.num_kv_heads, lm.head_dim, device=dev, dtype=dt)
            for _ in range(lm.num_layers)
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        head = model.bagel.lm.lm_head.weight
        self.head = packed_head.PackedHead(head, max_batch) if packed_head.available(head) else None
        cuda = dev.type == "cuda"
        self.graphs = None
        if decode_graphs == "static" or (decode_graphs == "auto" and cuda):
            capture = cuda and decode_graphs == "auto"
            self.graphs = DecodeGraphs(
                model, self.keys, self.values, self.scratch, max_batch, capture
            )
        self.ahead = DecodeAhead(self, decode_ahead and self.graphs is not None)
        # Generators drawn from in the current step, with their states before the draw.
        self._drawn: list[tuple[torch.Generator, torch.Tensor]] = []

    # -- work outside the shared forward ------------------------------------------------------
    @torch.no_grad()
    def encode_latent(self, image) -> torch.Tensor:
        return encode_latent(self.model, image)

    @torch.no_grad()
    def decode_latents(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return decode_latents(self.model, x, grid)

    def read_kv(self, seq: KVSequence) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        slots = sequence_slots(seq, self.pool.block_size).to(self.device)
        return (
            [k.index_select(0, slots).float().cpu() for k in self.keys],
            [v.index_select(0, slots).float().cpu() for v in self.values],
        )

    # -- the shared forward -------------------------------------------------------------------
    def reserve(self, seq: KVSequence, n: int) -> list[int]:
        """Slots for n new tokens of seq (its shared last block copied first where needed)."""
        reserved = seq.append(self.pool, n)
        bs = self.pool.block_size
        for src, dst in reserved.copies:
            for cache in (*self.keys, *self.values):
                cache[dst * bs : (dst + 1) * bs] = cache[src * bs : (src + 1) * bs]
        return reserved.slots

    def _routes(self, latent_rows: list[tuple[int, int]], n: int) -> ExpertRoutes:
        """Each expert's rows, from the step's layout on the host: no device sync per step.

        The latent blocks come last, so from the first one's opening marker on every row is a
        latent or a marker: the generation expert takes that tail as a slice (`gen_from`).
        """
        if not latent_rows:
            return ExpertRoutes(None, None, UND)
        latent = torch.zeros(n, dtype=torch.bool)
        for start, end in latent_rows:
            latent[start:end] = True
        und = torch.nonzero(~latent).squeeze(1)
        return ExpertRoutes(upload(und, self.device), None, gen_from=latent_rows[0][0] - 1)

    def blocks_to_write(self, batch: list[Scheduled]) -> int:
        """KV blocks the items' reservations will take (at most: each counts the copy of a shared
        last block, which only the first of several sharers makes)."""
        pool = self.pool
        return sum(
            s.item.ctx.blocks_needed(pool, s.tokens)
            for s in batch
            if not isinstance(s.item, Velocity)
        )

    def _decode_only(
        self, batch: list[Scheduled], others: list[Scheduled]
    ) -> tuple[list[Scheduled], torch.Tensor | None]:
        """The decode tokens of a step, through the static buffers of `DecodeGraphs` (the rows
        run ahead only collect their results; `others`, the step's other items, keep the blocks
        they will write). Returns the items that ran in turn and their tokens on the device."""
        self.ahead.claim(batch, others)
        batch = [sch for sch in batch if sch.result is None]
        if not batch:
            return [], None
        ids, positions, writes = [], [], []
        for sch in batch:
            seq = sch.item.ctx
            writes += self.reserve(seq, 1)
            ids.append(sch.item.token)
            positions.append(seq.rope)
            seq.rope += 1
        seqs = [sch.item.ctx for sch in batch]
        logits = self.graphs.run(ids, positions, writes, seqs, self.pool.block_size)
        return batch, self._decoded(batch, logits)

    def step(self, batch: list[Scheduled]) -> None:
        """Run the batch and store each item's result on it (see `_step`)."""
        # The model's GPU made current: graph capture, events and streams taken without a
        # device name go to the current one, which on `cuda:N` is not the model's by itself.
        cuda = self.device.type == "cuda"
        with torch.cuda.device(self.device) if cuda else contextlib.nullcontext():
            self._step(batch)

    @torch.no_grad()
    def _step(self, batch: list[Scheduled]) -> None:
        """Run the batch and store each item's result on it.

        With decode graphs, the decode tokens run through them (replayed, not launched kernel by
        kernel) and everything else in one packed forward; otherwise all of it is one forward.
        Graphed decode rows run ahead (`decode_ahead.py`): rows claimed from the last step
        launch the next before this one waits for them, and rows that ran in turn launch theirs
        at the end. A step that raises leaves every generator it drew from as it found it, since
        the engine runs the items again (see `Engine._run_batch`).
        """
        for sch in batch:  # a retried item starts afresh
            sch.result = None
        self._drawn = []
        decodes = [sch for sch in batch if isinstance(sch.item, DecodeStep)]
        graphed = self.graphs is not None and bool(decodes) and self.graphs.accepts(len(decodes))
        in_turn, tokens = [], None
        try:
            if graphed:
                batch = [sch for sch in batch if not isinstance(sch.item, DecodeStep)]
                in_turn, tokens = self._decode_only(decodes, batch)
            else:
                self.ahead.claim([])  # nothing here was foreseen: roll every row back
            if batch:
                self._packed(batch)
        except Exception:
            for generator, state in reversed(self._drawn):  # the earliest state wins
                generator.set_state(state)
            self.ahead.step_failed()
            raise
        if in_turn:
            self.ahead.launch(in_turn, tokens)

    def _decoded(self, batch: list[Scheduled], logits: torch.Tensor) -> torch.Tensor:
        """Each decode item's result: its logits row and its next token, all rows sampled at
        once on the logits' device (only the tokens come back to the host; they are returned
        as drawn, on the device). The generators' states before the draw are kept until the
        step is over."""
        self._drawn += [
            (s.item.generator, s.item.generator.get_state())
            for s in batch
            if s.item.temperature > 0 and s.item.generator is not None
        ]
        drawn = draw_rows(
            logits, [s.item.temperature for s in batch], [s.item.generator for s in batch]
        )
        for sch, token, row in zip(batch, drawn.tolist(), logits, strict=True):
            sch.result = Decoded(token, row)
        return drawn

    def _packed(self, batch: list[Scheduled]) -> None:
        """The batch as one packed forward."""
        bagel, tok, dev = self.model.bagel, self.model.tokenizer, self.device
        markers = (tok.vision_start, tok.vision_end)
        batch = sorted(batch, key=lambda sch: ROW_ORDER[type(sch.item)])
        segments: list[Segment] = []
        writes: list[int] = []
        ids: list[int] = []
        positions: list[int] = []
        for sch in batch:  # text first: one embedding call, positions from one list
            item = sch.item
            if isinstance(item, DecodeStep):
                new = [item.token]
            elif isinstance(item, PrefillText):
                new = item.ids[: sch.tokens]
            else:
                break
            seq = item.ctx
            writes += self.reserve(seq, len(new))
            segments.append(Segment(len(ids), len(ids) + len(new), True, seq, len(new)))
            positions.extend(range(seq.rope, seq.rope + len(new)))
            seq.rope += len(new)
            ids += new
        n = len(ids)
        rows, pos = [], []
        if ids:
            rows.append(bagel.embed_text(upload(torch.tensor(ids), dev)))
            pos.append(upload(torch.tensor(positions), dev))
        spans: dict[int, list[tuple[int, int]]] = {}
        latent_rows: list[tuple[int, int]] = []  # the generation expert's rows
        for sch in batch[len(segments) :]:
            item = sch.item
            if isinstance(item, Velocity):
                inner = bagel.latent_rows(item.x, item.t, item.grid)
                blocks = [(inner, True, seq, False) for seq in item.contexts]
            elif isinstance(item, PrefillLatent):
                blocks = [(bagel.context_latent_rows(item.latent), True, item.ctx, True)]
            else:
                inner = bagel.embed_vit(upload(item.patches, dev), upload(item.ids, dev))
                blocks = [(inner, False, item.ctx, True)]
            for inner, latent, seq, keep in blocks:
                x, p, _ = bagel.image_block(inner, latent, markers, seq.rope)
                size = x.shape[0]
                if latent:  # between the markers
                    latent_rows.append((n + 1, n + size - 1))
                if keep:  # a context image block: all its rows sit at one RoPE position
                    writes += self.reserve(seq, size)
                    seq.rope += 1
                segments.append(Segment(n, n + size, False, seq, size if keep else 0))
                spans.setdefault(id(sch), []).append((n, n + size))
                rows.append(x)
                pos.append(p)
                n += size
        plan = PagedPlan(self, segments, writes)
        x, p = (torch.cat(t) if len(t) > 1 else t[0] for t in (rows, pos))
        hidden = bagel(x, p, None, plan, routes=self._routes(latent_rows, n))
        decodes = [sch for sch in batch if isinstance(sch.item, DecodeStep)]
        if decodes:  # one lm_head pass for every decode row: the vocabulary matrix is read once
            rows = hidden[: len(decodes)]
            logits = self.head(rows) if self.head is not None else bagel.logits(rows)
            self._decoded(decodes, logits)
        for sch in batch:
            if isinstance(sch.item, Velocity):  # the latent rows, between the two markers
                spans_ = spans[id(sch)]
                # Left on the device: the step ends without waiting for the forward, and the
                # programs' flow math queues behind it.
                sch.result = [bagel.velocity(hidden[a + 1 : b - 1]) for a, b in spans_]


# Packed row order (see the module docstring); PagedPlan relies on written rows coming first.
# Latent blocks last: `_routes` gives the generation expert the rows from the first one on.
ROW_ORDER = {DecodeStep: 0, PrefillText: 1, PrefillVit: 2, PrefillLatent: 3, Velocity: 4}
