"""Decode steps run ahead: the next decode step of every request that will decode again,
launched before the host has read this step's tokens.

Between two graphed decode steps the host claims the rows, reserves slots, fills the buffers,
delivers the tokens (programs, streamed text, events) and schedules the next step; on a GPU
that left the device idle for ~1.2-1.5 ms of a 7 ms step at 32 requests (BENCHMARKS.md). A
`DecodeStep` states its program's stopping rule, so the runner knows which requests feed the
token they draw next: every one but those at their `last` step, unless the token drawn is the
stop token.

So a step that claims rows run ahead first launches the step after it, fed on the device from
the tokens of the rows it claims (not yet read back), and only then waits for those tokens: the
GPU runs the next step while the host does everything else. `_launch` reserves each row's next
KV slot (held back, not counted: programs still see their context as it is), replays the decode
graph and draws the next tokens on the device, all without waiting; it also queues the copy of
those tokens to the host right behind their draw, with an event after it, so that reading them
waits for nothing queued later (a plain `.tolist()` at the next step would wait for the step
launched in between). A step whose decode rows ran in turn (nothing ahead matched them) launches
theirs at its end, from tokens it has read.

At the next step `claim` matches the rows with that step's decode items (same context, same
token, same sampling, nothing appended meanwhile); every other row is rolled back: its held
slot goes back to the pool and its generator to the state before the draw. So a request that
drew its stop token, or was aborted, preempted or not scheduled meanwhile, leaves no trace, and
each request's random stream stays the one the reference recipes draw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from irg_engine.block_pool import BlockPool, KVSequence, OutOfBlocks
from irg_engine.host_memory import upload
from irg_engine.recipes.work import Decoded, DecodeStep
from irg_engine.sampler import draw_rows

if TYPE_CHECKING:
    from irg_engine.runner import Runner, Scheduled

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AheadRow:
    """One request's step run ahead: the token fed, how it was to be drawn, where its key went."""

    seq: KVSequence
    token: int | None  # None until the host has read the token it was fed on the device
    temperature: float
    generator: torch.Generator | None
    length: int  # the context's length, the new token not counted
    slot: int
    generator_state: torch.Tensor | None  # before this row's draw (None: greedy, no draw)
    live: bool = True  # False once rolled back: its slot and random stream are given back

    def foresaw(self, item: DecodeStep, pool: BlockPool) -> bool:
        """`item` is the step this row ran, and its token still goes to the held slot."""
        return (
            self.live
            and item.ctx is self.seq
            and item.token == self.token
            and item.temperature == self.temperature
            and item.generator is self.generator
            and not self.seq.freed
            and self.seq.length == self.length
            and self.seq.next_slot(pool) == self.slot
        )


