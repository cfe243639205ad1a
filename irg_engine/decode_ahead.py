"""Decode steps run ahead: the next decode step of every request that will surely decode again,
launched before the engine hands this step's tokens to the programs.

Between two graphed decode steps the host delivers the tokens (programs, streamed text, events),
schedules the next step and fills its buffers; on a GPU that left the device idle for ~1.2 ms of
a 7.25 ms step at 32 requests (BENCHMARKS.md). A `DecodeStep` states its program's stopping
rule, so once a step's tokens are drawn the runner knows which requests will feed them next:
`launch` reserves each one's next KV slot (held back, not counted: programs still see their
context as it is), replays the decode graph on those tokens and draws the next tokens on the
device, all without waiting. The host's work for this step then overlaps the next step's kernels.

At the next step `claim` matches the rows with that step's decode items (same context, same
token, same sampling, nothing appended meanwhile) and waits for them; every other row is rolled
back: its held slot goes back to the pool and its generator to the state before the draw. So a
request aborted, preempted or not scheduled meanwhile leaves no trace, and each request's random
stream stays the one the reference recipes draw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from irg_engine.block_pool import BlockPool, KVSequence, OutOfBlocks
from irg_engine.recipes.work import Decoded, DecodeStep
from irg_engine.sampler import draw_rows

if TYPE_CHECKING:
    from irg_engine.runner import Runner, Scheduled

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AheadRow:
    """One request's step run ahead: the token fed, how it was to be drawn, where its key went."""

    seq: KVSequence
    token: int
    temperature: float
    generator: torch.Generator | None
    length: int  # the context's length, the new token not counted
    slot: int
    generator_state: torch.Tensor | None  # before this row's draw (None: greedy, no draw)

    def foresaw(self, item: DecodeStep, pool: BlockPool) -> bool:
        """`item` is the step this row ran, and its token still goes to the held slot."""
        return (
            item.ctx is self.seq
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


class DecodeAhead:
    def __init__(self, runner: Runner, enabled: bool) -> None:
        self.runner, self.enabled = runner, enabled
        self.pending: Ahead | None = None
        self.claimed: list[AheadRow] = []  # this step's, until the next claim
        self.used = self.rolled_back = 0  # rows, for tests and benchmarks

    def claim(self, decodes: list[Scheduled]) -> None:
        """Give each of this step's decode items that was run ahead its result; roll back the
        other rows. Items left without a result run as usual."""
        ahead, self.pending = self.pending, None
        self.claimed = []
        if ahead is None:
            return
        # Waits for the launch: after it, the host blocks it copied from may be written again.
        tokens = ahead.tokens.tolist()
        index = {id(row.seq): i for i, row in enumerate(ahead.rows)}
        pool = self.runner.pool
        matched = {}
        for sch in decodes:
            i = index.get(id(sch.item.ctx))
            if i is not None and ahead.rows[i].foresaw(sch.item, pool):
                matched[i] = sch
        for i, row in enumerate(ahead.rows):
            if i not in matched:
                self._roll_back(row)
        for i, sch in matched.items():
            self.runner.reserve(sch.item.ctx, 1)  # counted now: lands on the held slot
            sch.item.ctx.rope += 1
            sch.result = Decoded(tokens[i], ahead.logits[i])
            self.claimed.append(ahead.rows[i])
        self.used += len(matched)
        self.rolled_back += len(ahead.rows) - len(matched)

    def step_failed(self) -> None:
        """The step that claimed rows raised: the engine puts the contexts back and runs the
        items again, so the claimed rows' generators go back to their states before the draw."""
        for row in self.claimed:
            if row.generator_state is not None:
                row.generator.set_state(row.generator_state)
        self.claimed = []

    def launch(self, decoded: list[Scheduled]) -> None:
        """After a step: start the next one for the rows whose programs will feed their token."""
        if not self.enabled:
            return
        runner = self.runner
        going = [s for s in decoded if s.item.continues(s.result.token)]
        if not going or not runner.graphs.accepts(len(going)):
            return
        rows: list[AheadRow] = []
        try:
            for sch in going:
                item, seq = sch.item, sch.item.ctx
                length = seq.length
                slot = runner.reserve(seq, 1)[0]
                rows.append(
                    AheadRow(
                        seq, sch.result.token, item.temperature, item.generator, length, slot, None
                    )
                )
            logits = runner.graphs.run(
                [r.token for r in rows],
                [r.seq.rope for r in rows],
                [r.slot for r in rows],
                [r.seq for r in rows],
                runner.pool.block_size,
            )
            # Saved while the GPU runs the graph, before the draw: only sampled rows draw.
            for row in rows:
                if row.temperature > 0 and row.generator is not None:
                    row.generator_state = row.generator.get_state()
            tokens = draw_rows(logits, [r.temperature for r in rows], [r.generator for r in rows])
        except OutOfBlocks:  # no room to run ahead: the next step runs as usual
            self._undo(rows)
            return
        except Exception as error:  # a launch failure: decode steps run one at a time from now
            self._undo(rows)
            self.enabled = False
            log.warning("decode-ahead failed, running decode steps without it: %s", error)
            return
        for row in rows:
            row.seq.hold_back(1)
        self.pending = Ahead(rows, logits, tokens)

    def _undo(self, rows: list[AheadRow]) -> None:
        for row in rows:
            row.seq.hold_back(1)
            self._roll_back(row)

    def _roll_back(self, row: AheadRow) -> None:
        row.seq.trim(self.runner.pool)
        if row.generator_state is not None:
            row.generator.set_state(row.generator_state)
