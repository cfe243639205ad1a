"""Forms each engine step from the pending work of every running request (no torch).

Input: one `Pending` per request that waits for the model (what kind of work, how many tokens,
how many KV blocks it would take, whether it may be cut into chunks, when it arrived). Output: a
`StepPlan` naming which requests run and how many tokens of their item, or which request to
preempt when nothing fits in the KV pool.

Policy, in order, under a token budget and the free KV blocks:
1. decode tokens of every request that is thinking or reflecting (one token each: cheap, and what
   a user waits on);
2. denoising evaluations (all guidance rows of one request's step at once; the first one always
   runs so a big image can never starve);
3. prefills in arrival order, the last one cut to the remaining budget if it is text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("decode", "denoise", "prefill", "block")  # block: an image block (cannot be cut)
ORDER = {"decode": 0, "denoise": 1, "prefill": 2, "block": 2}


@dataclass(slots=True)
class Pending:
    request_id: str
    kind: str
    tokens: int
    blocks: int  # KV blocks the whole item would take
    arrival: int  # lower = older
    holds_blocks: int = 0  # blocks this request owns now (preemption frees them)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}")
        if self.tokens <= 0:
            raise ValueError("pending work must have at least one token")


@dataclass(slots=True)
class StepPlan:
    run: list[tuple[str, int]] = field(default_factory=list)  # (request id, tokens to run)
    preempt: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.run and not self.preempt


class Scheduler:
    def __init__(self, token_budget: int, block_size: int) -> None:
        if token_budget <= 0:
            raise ValueError("token_budget must be positive")
        self.token_budget, self.block_size = token_budget, block_size

    def _chunk_blocks(self, tokens: int) -> int:
        # An upper bound: the chunk may start mid-block and a shared last block may be copied.
        return -(-tokens // self.block_size) + 2

    def plan(self, pending: list[Pending], free_blocks: int) -> StepPlan:
        plan = StepPlan()
        budget = self.token_budget
        denoise_ran = False
        for item in sorted(pending, key=lambda p: (ORDER[p.kind], p.arrival)):
            if item.kind == "denoise":
                if item.tokens > budget and denoise_ran:
                    continue
                if item.blocks > free_blocks:
                    continue
                denoise_ran = True
                take = item.tokens
            elif item.kind == "prefill" and item.tokens > budget:
                take = budget
                if take <= 0 or self._chunk_blocks(take) > free_blocks:
                    continue
                plan.run.append((item.request_id, take))
                free_blocks -= self._chunk_blocks(take)
                budget = 0
                continue
            else:
                take = item.tokens
                if (take > budget and plan.run) or item.blocks > free_blocks:
                    continue
            plan.run.append((item.request_id, take))
            budget -= take
            free_blocks -= item.blocks
        if not plan.run and pending:
            plan.preempt = self._victim(pending)
        return plan

    @staticmethod
    def _victim(pending: list[Pending]) -> list[str]:
        """Nothing fits: free the youngest request that holds blocks (it is recomputed later)."""
        holders = [p for p in pending if p.holds_blocks > 0]
        if len(holders) <= 1:
            return []  # one request alone that cannot fit can only wait for no one: engine fails it
        return [max(holders, key=lambda p: p.arrival).request_id]
