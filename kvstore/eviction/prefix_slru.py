"""Prefix-aware segmented LRU with a ghost history and expiring protection.

    insert ──> probation ──hit──> protected (<= 80% of capacity, LRU order)
      │ key in ghost ─────────────^     │ overflow, or unused for 2 lifetimes
      v                                 v
    evicted first (LRU leaf)        demoted to probation's recent end

Segmented LRU (Karedla, Love and Wherry, 1994) splits the tier in two: pages
seen once wait in *probation*; a page hit there moves to *protected*, which
is only drained into probation when it overflows. Victims come from
probation first, so the stream of pages that are never reused (most pages
of chat traffic: new prompts, the tail of each turn) cannot flush the pages
that are. Three additions:

- **Ghost history** (as S3-FIFO and ARC): the keys of recently evicted pages
  are remembered (``ghost_factor`` x capacity keys); a page inserted again
  while remembered was reused after all and goes straight to protected.
  Chat turns often return later than a page that is never hit survives.
- **Expiry**: a protected page unused for ``expiry_lifetimes`` x capacity
  references is demoted. An LRU tier replaces its whole content about once
  per ``capacity`` references; a page idle for two such lifetimes has stopped
  being hot, and keeping it would starve probation in a large tier (without
  this, SLRU falls below LRU at 50,000 pages on the conversation trace).
- **Leaves only** (:mod:`kvstore.eviction.chain`): in either segment only
  pages without cached children are victims, so chains shrink from the tail.

Priorities are ``(segment, last use)``: probation (0) before protected (1),
least recently used first within a segment.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict

from kvstore.eviction.chain import ChainPolicy, Priority
from kvstore.page_keys import PageKey

_PROBATION, _PROTECTED = 0, 1


class PrefixSLRUPolicy(ChainPolicy):
    name = "prefix-slru"

    def __init__(self, protected_fraction: float = 0.8, ghost_factor: float = 4.0,
                 expiry_lifetimes: float = 2.0) -> None:
        if not 0.0 <= protected_fraction < 1.0:
            raise ValueError(f"protected_fraction must be in [0, 1), got {protected_fraction}")
        if ghost_factor < 0 or expiry_lifetimes <= 0:
            raise ValueError("ghost_factor must be >= 0 and expiry_lifetimes > 0 (x capacity)")
        super().__init__()
        self._fractions = (protected_fraction, ghost_factor, expiry_lifetimes)
        self._clock = 0
        self._protected: OrderedDict[PageKey, int] = OrderedDict()  # key -> last use, LRU first
        self._ghost: OrderedDict[PageKey, None] = OrderedDict()  # evicted keys, oldest first
        self.set_capacity(4096)  # until the index says

    def set_capacity(self, capacity: int) -> None:
        protected_fraction, ghost_factor, expiry_lifetimes = self._fractions
        self._max_protected = int(protected_fraction * capacity)
        self._ghost_limit = int(ghost_factor * capacity)
        self._expiry = int(expiry_lifetimes * capacity)

    def _tick(self) -> int:
        self._clock += 1
        if not self._clock & 0xFFFF:
            self._maybe_compact()
        return self._clock

    def _inserted(self, key: PageKey) -> Priority:
        if self._ghost.pop(key, False) is None:  # reused after all: protect it
            return self._protect(key)
        clock = self._tick()
        self._drain(clock, key)
        return (_PROBATION, clock)

    def _accessed(self, key: PageKey, old: Priority) -> Priority:
        return self._protect(key)

    def _evicted(self, key: PageKey, prio: Priority) -> None:
        self._protected.pop(key, None)
        if self._ghost_limit:
            self._ghost[key] = None
            if len(self._ghost) > self._ghost_limit:
                self._ghost.popitem(last=False)

    def _protect(self, key: PageKey) -> Priority:
        clock = self._tick()
        protected = self._protected
        protected[key] = clock
        protected.move_to_end(key)
        self._drain(clock, key)
        if key not in protected:  # a tier with no protected room
            return (_PROBATION, clock)
        return (_PROTECTED, clock)

    def _drain(self, clock: int, keep: PageKey) -> None:
        """Demote the least recently used protected pages that overflow or expired."""
        protected = self._protected
        while protected:
            oldest, last_use = next(iter(protected.items()))
            if oldest == keep or (len(protected) <= self._max_protected
                                  and clock - last_use <= self._expiry):
                return
            del protected[oldest]
            self._demote(oldest)

    def _demote(self, key: PageKey) -> None:
        """Move a protected page to probation's recent end (SLRU's demotion)."""
        prio = self._prio[key] = (_PROBATION, self._tick())
        if key not in self._num_children:  # a leaf: a candidate now; parents wait their turn
            heapq.heappush(self._heap, (prio, key))
