"""Prefix-aware LFU with dynamic aging and a ghost history.

Three published ideas, combined for chained KV pages:

- **Greedy-Dual frequency / LFU-DA** (Cao & Irani '97; Arlitt et al. '00): a
  page's priority is ``age + count``; the victim is the lowest, and ``age``
  rises to each victim's priority. Pages reused often stay; a page that was
  popular long ago falls behind as ``age`` climbs, so nothing stays forever.
  Ties go to the least recently used. Counts saturate at ``max_count``
  (3, as S3-FIFO's two-bit counters): the references of a burst (an agent
  re-sending its whole history on every tool call) are correlated, and an
  unbounded count would keep a finished session's pages long after it ended
  (LRU-K's "correlated reference" problem). On our agent workload the
  unbounded count falls below LRU at 5,000 and 10,000 pages; capped, it
  does not.
- **Ghost history** (as ARC's B lists and TinyLFU's sketch do): the counts of
  recently evicted pages are kept, by key only, for up to ``ghost_factor``
  times the capacity; a page that comes back resumes its count. In chat
  traffic a page's first reuse is often farther away than the cache can
  hold a page that is never hit; remembering that it was used lets the
  second reuse stay. Memory: one dict entry per remembered key.
- **Leaves only** (:mod:`kvstore.eviction.chain`): a page with cached
  children is never a victim, so chains shrink from the tail and no cached
  page is stranded behind an evicted parent. Counts agree: every request that
  reads a page reads its parent, so a parent's count is never below a
  child's (while both stay cached).

New pages enter with count 1 (plus what the ghost remembers), so a page
that is never reused is usually the first to go, before reused ones, without
a separate probation queue.
"""

from __future__ import annotations

from collections import OrderedDict

from kvstore.eviction.chain import ChainPolicy, Priority
from kvstore.page_keys import PageKey


class PrefixLFUDAPolicy(ChainPolicy):
    name = "prefix-lfuda"

    def __init__(self, ghost_factor: float = 4.0, max_count: int = 3) -> None:
        if ghost_factor < 0:
            raise ValueError(f"ghost_factor must be >= 0 (times the capacity), got {ghost_factor}")
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        super().__init__()
        self._max_count = max_count
        self._ghost_factor = ghost_factor
        self._ghost_limit = 0  # set by set_capacity; 0 keeps no history
        self._clock = 0
        self._age = 0
        self._count: dict[PageKey, int] = {}
        self._ghost: OrderedDict[PageKey, int] = OrderedDict()  # evicted key -> count, oldest first

    def set_capacity(self, capacity: int) -> None:
        self._ghost_limit = int(self._ghost_factor * capacity)

    def _priority(self, count: int) -> Priority:
        self._clock += 1
        if not self._clock & 0xFFFF:
            self._maybe_compact()
        return (self._age + count, self._clock)

    def _inserted(self, key: PageKey) -> Priority:
        count = self._count[key] = min(self._ghost.pop(key, 0) + 1, self._max_count)
        return self._priority(count)

    def _accessed(self, key: PageKey, old: Priority) -> Priority:
        count = self._count[key] = min(self._count[key] + 1, self._max_count)
        return self._priority(count)

    def _evicted(self, key: PageKey, prio: Priority) -> None:
        self._age = max(self._age, prio[0])
        count = self._count.pop(key)
        if self._ghost_limit:
            self._ghost[key] = count
            if len(self._ghost) > self._ghost_limit:
                self._ghost.popitem(last=False)
