"""Least frequently used: evict the page with the fewest hits, the least recent of those.

A page's count starts at 1 on insert and grows by one per hit; it is
forgotten when the page leaves. Ties go to the page touched longest ago. A
min-heap of (count, last touch) with stale entries skipped keeps each
operation O(log n).
"""

from __future__ import annotations

import heapq
from typing import Callable

from kvstore.eviction.base import EvictionPolicy
from kvstore.page_keys import PageKey


class LFUPolicy(EvictionPolicy):
    name = "lfu"

    def __init__(self) -> None:
        self._clock = 0
        self._prio: dict[PageKey, tuple[int, int]] = {}  # key -> (count, last touch)
        self._heap: list[tuple[int, int, PageKey]] = []  # live iff it equals _prio[key]

    def _push(self, key: PageKey, count: int) -> None:
        self._clock += 1
        self._prio[key] = (count, self._clock)
        heapq.heappush(self._heap, (count, self._clock, key))
        if len(self._heap) > 4 * len(self._prio) + 1024:
            self._heap = [(c, t, k) for k, (c, t) in self._prio.items()]
            heapq.heapify(self._heap)

    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        self._push(key, 1)

    def on_access(self, key: PageKey) -> None:
        self._push(key, self._prio[key][0] + 1)

    def on_remove(self, key: PageKey) -> None:
        del self._prio[key]

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        heap, prio_of = self._heap, self._prio
        popped, victims = [], []
        while heap and len(victims) < n:
            entry = heapq.heappop(heap)
            count, clock, key = entry
            if prio_of.get(key) != (count, clock):
                continue  # stale: touched again or removed since
            popped.append(entry)
            if is_evictable(key):
                victims.append(key)
        for entry in popped:  # nothing was removed: the live entries go back
            heapq.heappush(heap, entry)
        return victims if len(victims) == n else []

    def __len__(self) -> int:
        return len(self._prio)
