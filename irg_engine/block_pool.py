"""KV cache bookkeeping: fixed-size blocks with reference counts, and sequences built from them.

Plain Python, no torch: the runner owns the physical tensors and only ever receives block ids
and slot numbers (`block * block_size + offset`) from here.

- `BlockPool` hands out free blocks and takes them back when their count drops to zero.
- `KVSequence` is one context's layout: a list of blocks, a token count and the next RoPE
  position. `fork` shares every block (count + 1) instead of copying. `append` reserves slots for
  new tokens; when the last block is shared and partly filled it is copied first (copy-on-write),
  so a fork never sees tokens appended to another sequence. `hold_back` uncounts appended tokens
  but keeps their slots for the next append (a step run ahead, see `runner.py`); `trim` gives
  such slots back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks that hold `tokens` tokens."""
    return -(-tokens // block_size)


class OutOfBlocks(Exception):
    """The pool cannot satisfy a request right now (callers wait or preempt)."""


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = [0] * num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self.refs[b] = 1
        return blocks

    def retain(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refs[b] <= 0:
                raise ValueError(f"block {b} is not allocated")
            self.refs[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.refs[b] <= 0:
                raise ValueError(f"block {b} released more often than retained")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self._free.append(b)


@dataclass
class Append:
    """Where the new tokens of one append go, and which block copies must happen first."""

    slots: list[int]
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src block, dst block)


@dataclass(eq=False)  # identity semantics: two sequences are never "equal"
class KVSequence:
    name: str = ""
    blocks: list[int] = field(default_factory=list)
    length: int = 0
    rope: int = 0
    freed: bool = False

    def slots(self, pool: BlockPool, start: int = 0, end: int | None = None) -> list[int]:
        """Slot numbers of tokens `start..end` of this sequence."""
        bs = pool.block_size
        end = self.length if end is None else end
        return [self.blocks[i // bs] * bs + i % bs for i in range(start, end)]

    def save(self, pool: BlockPool) -> tuple[list[int], int, int]:
        """This sequence's layout, for `restore` (the engine's rollback of a failed step).

        Held-back slots are not part of it: the step may give them back (`trim`) and the pool
        hand their block to another sequence before the step fails."""
        return self.blocks[: blocks_for(self.length, pool.block_size)], self.length, self.rope

    def restore(self, pool: BlockPool, saved: tuple[list[int], int, int]) -> None:
        """Back to a saved layout: blocks taken since go back to the pool, ones let go are kept."""
        blocks, length, rope = saved
        pool.retain(blocks)
        pool.release(self.blocks)
        self.blocks, self.length, self.rope = blocks, length, rope

    def fork(self, pool: BlockPool, name: str) -> KVSequence:
        # Only the blocks the length covers: a held-back slot stays this sequence's alone.
        shared = self.blocks[: blocks_for(self.length, pool.block_size)]
        pool.retain(shared)
        return KVSequence(name, shared, self.length, self.rope)

    def tail(self, pool: BlockPool) -> tuple[int, bool]:
        """Free slots in the blocks this sequence already holds, and whether its next append
        copies its last block first (partly filled and shared)."""
        bs = pool.block_size
        shared = bool(self.length % bs) and pool.refs[self.blocks[-1]] > 1
        return len(self.blocks) * bs - self.length, shared

    def blocks_needed(self, pool: BlockPool, n: int, copies: bool = True) -> int:
        """Blocks an append of n tokens would take from the pool; with `copies`, the copy of a
        shared last block too (it replaces that block here: this sequence holds no more)."""
        room, shared = self.tail(pool)
        return blocks_for(max(0, n - room), pool.block_size) + (copies and shared)

    def append(self, pool: BlockPool, n: int) -> Append:
        """Reserve n new token slots at the end (all-or-nothing: raises `OutOfBlocks`)."""
        bs = pool.block_size
        needed = self.blocks_needed(pool, n)
        if needed > pool.num_free:
            raise OutOfBlocks(f"need {needed} blocks, {pool.num_free} free")
        out = Append([])
        if self.length % bs and pool.refs[self.blocks[-1]] > 1:
            (fresh,) = pool.allocate(1)
            out.copies.append((self.blocks[-1], fresh))
            pool.release([self.blocks[-1]])
            self.blocks[-1] = fresh
        grow = blocks_for(self.length + n, bs) - len(self.blocks)
        self.blocks.extend(pool.allocate(grow))
        start = self.length
        self.length += n
        out.slots = self.slots(pool, start, self.length)
        return out

    def next_slot(self, pool: BlockPool) -> int | None:
        """The slot an append of one token would take, where it needs no new block and no
        copy of a shared one (a held-back slot, or room in an unshared last block); else None."""
        bs = pool.block_size
        i, offset = divmod(self.length, bs)
        if i >= len(self.blocks) or (offset and pool.refs[self.blocks[i]] > 1):
            return None
        return self.blocks[i] * bs + offset

    def hold_back(self, n: int) -> None:
        """Uncount the last n tokens but keep their slots: the next append of up to n tokens
        lands on them again. `trim` gives their blocks back if that append never comes."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot hold back {n} of {self.length} tokens")
        self.length -= n

    def trim(self, pool: BlockPool) -> None:
        """Release the blocks past those the length covers (held-back slots never used)."""
        keep = blocks_for(self.length, pool.block_size)
        if not self.freed and len(self.blocks) > keep:
            pool.release(self.blocks[keep:])
            del self.blocks[keep:]

    def free(self, pool: BlockPool) -> None:
        if not self.freed:
            pool.release(self.blocks)
            self.blocks, self.length, self.freed = [], 0, True
