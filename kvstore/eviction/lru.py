"""Least recently used: evict the page whose last hit or insert is oldest.

Under the prefix rule (adaptive's leaf guard) a page with a cached child is
parked (:mod:`kvstore.eviction.parking`): back at the oldest end when its last
child leaves, since its last use came before its child's, the oldest leaf's.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from itertools import repeat
from typing import Callable, Sequence

from kvstore.eviction.base import EvictionPolicy
from kvstore.eviction.parking import park, unpark
from kvstore.page_keys import PageKey


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self) -> None:
        # Oldest first; move_to_end on access keeps each operation O(1).
        self._order: OrderedDict[PageKey, None] = OrderedDict()
        self._parked: dict[PageKey, int] = {}   # see kvstore.eviction.parking

    def on_insert(self, key: PageKey, parent: PageKey | None) -> None:
        self._order[key] = None

    def on_access(self, key: PageKey) -> None:
        if key not in self._parked:
            self._order.move_to_end(key)

    def on_access_run(self, keys: Sequence[PageKey]) -> None:
        order = self._order
        keys = filter(order.__contains__, keys) if self._parked else keys
        deque(map(order.move_to_end, keys), maxlen=0)  # the loop in C

    def park(self, key: PageKey) -> None:
        park(key, (self._order,), self._parked)

    def unpark(self, key: PageKey) -> None:
        unpark(key, (self._order,), self._parked)

    def on_insert_run(self, keys: Sequence[PageKey], parent: PageKey | None) -> None:
        self._order.update(zip(keys, repeat(None)))  # new keys: appended in order

    def on_remove(self, key: PageKey) -> None:
        if self._order.pop(key, False) is not None:
            del self._parked[key]

    def choose_victims(self, n: int, is_evictable: Callable[[PageKey], bool]) -> list[PageKey]:
        victims: list[PageKey] = []
        if n <= 0:
            return victims
        for key in self._order:
            if is_evictable(key):
                victims.append(key)
                if len(victims) == n:
                    return victims
        return []

    def __len__(self) -> int:
        return len(self._order) + len(self._parked)