@dataclass(slots=True)
class Ahead:
    rows: list[AheadRow]
    logits: torch.Tensor  # [rows, vocab], on the device
    tokens: torch.Tensor  # [rows], on the device
    host: torch.Tensor  # the tokens' copy on the host, made once they are drawn
    ready: torch.cuda.Event | None  # recorded after that copy (None off CUDA: no wait needed)

    def read(self) -> list[int]:
        """The tokens, as soon as they are drawn; not after the work queued since."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


class DecodeAhead:
    def __init__(self, runner: Runner, enabled: bool) -> None:
        self.runner, self.enabled = runner, enabled
        self.pending: list[Ahead] = []  # launched, not yet claimed
        self.claimed: list[AheadRow] = []  # this step's, until the next claim
        self.used = self.rolled_back = 0  # rows, for tests and benchmarks

    def claim(self, decodes: list[Scheduled], others: list[Scheduled] = ()) -> None:
        """Give each of this step's decode items that was run ahead its result, after launching
        the step after it for those that go on; roll back the other rows. Items left without a
        result run as usual, and so do `others`, the step's other items: the launch leaves the
        blocks they will write free (the scheduler counted those, not the launch's)."""
        groups, self.pending = self.pending, []
        self.claimed = []
        if not groups:
            return
        rows = [row for g in groups for row in g.rows]
        index = {id(row.seq): i for i, row in enumerate(rows)}
        pool = self.runner.pool
        matched: dict[int, Scheduled] = {}
        for sch in decodes:
            i = index.get(id(sch.item.ctx))
            if i is not None and rows[i].foresaw(sch.item, pool):
                matched[i] = sch
        for i, row in enumerate(rows):
            if i not in matched:
                self._roll_back(row)
        for i, sch in matched.items():
            self.runner.reserve(sch.item.ctx, 1)  # counted now: lands on the held slot
            sch.item.ctx.rope += 1
            self.claimed.append(rows[i])
        tokens = torch.cat([g.tokens for g in groups]) if len(groups) > 1 else groups[0].tokens
        logits = [row for g in groups for row in g.logits]  # views, no copy
        going = [i for i, sch in matched.items() if not sch.item.last]
        claimed = {id(sch) for sch in matched.values()}
        in_turn = [sch for sch in decodes if id(sch) not in claimed]
        keep = self.runner.blocks_to_write([*in_turn, *others])
        launched = self._launch([matched[i].item for i in going], tokens, going, keep)
        # Waits for this step's tokens only, copied back as they were drawn: a copy queued now
        # would wait for the step launched above as well.
        host = [t for g in groups for t in g.read()]
        for i, sch in matched.items():
            sch.result = Decoded(host[i], logits[i])
        for row, i in zip(launched, going, strict=False):  # launched: all of them or none
            row.token = host[i]
            # A row fed the stop token is given back now: its program ends with this step and
            # may draw from its generator before the next claim.
            if not matched[i].item.continues(row.token):
                self._roll_back(row)
        self.used += len(matched)

    def step_failed(self) -> None:
        """The step that claimed rows raised: the engine puts the contexts back and runs the
        items again, so the step launched from them is rolled back and the claimed rows'
        generators go back to their states before the draw (the earliest state last)."""
        for group in self.pending:
            for row in group.rows:
                self._roll_back(row)
        self.pending = []
        for row in self.claimed:
            if row.generator_state is not None:
                row.generator.set_state(row.generator_state)
        self.claimed = []

    def launch(self, decoded: list[Scheduled], tokens: torch.Tensor) -> None:
        """After a step whose decode rows ran in turn (their tokens drawn on the device as
        `tokens`, already read): start the next one for the rows whose programs feed theirs."""
        going = [i for i, s in enumerate(decoded) if s.item.continues(s.result.token)]
        launched = self._launch([decoded[i].item for i in going], tokens, going)
        for row, i in zip(launched, going, strict=False):  # launched: all of them or none
            row.token = decoded[i].result.token

    def _launch(
        self, items: list[DecodeStep], tokens: torch.Tensor, fed: list[int], keep: int = 0
    ) -> list[AheadRow]:
        """Run the next decode step of each item's context, fed `tokens[fed]` (on the device),
        if that leaves `keep` blocks free."""
        runner = self.runner
        if not self.enabled or not items or not runner.graphs.accepts(len(items)):
            return []
        pool = runner.pool
        if sum(item.ctx.blocks_needed(pool, 1) for item in items) > pool.num_free - keep:
            return []  # no room to run ahead: the next step runs as usual
        if fed != list(range(len(tokens))):  # else all of them in order: no index copy
            # (uploaded: a blocking copy would wait for the step still running)
            tokens = tokens.index_select(0, upload(torch.tensor(fed), tokens.device))
        # A row that drew NO_TOKEN is rolled back once read; until then it must not index the
        # embedding (on a GPU an out-of-range id is a device-side assert, fatal to the context).
        tokens = tokens.clamp(min=0)
        rows: list[AheadRow] = []
        try:
            for item in items:
                seq = item.ctx
                length = seq.length
                slot = runner.reserve(seq, 1)[0]
                rows.append(
                    AheadRow(seq, None, item.temperature, item.generator, length, slot, None)
                )
            logits = runner.graphs.run(
                tokens,
                [r.seq.rope for r in rows],
                [r.slot for r in rows],
                [r.seq for r in rows],
                runner.pool.block_size,
            )
            # Saved while the GPU runs the graph, before the draw: only sampled rows draw.
            for row in rows:
                if row.temperature > 0 and row.generator is not None:
                    row.generator_state = row.generator.get_state()
            drawn = draw_rows(logits, [r.temperature for r in rows], [r.generator for r in rows])
        except OutOfBlocks:  # no room to run ahead: the next step runs as usual
            self._undo(rows)
            return []
        except Exception as error:  # a launch failure: decode steps run one at a time from now
            self._undo(rows)
            self.enabled = False
            log.warning("decode-ahead failed, running decode steps without it: %s", error)
            return []
        for row in rows:
            row.seq.hold_back(1)
        cuda = drawn.device.type == "cuda"
        host = torch.empty(len(rows), dtype=drawn.dtype, pin_memory=cuda)
        host.copy_(drawn, non_blocking=cuda)
        ready = torch.cuda.Event() if cuda else None
        if ready is not None:
            ready.record(torch.cuda.current_stream(drawn.device))
        self.pending.append(Ahead(rows, logits, drawn, host, ready))
        return rows

    def _undo(self, rows: list[AheadRow]) -> None:
        """Rows of a launch that did not happen."""
        for row in rows:
            row.seq.hold_back(1)
            row.live = False
            self._give_back(row)

    def _roll_back(self, row: AheadRow) -> None:
        if row.live:
            row.live = False
            self.rolled_back += 1
            self._give_back(row)

    def _give_back(self, row: AheadRow) -> None:
        row.seq.trim(self.runner.pool)
        if row.generator_state is not None:
            row.generator.set_state(row.generator_state)
