"""Text prefixes whose KV is computed once and shared by every request (e.g. system prompts).

A recipe marks a segment `shared` when it opens an empty context (the IRG and think system
prompts). The first request computes it; afterwards the cache holds a fork of that sequence, and
later requests adopt its blocks (reference counts + 1, no copy, no compute). Entries are evicted
oldest first when the cache is full, or when the engine needs their blocks back.
No torch: this is block bookkeeping like `block_pool.py`.
"""

from __future__ import annotations

from collections import OrderedDict

from irg_engine.block_pool import BlockPool, KVSequence


class PrefixCache:
    def __init__(self, pool: BlockPool, entries: int) -> None:
        self.pool, self.entries = pool, entries
        self._seqs: OrderedDict[tuple[int, ...], KVSequence] = OrderedDict()

    def adopt(self, key: tuple[int, ...], seq: KVSequence) -> bool:
        """Make the empty `seq` share the cached prefix `key`; False when it is not cached."""
        cached = self._seqs.get(key)
        if cached is None:
            return False
        self._seqs.move_to_end(key)
        self.pool.retain(cached.blocks)
        seq.blocks, seq.length, seq.rope = list(cached.blocks), cached.length, cached.rope
        return True

    def store(self, key: tuple[int, ...], seq: KVSequence) -> None:
        if key in self._seqs or self.entries == 0:
            return
        self._seqs[key] = seq.fork(self.pool, "prefix")
        while len(self._seqs) > self.entries:
            self.evict()

    def evict(self) -> bool:
        """Free the oldest entry's blocks; False when the cache is empty."""
        if not self._seqs:
            return False
        self._seqs.popitem(last=False)[1].free(self.pool)
        return True

    def give_back(self) -> bool:
        """Drop an entry for the engine, which is short of blocks: the oldest that no request
        shares (its blocks go back to the pool at once), else the oldest (its blocks go back
        once the requests sharing them end). False when the cache is empty."""
        refs = self.pool.refs
        idle = next((k for k, s in self._seqs.items() if all(refs[b] == 1 for b in s.blocks)), None)
        if idle is None:
            return self.evict()
        self._seqs.pop(idle).free(self.pool)
        return True

    def clear(self) -> None:
        while self.evict():
            pass
