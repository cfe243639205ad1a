"""Forms each engine step from the pending work of every running request (no torch).

Input: one `Pending` per request that waits for the model (what kind of work, how many tokens,
how many KV blocks it would take, when it arrived). Output: a `StepPlan` naming which requests
run and how many tokens of their item. When nothing fits in the free KV blocks the engine asks
`victim` which request to preempt.

Policy, in order, under a token budget and the free KV blocks:
1. decode tokens of every request that is thinking or reflecting (one token each: cheap, and what
   a user waits on);
2. denoising evaluations (all guidance rows of one request's step at once);
3. prefills and image blocks in arrival order, a text prefill cut to the remaining budget and to
   what the free KV blocks hold. First come, first served: once one waits for KV blocks, the
   younger ones wait too, so a big image block is not starved by a stream of small prompts.
The first denoising evaluation and the first prefill or image block run even over the budget (a
first text prefill gets at least `PREFILL_FLOOR` tokens, or the whole budget where that is
smaller): a big image's step can exceed the budget on its own, and neither kind may starve
behind the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from irg_engine.block_pool import blocks_for

KINDS = ("decode", "denoise", "prefill", "block")  # block: an image block (cannot be cut)
ORDER = {"decode": 0, "denoise": 1, "prefill": 2, "block": 2}
# Text prefill tokens that run in a step whose budget other work has taken.
PREFILL_FLOOR = 256


@dataclass(slots=True)
class Pending:
    request_id: str
    kind: str
    tokens: int
    blocks: int  # KV blocks the whole item would take
    arrival: int  # lower = older
    holds_blocks: int = 0  # blocks this request's contexts hold
    frees_blocks: int = 0  # of those, the ones no one else holds (a preemption frees them)
    room: int = 0  # free slots in the blocks its context already holds
    copy: int = 0  # 1 where its next append copies a shared last block first

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.tokens <= 0:
            raise ValueError("pending work must have at least one token")


@dataclass(slots=True)
class StepPlan:
    run: list[tuple[str, int]] = field(default_factory=list)  # (request id, tokens to run)


class Scheduler:
    def __init__(self, token_budget: int, block_size: int) -> None:
        if token_budget <= 0:
            raise ValueError("token_budget must be positive")
        self.token_budget, self.block_size = token_budget, block_size

    def plan(self, pending: list[Pending], free_blocks: int) -> StepPlan:
        plan = StepPlan()
        budget = self.token_budget
        first = {"denoise": True, "prefill": True}  # the kinds whose first item always runs
        kv_wait = False  # an older prefill or block waits for KV blocks: younger ones wait too
        for item in sorted(pending, key=lambda p: (ORDER[p.kind], p.arrival)):
            group = "prefill" if item.kind == "block" else item.kind
            if group == "prefill" and kv_wait:
                continue
            take, blocks = item.tokens, item.blocks
            if item.kind == "prefill":
                if take > budget:  # a chunk: what the budget leaves, at least a floor if first
                    floor = min(PREFILL_FLOOR, self.token_budget) * first["prefill"]
                    take = min(take, max(budget, floor))
                    if take <= 0:
                        continue
                if take < item.tokens or blocks > free_blocks:  # as much as the free blocks hold
                    take = min(take, item.room + (free_blocks - item.copy) * self.block_size)
                    blocks = item.copy + blocks_for(max(0, take - item.room), self.block_size)
            elif take > budget and not first.get(group, not plan.run):
                continue
            if take <= 0 or blocks > free_blocks:
                kv_wait = kv_wait or group == "prefill"
                continue
            plan.run.append((item.request_id, take))
            budget -= take
            free_blocks -= blocks
            first[group] = False
        return plan

    @staticmethod
    def victim(pending: list[Pending]) -> str | None:
        """Nothing fits: the request to preempt (it is recomputed later), or None.

        Room is made for the oldest request, so the victim is younger than it: the youngest
        whose preemption frees blocks, or where none's does (all they hold is shared), the
        youngest holder, whose leaving makes shared blocks others' alone. An older victim would
        take its blocks back at once, being first in line."""
        oldest = min(p.arrival for p in pending)
        younger = [p for p in pending if p.arrival > oldest]
        candidates = [p for p in younger if p.frees_blocks > 0] or [
            p for p in younger if p.holds_blocks > 0
        ]
        if not candidates:
            return None
        return max(candidates, key=lambda p: p.arrival).request_id
